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
