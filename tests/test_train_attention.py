"""model.attention_impl: validated, and 'auto' is XLA's attention off GPU (the cuDNN path is
checked against XLA on the device: bench/train_throughput.py's attention_check)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mobilemoe_jax import config as config_lib
from mobilemoe_jax.model import Transformer


def _logits(impl):
  cfg = tiny.get_config().model
  cfg.attention_impl = impl
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  segments = jnp.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4])   # two documents; padding
  positions = jnp.array([list(range(10)) + list(range(6)), list(range(12)) + [0] * 4])
  return np.asarray(model(tokens, positions=positions, segment_ids=segments)[0])


def test_auto_is_xla_attention_off_gpu():
  assert jax.default_backend() != 'gpu'
  np.testing.assert_array_equal(_logits('auto'), _logits('xla'))


def test_unknown_attention_impl_is_refused():
  cfg = tiny.get_config().model
  cfg.attention_impl = 'flash'
  with pytest.raises(config_lib.ConfigError, match='model.attention_impl.*flash'):
    config_lib.validate(cfg)
