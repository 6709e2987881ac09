"""Workdir paths through etils.epath: local or gs://, TensorBoard under tensorboard/, bad schemes."""
import os

import pytest

from mobilemoe_jax.train import metrics as metrics_lib
from mobilemoe_jax.train import paths


def test_local_paths_become_absolute_and_bucket_uris_are_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.as_path('runs/a')) == str(tmp_path / 'runs' / 'a')
  bucket = paths.as_path('gs://my-bucket/run')   # no I/O: only the path object
  assert str(bucket / 'checkpoints' / '6') == 'gs://my-bucket/run/checkpoints/6'


@pytest.mark.parametrize('bad', ['gcs://bucket/run', 'foo://x/y'])
def test_unknown_scheme_is_refused_with_the_path_named(bad):
  with pytest.raises(ValueError, match=f"{bad!r}: unsupported scheme '{bad.split(':')[0]}://'"):
    paths.as_path(bad)


def test_writer_puts_events_under_tensorboard_and_keeps_the_log_on_resume(tmp_path):
  w = metrics_lib.Writer(str(tmp_path))
  w.write(1, {'train/loss': 2.5}, {'moe/load': [0.5, 1.5]})
  w.close()
  w = metrics_lib.Writer(str(tmp_path))   # a resumed run adds to the same log
  w.write(2, {'train/loss': 2.0})
  w.close()
  events = os.listdir(tmp_path / 'tensorboard')
  assert len(events) == 2 and all(e.startswith('events.out.tfevents.') for e in events)
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'tensorboard']
  assert metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl')) == {
      1: {'train/loss': 2.5}, 2: {'train/loss': 2.0}}


def test_bucket_without_gcsfs_names_the_missing_package():
  import importlib.util
  if importlib.util.find_spec('gcsfs') or importlib.util.find_spec('tensorflow'):
    pytest.skip('a GCS backend is installed: this would reach the network')
  with pytest.raises(ImportError, match='gcsfs'):
    paths.as_path('gs://no-such-bucket/run').mkdir(parents=True, exist_ok=True)
