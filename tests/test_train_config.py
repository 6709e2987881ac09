"""Train configs that cannot work fail before anything is built, naming the field; the CLI
exits non-zero with one `error:` line. And on_nonfinite='skip' has limits and says what it skips."""
import os
import subprocess
import sys

import pytest

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.config import ConfigError
from mobilemoe_jax.train import NonFiniteError, config_check, train_and_evaluate
from tests.support.train import make_config, poison_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_train_field_has_a_rule():
  assert set(config_lib.train_config('x', small=True).keys()) == set(config_check.TRAIN_RULES)


@pytest.mark.parametrize('field, value', [
    ('lr', -1.0), ('lr', 0.0), ('steps', -5), ('steps', 0), ('seq_len', 0), ('batch_size', 0),
    ('batch_size', -8), ('warmup_steps', 7), ('warmup_steps', -1), ('grad_accum', 3),
    ('grad_accum', 0), ('decay_fraction', 1.5), ('min_lr_ratio', -0.1), ('b1', 1.0),
    ('b2', -0.5), ('eps', 0.0), ('clip_norm', -1.0), ('weight_decay', -0.1),
    ('schedule', 'linear'), ('on_nonfinite', 'ignore'), ('adam_mu_dtype', 'int8'),
    ('log_every', 0), ('eval_every', -1), ('eval_batches', -1), ('checkpoint_every', 0),
    ('keep_checkpoints', 0), ('loss_chunk_len', -1), ('distill_weight', -1.0),
    ('distill_temperature', 0.0), ('max_consecutive_skips', -1), ('max_skip_fraction', 2.0),
    ('seed', -1), ('stage', ''), ('seq_len', 4096),     # seq_len > model.max_seq_len
])
def test_bad_train_value_names_the_field(data_dir, field, value):
  config = make_config(data_dir, **{f'train.{field}': value})   # steps=6, batch_size=8
  with pytest.raises(ConfigError, match=rf'config field `train\.{field}`'):
    config_check.check(config)


def test_unknown_train_field_names_the_nearest(data_dir):
  config = make_config(data_dir)
  with config.unlocked():
    config.train.warmup = 5
  with pytest.raises(ConfigError, match=r'unknown config field `train\.warmup`; nearest: train\.warmup_steps'):
    config_check.check(config)


def _cli(data_dir, tmp_path, *overrides):
  return subprocess.run(
      [sys.executable, '-m', 'mobilemoe_jax.train',
       f'--config=configs/stages/pretrain.py:tiny,data_dir={data_dir}',
       f'--workdir={tmp_path / "run"}', *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('override, message', [
    ('--config.model.nonexistent=1', 'error: unknown config field `model.nonexistent`'),
    ('--config.train.warmup=5', 'error: unknown config field `train.warmup`; nearest: train.warmup_steps'),
    ('--config.train.lr=-1', 'error: config field `train.lr`: must be > 0, got -1.0'),
])
def test_cli_bad_config_is_one_line(data_dir, tmp_path, override, message):
  run = _cli(data_dir, tmp_path, override)
  assert run.returncode == 2, run.stderr
  assert 'Traceback' not in run.stderr and run.stderr.strip().splitlines()[-1].startswith(message), \
      run.stderr


def test_skip_limit_stops_and_reports_each_skip(data_dir, tmp_path, monkeypatch, capsys):
  """Every batch from step 2 on is poisoned: 'skip' reports each skipped step and stops once
  more than max_consecutive_skips were skipped in a row."""
  for step in range(2, 7):
    poison_step(monkeypatch, step)
  config = make_config(data_dir, **{'train.on_nonfinite': 'skip', 'train.max_consecutive_skips': 2})
  with pytest.raises(NonFiniteError, match=r'3 steps in a row and 3 of 4 skipped .*'
                                           r'max_consecutive_skips=2.*checkpoint is .*/3'):
    train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  for step in (2, 3, 4):
    assert f'step {step}: non-finite loss (nan)' in out, out
  assert 'step 5:' not in out
