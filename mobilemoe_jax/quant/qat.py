"""Fake quantization for QAT, on exactly the grid the exporter writes (quant/grid.py).

Forward: the weight is replaced by dequantize(quantize(w)) — bit-identical to the integers
and scales `extract()` returns and the exporter stores. Backward: a straight-through
estimator: d/dw = 1 where w / scale rounds into [qmin, qmax] (x in [qmin - 1/2, qmax + 1/2]),
0 where the clip changed it.

Two scale modes:
- max-abs (default): scales follow the weights (recomputed every step, no gradient).
- learnable (LSQ, Esser et al. 2020): a trained scale per group, initialised from max-abs;
  d/ds = round(x) - x inside the range, qmin/qmax at the clipped ends, times
  1/sqrt(G * qmax) to keep its step size comparable to the weights'.

Our kernels are [..., in, out]; every function here takes weights with the input
(reduction) axis at -2, as the layers store them.

The optional int8 KV cache (model.quant.kv_cache, grid.KV_CACHE) is at the end: its
fake quantization for training and what the decode cache stores and reads back.
"""
import functools

import jax
import jax.numpy as jnp

from mobilemoe_jax.quant import grid

IN_AXIS = -2
OUT_AXIS = -1


def weight_grid(quant, expert: bool = False) -> dict:
  """How one weight's groups and scales are formed under `quant` (model.quant):
  {'axis': the axis of its [..., in, out] matrix the groups run along, 'rule': the scale
  rule}. Routed experts group along their output axis with quant.expert_group_axis='out'
  (the released MobileMoE's grid); everything else along its input axis."""
  out = expert and quant.get('expert_group_axis', 'in') == 'out'   # configs saved before it
  return {'axis': OUT_AXIS if out else IN_AXIS, 'rule': quant.get('scale_rule', 'tflite')}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _ste(w, scale, qmin, qmax):
  return _ste_fwd(w, scale, qmin, qmax)[0]


def _ste_fwd(w, scale, qmin, qmax):
  # A true division, as the grid (and ai-edge-quantizer) does. A zero scale (an all-zero
  # group of an imported checkpoint) dequantizes everything to 0, as grid.quantize does.
  x = grid._div(w, jnp.where(scale == 0, 1.0, scale))
  return jnp.clip(jnp.round(x), qmin, qmax) * scale, x


def _ste_bwd(qmin, qmax, x, g):
  # Inside = not changed by the clip: everything that rounds into [qmin, qmax].
  inside = (x >= qmin - 0.5) & (x <= qmax + 0.5)
  dw = jnp.where(inside, g, 0.0)
  # LSQ scale gradient; summed over each group by the caller's broadcast (see _expand).
  ds = g * jnp.where(inside, jnp.round(x) - x, jnp.clip(x, qmin, qmax))
  return dw, ds


_ste.defvjp(_ste_fwd, _ste_bwd)


def _expand(scale, k: int, axis: int = IN_AXIS):
  """Group scales [..., n_groups along `axis`] -> k entries along it: each group's scale
  repeated over its members."""
  return jnp.repeat(scale, k // scale.shape[axis], axis=axis)


def fake_quant(w, scheme, scale=None, axis: int = IN_AXIS, rule: str = 'tflite'):
  """w: [..., in, out] float, groups along `axis` (IN_AXIS, or OUT_AXIS for the release's
  experts). scale: learnable per-group scales (w's shape with `axis` shrunk to its groups)
  or None (max-abs under `rule`). Returns the fake-quantized weight (same dtype as w,
  values exactly dequantize(extract(...)))."""
  s = grid.get_scheme(scheme)
  w32 = w.astype(jnp.float32)
  k = w.shape[axis]
  if scale is None:
    # Reuse the grid's own scale (fp16 rounding included) so forward == exporter.
    scale = jax.lax.stop_gradient(grid.scales(w32, s, axis, rule))
    out = _ste(w32, _expand(scale, k, axis), s.qmin, s.qmax)
  else:
    group = s.group or k
    grad_scale = 1.0 / jnp.sqrt(group * s.qmax)
    # Gradient scaling: the value is exactly `scale` (s + 0: the scale extract() and the
    # exporter store, channel-wise fp32 included), the gradient that of `scale * grad_scale`.
    frozen = jax.lax.stop_gradient(scale)
    scaled = frozen + (scale - frozen) * grad_scale
    out = _ste(w32, _expand(round_scale(scaled, s, rule), k, axis), s.qmin, s.qmax)
  return out.astype(w.dtype)


def round_scale(scale, scheme, rule: str = 'tflite'):
  """The scale as stored (grid.stored_scale: 'tflite' block scales through bf16 to fp16,
  'release' scales to fp16), with a straight-through gradient."""
  stored = grid.stored_scale(scale, scheme, rule)
  return scale + jax.lax.stop_gradient(stored - scale)


def init_scale(w, scheme, axis: int = IN_AXIS, rule: str = 'tflite'):
  """Max-abs scales to start LSQ from: w's shape with `axis` shrunk to its groups, float32."""
  return grid.scales(jnp.asarray(w, jnp.float32), scheme, axis, rule)


def init_scales_from_weights(model):
  """Sets every learned scale of `model` to the max-abs scale of its weight's current value,
  as a fresh LSQ init computes it (layers.add_quant_scale) but from weights loaded after
  construction, e.g. a float checkpoint. In place; returns the model.

  A scale `<name>_scale` sits beside its weight `<name>`; its shape gives the weight's
  matrix view ([batch..., in, out] with the group axis shrunk). The embedding's scale
  (`embed_scale`, [D/G, V]) belongs to the transposed table, groups along D."""
  from flax import nnx
  from mobilemoe_jax.model.layers import QuantScale   # layers imports this module
  quant = model.cfg.quant
  for _, module in nnx.iter_graph(model):
    if not isinstance(module, nnx.Module):
      continue
    for name, scale in list(vars(module).items()):
      if not isinstance(scale, QuantScale):
        continue
      w = getattr(module, name[:-len('_scale')])[...]
      s = scale[...]
      if name == 'embed_scale':
        scale[...] = init_scale(w.T, quant.embedding, IN_AXIS, weight_grid(quant)['rule'])
        continue
      g = weight_grid(quant, expert=s.ndim > 2)       # experts are the batched matrices
      if g['axis'] == OUT_AXIS:
        mat = w.reshape(*s.shape[:-1], -1)
      else:
        mat = w.reshape(*s.shape[:-2], -1, s.shape[-1])
      scale[...] = init_scale(mat, quant.weights, **g)
  return model


def extract(w, scheme, scale=None, axis: int = IN_AXIS, rule: str = 'tflite'):
  """The integers and scales the fake-quant forward used: (q int8 [..., in, out], scales).
  dequantize(q, scales, in_axis=axis) equals fake_quant(w, scheme, scale, axis, rule)
  exactly."""
  s = grid.get_scheme(scheme)
  w32 = jnp.asarray(w, jnp.float32)
  if scale is None:
    return grid.quantize(w32, s, axis, rule)
  stored = round_scale(jnp.asarray(scale, jnp.float32), s, rule)
  full = _expand(stored, w.shape[axis], axis)
  q = jnp.clip(jnp.round(grid._div(w32, jnp.where(full == 0, 1.0, full))), s.qmin, s.qmax)
  return jnp.where(full == 0, 0, q).astype(jnp.int8), stored


def straight_through(x, fq):
  """Exactly fq forward (fq + 0); gradient wrt x is the identity, none through the rounding
  or the range that produced fq. For dynamic grids (activations, KV cache), whose range
  always covers x, so nothing is clipped."""
  return jax.lax.stop_gradient(fq) + (x - jax.lax.stop_gradient(x))


# ---------------------------------------------------------------- int8 KV cache (grid.KV_CACHE)

def fake_quant_kv(x, quant):
  """K or V [B, T, K, Dh] as an int8 KV cache (quant.kv_cache) returns them: symmetric int8,
  one scale per token and head; straight-through gradient. Identity without quant.kv_cache."""
  if quant is None or quant.get('kv_cache') is None:
    return x
  return straight_through(x, grid.fake_quant_act_int8(x))


def kv_cache_entries(k, v, quant) -> dict:
  """New K/V [B, T, K, Dh] as the cache stores them: float {'k', 'v'}, or with an int8 cache
  int8 'k', 'v' and their float32 'k_scale', 'v_scale' [B, T, K, 1]."""
  if quant is None or quant.get('kv_cache') is None:
    return {'k': k, 'v': v}
  (kq, ks), (vq, vs) = grid.quantize_act_int8(k), grid.quantize_act_int8(v)
  return {'k': kq, 'k_scale': ks, 'v': vq, 'v_scale': vs}


def kv_from_cache(cache):
  """(k, v) [B, S, K, Dh] of a cache: dequantized (float32) when it holds int8 + scales,
  the same values fake_quant_kv gives the forward without a cache."""
  if 'k_scale' not in cache:
    return cache['k'], cache['v']
  return cache['k'] * cache['k_scale'], cache['v'] * cache['v_scale']
