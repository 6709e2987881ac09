"""The integer grids, defined once: used by QAT (fake-quant, through jax.numpy) and by the
exporter (numpy), and bit-identical to what ai-edge-quantizer writes into the `.tflite`.

Weights: symmetric, no zero point, one scale per output channel and group of G inputs.
  scale = max(max|w_group|, 1e-9) / qmax       qmax = 7 (int4) or 127 (int8)
  block-wise scales are rounded to bf16 and then fp16 (the flatbuffer stores fp16 scales,
  and ai-edge-quantizer rounds through bf16 first to keep 7 mantissa bits)
  q = clip(round_half_even(w / scale), qmin, qmax)
  qmin = -8 for int4 (the full range: kernels unpack int4 to int8, no narrow-range need),
  qmin = -127 for int8 (narrow range, as TFLite's int8 kernels assume).
These rules are read from ai_edge_quantizer's `uniform_quantize_tensor.py` and checked
against real flatbuffers in tests/test_quant_grid.py.

Layout: `in_axis` names the axis the groups run along: the input (reduction) dimension for
TFLite FCs, whose weights are [out, in] (in_axis=-1, the default); our Flax kernels are
[in, out] (in_axis=-2 or 0). Scales keep the weight's rank with that axis shrunk to n/G
groups (1 for channel-wise). The released MobileMoE's routed experts group along their
OUTPUT axis instead (model.quant.expert_group_axis='out': in_axis=-1 on [in, out]).

Scale rules (model.quant.scale_rule):
- 'tflite' (above): max / qmax, block scales rounded through bf16 to fp16.
- 'release': the released MobileMoE's QAT rule (arXiv 2605.27358, eq. 6):
    scale = fp16(2 * max(max|w_group|, 1e-9) / (2^bits - 1))     (int4: 2 max / 15)
  rounded straight to fp16 (the checkpoint's scale dtype), channel-wise scales included;
  q = clip(round_half_even(w / scale), qmin, qmax) as above.

Activations (measured, not assumed: tests/test_quant_grid.py runs one INT4/INT8 FC through
ai-edge-litert 2.3 and inverts it): the .tflite's FCs quantize their input at run time, one
row (= token) at a time, on one of two int8 grids:
- 'int8_dynamic' (stock LiteRT: XNNPACK's qd8 kernels, which the default interpreter uses for
  every INT4 block-32, INT4 channel-wise and INT8 FC): asymmetric with a zero point.
    rmin = min(row, 0), rmax = max(row, 0), inv = 255 / (rmax - rmin)   (1 if rmin == rmax)
    zp = round_half_even(clip(-128 - rmin * inv, -128, 127))      (XNNPACK's "nudged" form)
    q = clip(round_half_even(x * inv) + zp, -128, 127),  x ~= (q - zp) / inv
  Bit-exact with the kernel's integers (fp32 arithmetic as here): 51,200 probed values per
  weight type (INT4 block-32, INT4 channel-wise, INT8) once; the test checks 7,680. Our
  delegate's int8 mode (MobileMoeBlock experts) uses this grid too.
- 'int8_dynamic_sym': symmetric, q = round_half_even(x * 127 / amax) in [-127, 127]: TFLite's
  builtin kernels without XNNPACK for channel-wise weights (FC option
  asymmetric_quantize_inputs = False).
"""
from typing import NamedTuple

import numpy as np

SCALE_FLOOR = 1e-9  # ai-edge-quantizer's lower bound on the range: no zero scales


class Scheme(NamedTuple):
  bits: int    # 4 or 8
  group: int   # inputs per scale; 0 = channel-wise (one scale per output channel)

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1

  @property
  def qmin(self) -> int:
    return -self.qmax if self.bits >= 8 else -self.qmax - 1


SCHEMES = {
    'int4_g32': Scheme(4, 32),
    'int4_g64': Scheme(4, 64),
    'int4_g128': Scheme(4, 128),
    'int4_channel': Scheme(4, 0),
    'int8_channel': Scheme(8, 0),
}


def get_scheme(scheme) -> Scheme:
  if isinstance(scheme, Scheme):
    return scheme
  if scheme not in SCHEMES:
    raise ValueError(f'unknown quantization scheme {scheme!r}; known: {sorted(SCHEMES)}')
  return SCHEMES[scheme]


def _xp(x):
  """numpy for numpy inputs, jax.numpy otherwise (tracers included)."""
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return np
  import jax.numpy as jnp
  return jnp


def _div(a, b):
  """a / b rounded as IEEE division. XLA rewrites `x / broadcast(y)` into `x * (1 / y)`,
  one ulp off numpy (and ai-edge-quantizer); a data-dependent zero keeps a true divide."""
  if _xp(a) is np and _xp(b) is np:
    return a / b
  return a / (b + a * 0)


def _grouped(w, scheme: Scheme, in_axis: int):
  """Moves the input axis last and splits it: [..., n_groups, G]."""
  xp = _xp(w)
  w = xp.moveaxis(w, in_axis, -1)
  k = w.shape[-1]
  g = scheme.group or k
  if k % g:
    raise ValueError(f'group size {g} does not divide the input dimension {k} '
                     f'(weight shape {tuple(xp.moveaxis(w, -1, in_axis).shape)}, in_axis={in_axis})')
  return w.reshape(*w.shape[:-1], k // g, g)


RULES = ('tflite', 'release')   # model.quant.scale_rule; see the module docstring


def scales(w, scheme='int4_g32', in_axis: int = -1, rule: str = 'tflite'):
  """float32 scales: the shape of w with the group axis replaced by its number of groups."""
  s = get_scheme(scheme)
  xp = _xp(w)
  g = _grouped(w.astype(xp.float32), s, in_axis)
  amax = xp.maximum(xp.max(xp.abs(g), axis=-1), xp.float32(SCALE_FLOOR))
  if rule == 'release':
    scale = _div(amax * xp.float32(2), xp.float32(2 ** s.bits - 1))
  else:
    scale = _div(amax, xp.float32(s.qmax))
  return xp.moveaxis(stored_scale(scale, s, rule), -1, in_axis)


def stored_scale(scale, scheme, rule: str = 'tflite'):
  """A float32 scale rounded as the file stores it: 'tflite' block scales through bf16 to
  fp16 (channel-wise ones stay fp32), 'release' scales to fp16."""
  s = get_scheme(scheme)
  if rule not in RULES:
    raise ValueError(f'unknown scale rule {rule!r}; known: {RULES}')
  if rule == 'tflite' and not s.group:
    return scale
  if _xp(scale) is np:
    import ml_dtypes
    x = scale.astype(np.float32)
    x = x.astype(ml_dtypes.bfloat16) if rule == 'tflite' else x
    return x.astype(np.float16).astype(np.float32)
  import jax.numpy as jnp
  x = scale.astype(jnp.bfloat16) if rule == 'tflite' else scale
  return x.astype(jnp.float16).astype(jnp.float32)


def _expand(scale, shape, in_axis: int):
  """Repeats per-group scales along the input axis to the weight's shape."""
  xp = _xp(scale)
  k, n = shape[in_axis], scale.shape[in_axis]
  return xp.repeat(scale, k // n, axis=in_axis)


def quantize(w, scheme='int4_g32', in_axis: int = -1, rule: str = 'tflite'):
  """w float -> (q int8 with values in [qmin, qmax], float32 scales)."""
  s = get_scheme(scheme)
  xp = _xp(w)
  w = w.astype(xp.float32)
  scale = scales(w, s, in_axis, rule)
  full = _expand(scale, w.shape, in_axis)
  q = xp.clip(xp.round(_div(w, xp.where(full == 0, xp.float32(1), full))), s.qmin, s.qmax)
  # A block scale below fp16's range rounds to 0: ai-edge-quantizer then writes 0/0 cast to
  # int (undefined). Any integer dequantizes to 0 there; we pick 0.
  q = xp.where(full == 0, 0, q)
  return q.astype(xp.int8), scale


def dequantize(q, scale, in_axis: int = -1):
  """(q, scales) -> float32 weight: q * scale of its group."""
  xp = _xp(q)
  return q.astype(xp.float32) * _expand(scale, q.shape, in_axis)


def fake_quant(w, scheme='int4_g32', in_axis: int = -1, rule: str = 'tflite'):
  """dequantize(quantize(w)): the weight the exported model computes with. No STE here:
  QAT wraps this in its own straight-through estimator."""
  return dequantize(*quantize(w, scheme, in_axis, rule), in_axis)


def quantize_act_int8(x):
  """Dynamic per-token int8: x [..., D] -> (q int8, scale [..., 1]).
  Multiplies by 127/amax (the builtin kernels' symmetric form); all-zero rows get scale 0
  and q 0."""
  xp = _xp(x)
  x = x.astype(xp.float32)
  amax = xp.max(xp.abs(x), axis=-1, keepdims=True)
  safe = xp.where(amax > 0, amax, xp.float32(1))
  inv = xp.where(amax > 0, xp.float32(127) / safe, xp.float32(0))
  q = xp.clip(xp.round(x * inv), -127, 127).astype(xp.int8)
  return q, _div(amax, xp.float32(127))


def fake_quant_act_int8(x):
  q, s = quantize_act_int8(x)
  return (q.astype(s.dtype) * s).astype(x.dtype)


def quantize_act_int8_asym(x):
  """XNNPACK's dynamic per-row int8 (qd8): x [..., D] -> (q int8, zero point [..., 1],
  inv [..., 1]) with x ~= (q - zp) / inv. See the module docstring."""
  xp, f32 = _xp(x), np.float32
  x = x.astype(f32)
  rmin = xp.minimum(xp.min(x, axis=-1, keepdims=True), f32(0))
  rmax = xp.maximum(xp.max(x, axis=-1, keepdims=True), f32(0))
  span = rmax - rmin
  inv = xp.where(span > 0, _div(span * 0 + f32(255), xp.where(span > 0, span, f32(1))), f32(1))
  # XNNPACK picks the zero point from the end with the smaller rounding error; in fp32 the
  # two candidates can differ by an ulp, so the same rule is followed.
  from_min, from_max = f32(-128) - rmin * inv, f32(127) - rmax * inv
  zp = xp.where((f32(-128) + rmin * inv) + (f32(127) + rmax * inv) > 0, from_min, from_max)
  zp = xp.round(xp.clip(zp, -128, 127))
  q = xp.clip(xp.round(x * inv) + zp, -128, 127)
  return q.astype(xp.int8), zp, inv


ACTIVATIONS = ('int8_dynamic', 'int8_dynamic_sym')

# KV cache grids (model.quant.kv_cache). 'int8': quantize_act_int8 on each K/V vector
# [..., head_dim]: symmetric int8, one scale per token and KV head. Per token because the
# cache is append-only (a token's scale never changes once written, unlike per-channel
# scales over tokens); per head because heads differ in range; symmetric so reading is one
# multiply. Scales are fp32: 4 bytes per head_dim (64) int8 values, 1.06 bytes per value.
KV_CACHE = ('int8',)


def fake_quant_act(x, scheme='int8_dynamic'):
  """x [..., D] float -> the values an FC of the .tflite multiplies with (see ACTIVATIONS),
  in x's dtype, computed in fp32. No STE here (model/layers.py adds it)."""
  if scheme == 'int8_dynamic_sym':
    return fake_quant_act_int8(x)
  if scheme != 'int8_dynamic':
    raise ValueError(f'unknown activation quantization {scheme!r}; known: {ACTIVATIONS}')
  q, zp, inv = quantize_act_int8_asym(x)
  return ((q.astype(inv.dtype) - zp) * _div(inv * 0 + 1, inv)).astype(x.dtype)


def pack_int4(q):
  """int4 values [..., K] (K even) -> uint8 [..., K/2], low nibble first (TFLite's order)."""
  q = np.asarray(q)
  if q.shape[-1] % 2:
    raise ValueError(f'int4 packing needs an even last dimension, got shape {q.shape}')
  if q.size and (q.min() < -8 or q.max() > 7):
    raise ValueError('int4 values must lie in [-8, 7]')
  nib = (q.astype(np.int16) & 0xF).astype(np.uint8)
  return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed, n=None):
  """uint8 [..., K/2] -> int8 [..., K]; n trims a padded odd length (flat tensors)."""
  p = np.asarray(packed).view(np.uint8)
  q = np.stack([p & 0xF, p >> 4], -1).reshape(*p.shape[:-1], -1).astype(np.int8)
  q = np.where(q >= 8, q - 16, q).astype(np.int8)
  return q if n is None else q[..., :n]
