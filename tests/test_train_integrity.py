"""Checkpoint integrity: a damaged checkpoint is never resumed from silently. Each kind of
damage is reported naming the step and the file, and the run resumes from the newest intact
checkpoint with the same losses, bit for bit, as a run that was never interrupted."""
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mobilemoe_jax.train import CheckpointCorrupt, CheckpointError, NonFiniteError
from mobilemoe_jax.train import checkpoint as ckpt_lib
from mobilemoe_jax.train import metrics as metrics_lib
from mobilemoe_jax.train import train_and_evaluate
from tests.support.train import make_config, poison_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  logged = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {s: m['train/loss'] for s, m in logged.items() if 'train/loss' in m}


@pytest.fixture(scope='module')
def straight(data_dir, tmp_path_factory):
  """A finished 6-step run: checkpoints 3 and 6, and its losses."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  train_and_evaluate(make_config(data_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  return workdir, _losses(workdir)


def _copy_without_log_after(src, dst, step):
  """A copy of a finished run whose metrics.jsonl ends at `step`: the losses after it must
  come from the resumed run."""
  shutil.copytree(src, dst)
  path = os.path.join(dst, 'metrics.jsonl')
  with open(path) as f:
    lines = [l for l in f if json.loads(l)['step'] <= step]
  with open(path, 'w') as f:
    f.writelines(lines)


def _largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


def _flip_one_byte(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, 'r+b') as f:
    f.seek(1000)
    byte = f.read(1)
    f.seek(1000)
    f.write(bytes([byte[0] ^ 0x01]))
  return os.path.relpath(path, step_dir)


def _overwrite_4k(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, 'r+b') as f:
    f.seek(4096)
    f.write(os.urandom(4096))
  return os.path.relpath(path, step_dir)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)
  return os.path.relpath(path, step_dir)


def _delete_metadata(step_dir):
  os.remove(os.path.join(step_dir, 'state', '_METADATA'))
  return "state/_METADATA missing"


def _empty_step_dir(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)
  return 'integrity.json missing (the directory is empty)'


@pytest.mark.parametrize('damage', [_flip_one_byte, _overwrite_4k, _truncate, _delete_metadata,
                                    _empty_step_dir])
def test_damaged_checkpoint_falls_back_to_the_newest_intact_one(data_dir, straight, tmp_path,
                                                                damage, capsys):
  src, losses = straight
  workdir = str(tmp_path / 'run')
  _copy_without_log_after(src, workdir, 3)
  bad = os.path.join(workdir, 'checkpoints', '6')
  named = damage(bad)
  capsys.readouterr()
  summary = train_and_evaluate(make_config(data_dir), workdir)
  out = capsys.readouterr().out
  assert f'checkpoint step 6 ({bad})' in out and named in out, out
  assert 'falling back to checkpoint step 3' in out and f'resumed from {workdir}/checkpoints/3' in out
  assert _losses(workdir) == losses                       # steps 4-6 again, bit for bit
  assert summary['steps'] == 6
  # The bad step is kept aside for inspection; the new step 6 verifies.
  assert os.path.isdir(os.path.join(workdir, ckpt_lib.QUARANTINE, '6'))
  ckpt_lib.verify(bad, 6)


def test_no_fallback_stops_naming_the_file(data_dir, straight, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight[0], workdir)
  step_dir = os.path.join(workdir, 'checkpoints', '6')
  named = _flip_one_byte(step_dir)
  config = make_config(data_dir, **{'train.checkpoint_fallback': False})
  with pytest.raises(CheckpointCorrupt, match='checkpoint step 6') as err:
    train_and_evaluate(config, workdir)
  assert named in str(err.value) and 'sha256' in str(err.value)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']   # untouched


def test_every_checkpoint_bad_is_an_error(data_dir, straight, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight[0], workdir)
  for step in ('3', '6'):
    _truncate(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(CheckpointCorrupt, match='no checkpoint in .* verifies'):
    train_and_evaluate(make_config(data_dir), workdir)


def test_verify_names_what_failed(straight, tmp_path):
  """The manifest itself, or Orbax's step metadata, gone or damaged (no training needed)."""
  step_dir = str(tmp_path / '6')
  shutil.copytree(os.path.join(straight[0], 'checkpoints', '6'), step_dir)
  ckpt_lib.verify(step_dir, 6)
  os.remove(os.path.join(step_dir, '_CHECKPOINT_METADATA'))
  with pytest.raises(CheckpointCorrupt, match='_CHECKPOINT_METADATA missing'):
    ckpt_lib.verify(step_dir, 6)
  os.remove(os.path.join(step_dir, ckpt_lib.MANIFEST))
  with pytest.raises(CheckpointCorrupt, match='integrity.json missing .the save never finished'):
    ckpt_lib.verify(step_dir, 6)


def test_nan_right_after_a_restore_blames_the_checkpoint(data_dir, straight, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight[0], workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  poison_step(monkeypatch, 1)           # the first batch the resumed iterator yields: step 4
  with pytest.raises(NonFiniteError, match=r'step 4 .*first step after resuming from .*/3: '
                                           r'that checkpoint is suspect') as err:
    train_and_evaluate(make_config(data_dir), workdir)
  assert 'train.lr' not in str(err.value)


def test_resume_with_a_changed_config_is_refused_unless_allowed(data_dir, straight, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight[0], workdir)
  changed = {'model.moe.top_k': 1, 'model.moe.norm_topk_prob': False, 'train.steps': 7}
  with pytest.raises(CheckpointError, match='another config') as err:
    train_and_evaluate(make_config(data_dir, **changed), workdir)
  assert 'model.moe.top_k: 2 -> 1' in str(err.value)
  assert 'allow_config_change' in str(err.value) and 'train.steps' not in str(err.value)
  capsys.readouterr()
  summary = train_and_evaluate(
      make_config(data_dir, **changed, **{'train.allow_config_change': True}), workdir)
  assert summary['steps'] == 7
  assert 'model.moe.top_k: 2 -> 1' in capsys.readouterr().out


# A data error in the middle of a run, while the step-3 save may still be in flight.
CHILD = textwrap.dedent('''
    import itertools, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import conftest
    from tests.support.train import make_config
    from mobilemoe_jax.data import pipeline
    from mobilemoe_jax.data.integrity import DataError
    from mobilemoe_jax.train import train_and_evaluate

    original = pipeline.make_dataset
    def make_dataset(data_config, **kw):
      ds = original(data_config, **kw)
      if data_config['num_epochs'] == 1:
        return ds
      count = itertools.count(1)
      def read(batch):
        if next(count) == 4:
          raise DataError('shard.array_record record 17: unreadable record (injected)')
        return batch
      return ds.map(read)
    pipeline.make_dataset = make_dataset
    train_and_evaluate(make_config({data!r}), {workdir!r})
''')


def test_data_error_mid_run_leaves_the_saved_checkpoint_whole(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  script = CHILD.format(repo=REPO, tests=os.path.join(REPO, 'tests'), data=data_dir,
                        workdir=workdir)
  run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=600)
  assert run.returncode != 0
  assert 'shard.array_record record 17' in run.stderr
  assert 'cannot schedule new futures' not in run.stderr, run.stderr
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']
  ckpt_lib.verify(os.path.join(workdir, 'checkpoints', '3'), 3)


@pytest.mark.parametrize('async_save', [True, False])
def test_every_save_writes_a_manifest_that_verifies(tmp_path, async_save):
  import grain
  import jax.numpy as jnp
  data_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(data_iter)
  with ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), keep=2, async_save=async_save) as ckpt:
    ckpt.save(1, {'x': jnp.arange(4.0)}, data_iter, {'config': {}})
    ckpt.wait()
  step_dir = str(tmp_path / 'checkpoints' / '1')
  ckpt_lib.verify(step_dir, 1)
  with open(os.path.join(step_dir, ckpt_lib.MANIFEST)) as f:
    listed = json.load(f)['files']
  assert any(name.startswith('state/') for name in listed) and 'data/process_0-of-1.json' in listed
