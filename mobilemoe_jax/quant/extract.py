"""The integer weights of a (QAT) model: exactly what its fake-quant forward computes with.

`integer_weights(model)` returns, per quantized parameter path, the int8-held integers and
their scales as [..., in, out] matrices (groups along `in`), plus how to fold them back into
the parameter's shape. The exporter writes these; `dequantized_state(model)` rebuilds float
weights from them, which the tests compare against the fake-quant forward.
"""
import math

import jax.numpy as jnp
from flax import nnx

from mobilemoe_jax.model.layers import MLP, Attention
from mobilemoe_jax.model.transformer import Transformer
from mobilemoe_jax.moe.layer import MoE
from mobilemoe_jax.quant import grid, qat


def _layout(module, quant):
  """name -> (n_batch, n_in) of each quantized weight of one module (see layers.kernel)."""
  if isinstance(module, Attention):
    return {'q': (0, 1), 'k': (0, 1), 'v': (0, 1), 'o': (0, 2)}
  if isinstance(module, MoE):
    out = {'gate': (1, 1), 'up': (1, 1), 'down': (1, 1)}
    if quant.router:
      out['router'] = (0, 1)
    return out
  if isinstance(module, MLP):
    return {'gate': (0, 1), 'up': (0, 1), 'down': (0, 1)}
  if isinstance(module, Transformer) and module.head is not None:
    return {'head': (0, 1)}
  return {}


def integer_weights(model: Transformer) -> dict:
  """path tuple -> dict(q int8 [..., in, out], scales, shape, scheme, axis).
  `axis` is the axis of the [..., in, out] matrix the groups run along (qat.IN_AXIS, or
  qat.OUT_AXIS for routed experts with model.quant.expert_group_axis='out'); scales have
  q's shape with that axis shrunk to its groups. The embedding is stored transposed ([D, V]:
  groups along D), as the tied head uses it."""
  quant = model.cfg.quant
  if quant.weights is None:
    raise ValueError('model.quant.weights is None: this model has no quantization grid '
                     '(set it, e.g. to int4_g32, to extract post-training integers)')
  out = {}
  for path, module in nnx.iter_graph(model):
    if not isinstance(module, nnx.Module):
      continue
    for name, (n_batch, n_in) in _layout(module, quant).items():
      w = getattr(module, name)[...]
      s = w.shape
      mat = w.reshape(*s[:n_batch], math.prod(s[n_batch:n_batch + n_in]), -1)
      scale = getattr(module, name + '_scale', None)
      g = qat.weight_grid(quant, expert=n_batch > 0)
      q, sc = qat.extract(mat, quant.weights, None if scale is None else scale[...], **g)
      out[tuple(path) + (name,)] = dict(q=q, scales=sc, shape=s, scheme=quant.weights,
                                        axis=g['axis'])
  scale = getattr(model, 'embed_scale', None)
  q, sc = qat.extract(model.embed[...].T, quant.embedding, None if scale is None else scale[...],
                      **qat.weight_grid(quant))
  out[('embed',)] = dict(q=q, scales=sc, shape=model.embed.shape, scheme=quant.embedding,
                         axis=qat.IN_AXIS, transposed=True)
  return out


def dequantized_state(model: Transformer) -> dict:
  """path -> float32 weight rebuilt from the integers, in the parameter's own shape."""
  out = {}
  for path, e in integer_weights(model).items():
    w = grid.dequantize(e['q'], e['scales'], in_axis=e['axis'])
    out[path] = (w.T if e.get('transposed') else w.reshape(e['shape'])).astype(jnp.float32)
  return out
