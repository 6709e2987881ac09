"""Tiny models shared by the export tests (PyTorch, HF, LiteRT): a decisive router, a QAT
twin with learned scales, and the token batch they are compared on."""
import copy
import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import tiny
from mobilemoe_jax.model import Transformer


def make(kind='moe', router_gain=30.0, n_layers=None, **moe):
  """A tiny model with a decisive router: the init's near-uniform router puts top-k
  choices at float ties, where any two implementations may legitimately differ.
  Cached (building one eagerly is slow on 2 cores); the config is a fresh copy.
  n_layers: fewer than the tiny config's, where a test needs only one MoE layer."""
  cfg, m = _make(kind, router_gain, n_layers, tuple(sorted(moe.items())))
  return copy.deepcopy(cfg), m


@functools.lru_cache(maxsize=None)
def _make(kind, router_gain, n_layers, moe):
  moe = dict(moe)
  cfg = tiny.get_config(kind).model
  cfg.moe.update(moe)
  cfg.n_layers = n_layers or cfg.n_layers
  m = Transformer(cfg, rngs=nnx.Rngs(0))
  for b in m.blocks:
    if hasattr(b.ffn, 'router'):
      b.ffn.router[...] = b.ffn.router[...] * router_gain
      if b.ffn.expert_bias is not None:
        b.ffn.expert_bias[...] = jnp.linspace(-0.05, 0.05, cfg.moe.n_experts)
  return cfg, m


TOKENS = np.random.default_rng(0).integers(0, 2048, (2, 90))   # > the 64-token window


def lsq_model(cfg, float_model):
  """float_model's weights under LSQ QAT, every learned scale moved off its max-abs init
  (by -15% .. +20%), as training moves them."""
  import jax
  from mobilemoe_jax.model.layers import QuantScale
  from mobilemoe_jax.quant import qat
  cfg = copy.deepcopy(cfg)
  cfg.quant.weights, cfg.quant.learnable_scale = 'int4_g32', True
  qm = Transformer(cfg, rngs=nnx.Rngs(0))
  nnx.update(qm, nnx.state(float_model, nnx.Param))
  qat.init_scales_from_weights(qm)
  scales = nnx.state(qm, QuantScale)
  keys = iter(jax.random.split(jax.random.key(5), 100))
  nnx.update(qm, jax.tree.map(
      lambda s: s * jax.random.uniform(next(keys), s.shape, minval=0.85, maxval=1.2), scales))
  return cfg, qm


def jax_next_logits(model, length=64):
  """ids -> logits after them, from one full forward (padded to `length`: one compile)."""
  fwd = nnx.jit(lambda m, ids: m(ids)[0][0])

  def logits(ids):
    pad = np.zeros((1, length), np.int32)
    pad[0, :len(ids)] = ids
    return np.asarray(fwd(model, jnp.asarray(pad)))[:len(ids)]
  return logits
