"""Bad configs fail at start with a message naming the field."""
import subprocess
import sys

import pytest
from flax import nnx

from configs import tiny
from mobilemoe_jax.config import ConfigError, validate
from mobilemoe_jax.model import Transformer


def model(**kw):
  c = tiny.get_config('moe').model
  for k, v in kw.items():
    if k.startswith('moe_'):
      c.moe[k[4:]] = v
    else:
      c[k] = v
  return c


@pytest.mark.parametrize('kw, field', [
    (dict(head_dim=0, n_heads=5), 'model.n_heads'),          # 5 heads do not divide 128
    (dict(n_kv_heads=3), 'model.n_kv_heads'),
    (dict(moe_top_k=9), 'model.moe.top_k'),                  # top-k > 8 experts
    (dict(moe_score_func='tanh'), 'model.moe.score_func'),
    (dict(moe_dispatch='magic'), 'model.moe.dispatch'),
    (dict(moe_first_dense=9), 'model.moe.first_dense'),
    (dict(d_model=0), 'model.d_model'),
    (dict(moe_top_k=1, moe_norm_topk_prob=True), 'model.moe.norm_topk_prob'),   # router gets no grad
])
def test_bad_values_name_the_field(kw, field):
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    Transformer(model(**kw), rngs=nnx.Rngs(0))


def test_head_dim_derived_when_zero():
  c = model(head_dim=0, n_heads=4)
  assert validate(c).head_dim == 32


def test_unknown_key_is_refused():
  c = model()
  c.unlock()
  c.moe.n_expert = 4                                          # typo of n_experts
  with pytest.raises(ConfigError, match=r'model\.moe\.n_expert'):
    validate(c)


@pytest.mark.slow
def test_cli_refuses_unknown_override():
  run = subprocess.run([sys.executable, '-m', 'mobilemoe_jax.info', '--config=configs/tiny.py',
                        '--config.model.moe.topk=2'], capture_output=True, text=True)
  assert run.returncode != 0 and 'top_k' in run.stderr       # suggests the right name


@pytest.mark.slow
def test_cli_prints_the_accounting():
  run = subprocess.run([sys.executable, '-m', 'mobilemoe_jax.info', '--config=configs/tiny.py'],
                       capture_output=True, text=True, check=True)
  assert 'active params' in run.stdout and 'INT4 weight bytes' in run.stdout


@pytest.mark.parametrize('section, key, value, field', [
    ('moe', 'every', 0, 'model.moe.every'),
    ('', 'nope_layers', (1, 4), 'model.nope_layers'),            # tiny has 4 layers: 0..3
    ('', 'nope_layers', 2, 'model.nope_layers'),                 # not a tuple
    ('', 'qk_norm', 'yes', 'model.qk_norm'),
    ('rope_scaling', 'kind', 'yarn', 'model.rope_scaling.kind'),
    ('rope_scaling', 'factor', 0.0, 'model.rope_scaling.factor'),
    ('rope_scaling', 'low_freq_factor', 8.0, 'model.rope_scaling.low_freq_factor'),  # > high
])
def test_release_architecture_fields_are_checked(section, key, value, field):
  c = model()
  target = c[section] if section else c
  if not isinstance(value, type(target[key])):
    c.unlock()                                   # ConfigDict keeps a field's type: replace it
    del target[key]
  target[key] = value
  if section == 'rope_scaling':
    c.rope_scaling.kind = 'llama3' if key != 'kind' else value
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    validate(c)


def test_configs_saved_before_the_release_fields_still_build():
  """A config without qk_norm / rope_scaling / nope_layers / moe.every (an older checkpoint's)
  builds the model it always did."""
  c = model().to_dict()
  for key in ('qk_norm', 'rope_scaling', 'nope_layers'):
    del c[key]
  del c['moe']['every']
  import ml_collections
  old = Transformer(ml_collections.ConfigDict(c), rngs=nnx.Rngs(0))
  new = Transformer(model(), rngs=nnx.Rngs(0))
  import jax.numpy as jnp
  x = jnp.arange(12)[None] % 50
  assert (old(x)[0] == new(x)[0]).all()


def _saved_with(**retired):
  """A model config as an older checkpoint saved it (through JSON), with retired fields set."""
  import json
  return json.loads(json.dumps(dict(model().to_dict(), **retired)))


def test_retired_fields_saved_with_todays_behaviour_load(monkeypatch, caplog):
  """A checkpoint saved with fuse_gate_up=True and attention_mask='bias' loads as today's
  config (fused SwiGLU; the mask's bias without its unused gradient), one log line each; a
  resume does not count them as a config change."""
  import logging
  from mobilemoe_jax.config import experiment
  from mobilemoe_jax.train import checkpoint, loading
  saved = _saved_with(fuse_gate_up=True, attention_mask='bias')
  monkeypatch.setattr(loading, 'read_meta', lambda path: {'config': {'model': saved}})
  with caplog.at_level(logging.INFO):
    cfg = loading.read_config('runs/old/checkpoints')
  today = model(attention_mask='bias_nograd')
  assert validate(cfg.model).to_dict() == validate(today).to_dict()
  lines = [r.getMessage() for r in caplog.records if 'retired' in r.getMessage()]
  assert len(lines) == 2 and all('runs/old/checkpoints' in line for line in lines), lines
  current = experiment(today).to_dict()
  assert checkpoint.check_same_config(dict(current, model=saved), current, 'runs/old/1',
                                      allow=False) == []


def test_retired_field_saved_with_another_value_is_refused():
  from mobilemoe_jax.config import upgrade_saved_model
  with pytest.raises(ConfigError, match=r'model\.fuse_gate_up` in old/config\.json: False is no '
                                        r'longer supported.*one matmul.*only True loads'):
    upgrade_saved_model(_saved_with(fuse_gate_up=False), 'old/config.json')


def test_retired_attention_mask_value_is_refused_when_asked_for():
  """A new config asking for the retired 'bias' mode fails naming the field and the kept modes."""
  with pytest.raises(ConfigError, match=r"model\.attention_mask.*'bias'.*bias_nograd"):
    validate(model(attention_mask='bias'))
