"""Building blocks of the decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

Parameters are stored in `param_dtype` (fp32) and cast to the compute dtype at use.
Every parameter carries logical axis names (`axes=`) that sharding/ maps to the mesh.
"""
import functools
import math
import threading

import jax
import jax.numpy as jnp
from flax import nnx

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.moe.dispatch import swiglu_hidden
from mobilemoe_jax.quant import grid, qat
from mobilemoe_jax.sharding import constrain


class QuantScale(nnx.Param):
  """A learnable (LSQ) quantization scale of one weight: trained like any parameter."""


def _matrix_view(w, n_batch: int, n_in: int):
  """[batch..., in..., out...] -> [batch..., in, out]: the [in, out] matrix quantization
  groups run along (the TFLite FC the exporter writes has the same input dim)."""
  s = w.shape
  return w.reshape(*s[:n_batch], math.prod(s[n_batch:n_batch + n_in]), -1)


def add_quant_scale(layer, name: str, quant, n_batch: int = 0, n_in: int = 1):
  """With learnable scales on, gives `layer` a `<name>_scale` parameter (max-abs init).
  Batched matrices (n_batch > 0) are routed experts: qat.weight_grid says their group axis."""
  if quant.weights is not None and quant.learnable_scale:
    w = _matrix_view(getattr(layer, name)[...], n_batch, n_in)
    scale = qat.init_scale(w, quant.weights, **qat.weight_grid(quant, expert=n_batch > 0))
    setattr(layer, name + '_scale', QuantScale(scale, axes=None))


def kernel(layer, name: str, quant, dtype, n_batch: int = 0, n_in: int = 1, scheme=None):
  """`layer.<name>` in the compute dtype, fake-quantized when `quant.weights` is set.
  n_batch leading dims are independent matrices (experts); the next n_in are inputs."""
  w = getattr(layer, name)[...]
  if quant is None or quant.weights is None:
    return w.astype(dtype)
  scale = getattr(layer, name + '_scale', None)
  q = qat.fake_quant(_matrix_view(w, n_batch, n_in), scheme or quant.weights,
                     None if scale is None else scale[...],
                     **qat.weight_grid(quant, expert=n_batch > 0))
  return q.reshape(w.shape).astype(dtype)


def act(x, quant, n_in: int = 1):
  """An integer-weight linear's input as the .tflite sees it: on `quant.activations`' int8
  grid, one scale (and zero point) per row of the last n_in dims; straight-through gradient.
  Identity unless both weights and activations are quantized (the teacher of QAT's
  self-distillation and float models keep float activations)."""
  if quant is None or quant.weights is None or quant.get('activations') is None:
    return x
  rows = x.reshape(*x.shape[:x.ndim - n_in], -1)
  fq = grid.fake_quant_act(rows.astype(jnp.float32), quant.activations).astype(x.dtype)
  return qat.straight_through(x, fq.reshape(x.shape))


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  """A normal(0, std) parameter tagged with logical axes."""
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=('norm',))
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.scale[...], self.eps)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def rms_norm(x, scale, eps: float):
  """rms_normalize(x) * scale (None: no weight, QK-norm), in x's dtype. Rematerialised: the
  backward pass keeps x and recomputes the fp32 rows from it, where autodiff would keep two
  fp32 copies of x per call; the big step is short of memory, not of elementwise passes."""
  y = rms_normalize(x, eps)
  return (y if scale is None else y * scale).astype(x.dtype)


def rms_normalize(x, eps: float):
  """x * rsqrt(mean(x^2) + eps) over the last axis, returned in fp32: bf16 sums of squares
  lose too much precision. Without a weight it is QK-norm (per head, over head_dim)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)


def rope_frequencies(head_dim: int, theta: float, scaling=None):
  """[head_dim / 2] fp32 angular frequencies of the rotary pairs, with `scaling`
  (model.rope_scaling as a dict; None or kind 'none': unscaled).

  'llama3' (Llama 3.1's rule): a pair whose wavelength 2 pi / freq exceeds
  original_max_len / low_freq_factor rotates `factor` times slower; one whose wavelength is
  below original_max_len / high_freq_factor is kept; the band between interpolates smoothly.
  With low == high (the released MobileMoE) the band is empty; it is skipped rather than
  divided by high - low = 0, which would put NaN in the masked-out branch.
  """
  half = head_dim // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling is None or scaling['kind'] == 'none':
    return freq
  if scaling['kind'] != 'llama3':
    raise ValueError(f"model.rope_scaling.kind: unknown scaling {scaling['kind']!r}")
  orig, low, high = scaling['original_max_len'], scaling['low_freq_factor'], scaling['high_freq_factor']
  wavelength = 2 * math.pi / freq
  scaled = jnp.where(wavelength > orig / low, freq / scaling['factor'], freq)
  if high > low:
    smooth = (orig / wavelength - low) / (high - low)
    between = (wavelength >= orig / high) & (wavelength <= orig / low)
    scaled = jnp.where(between, (1 - smooth) * freq / scaling['factor'] + smooth * freq, scaled)
  return scaled


def rope(x, positions, freq):
  """Rotary embedding. x: [B, T, H, Dh]; positions: [B, T]; freq: [Dh/2] (rope_frequencies).

  Half-split (rotate_half) convention: dims i and i + Dh/2 are rotated together by
  positions * freq[i]. The released MobileMoE checkpoints rotate adjacent pairs (2i, 2i+1)
  instead; the same function, with q/k rows permuted within each head. The importer applies
  that permutation and the exporter undoes it (mobilemoe_jax/convert/layout.py), so the
  model has one convention.
  """
  return _rope(x, positions, freq)


def _rotate(x, positions, freq):
  """x rotated by positions * freq (the forward pass of `rope`; with -freq its transpose)."""
  half = x.shape[-1] // 2
  angle = positions[..., None, None].astype(jnp.float32) * freq         # [B, T, 1, Dh/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


@jax.custom_vjp
def _rope(x, positions, freq):
  return _rotate(x, positions, freq)


def _rope_fwd(x, positions, freq):
  return _rotate(x, positions, freq), (positions, freq)


def _rope_bwd(res, g):
  """A rotation's transpose is the rotation by minus the angle: one concatenate pass like
  the forward's, where autodiff of the two half slices writes a pad + add per half."""
  positions, freq = res
  return _rotate(g, positions, -freq), None, None


_rope.defvjp(_rope_fwd, _rope_bwd)


def attention_mask(q_pos, k_pos, q_seg, k_seg, window: int):
  """[B, 1, T, S] bool: causal, same document, inside the sliding window (0 = none).

  Positions are slot indices for the KV cache and in-document positions otherwise;
  either way a key is visible iff it is not in the future and within the window.
  Segment id 0 marks padding, which nothing attends to.
  """
  qp, kp = q_pos[:, :, None], k_pos[:, None, :]
  mask = (kp <= qp) & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
  if window:
    mask &= (qp - kp) < window
  return mask[:, None]


class Attention(nnx.Module):
  """Grouped-query causal self-attention with RoPE (unless `use_rope` is False: a NoPE
  layer), optional QK-norm on RoPE layers and an optional sliding window."""

  def __init__(self, cfg, window: int, rngs: nnx.Rngs, use_rope: bool = True):
    d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    self.q = param(rngs, (d, h, dh), ('embed', 'heads', 'head_dim'), std, pd)
    self.k = param(rngs, (d, kv, dh), ('embed', 'kv_heads', 'head_dim'), std, pd)
    self.v = param(rngs, (d, kv, dh), ('embed', 'kv_heads', 'head_dim'), std, pd)
    self.o = param(rngs, (h, dh, d), ('heads', 'head_dim', 'embed'), std / (2 * cfg.n_layers) ** 0.5, pd)
    self.window = window
    self.use_rope, self.theta, self.rope_scaling = use_rope, cfg.rope_theta, config_lib.rope_scaling(cfg)
    # QK-norm only where RoPE is applied (the release's NoPE layers have neither).
    self.qk_norm_eps = cfg.norm_eps if use_rope and cfg.get('qk_norm', False) else None
    self.dtype = jnp.dtype(cfg.dtype)
    self.cudnn_mask = cfg.attention_mask
    self.cudnn_segments = cfg.get('attention_segments', 0)   # configs saved before the field
    self.kernel = attention_kernel(cfg)
    self.quant = cfg.quant
    for name in ('q', 'k', 'v'):
      add_quant_scale(self, name, cfg.quant)
    add_quant_scale(self, 'o', cfg.quant, n_in=2)

  def __call__(self, x, positions, segment_ids, cache=None):
    """x: [B, T, D]. Without cache: positions/segment_ids [B, T] describe packed documents.
    With cache {'k','v': [B, S, K, Dh] (+ int8 scales, see init_cache), 'end': [B]}: the T
    new tokens go to slots end..end+T-1 and attend to every filled slot before them.
    Returns (y, new_cache)."""
    dt, qc = self.dtype, self.quant
    xq = act(x, qc)
    q = jnp.einsum('btd,dhk->bthk', xq, kernel(self, 'q', qc, dt))
    k = jnp.einsum('btd,dhk->bthk', xq, kernel(self, 'k', qc, dt))
    v = jnp.einsum('btd,dhk->bthk', xq, kernel(self, 'v', qc, dt))
    if self.use_rope:
      freq = rope_frequencies(q.shape[-1], self.theta, self.rope_scaling)
      q, k = rope(q, positions, freq), rope(k, positions, freq)
    if self.qk_norm_eps is not None:
      q = rms_norm(q, None, self.qk_norm_eps)                       # [B, T, H, Dh]
      k = rms_norm(k, None, self.qk_norm_eps)
    if cache is None:
      k, v = qat.fake_quant_kv(k, qc), qat.fake_quant_kv(v, qc)   # as an int8 KV cache would
      mask = attention_mask(positions, positions, segment_ids, segment_ids, self.window)
    else:
      b, t = x.shape[:2]
      write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new, i, 0))
      new = qat.kv_cache_entries(k, v, qc)        # float, or int8 + scales (quant.kv_cache)
      cache = dict(cache, **{n: write(cache[n], a.astype(cache[n].dtype), cache['end'])
                             for n, a in new.items()})
      k, v = qat.kv_from_cache(cache)
      slots = jnp.arange(k.shape[1])[None].repeat(b, 0)                       # [B, S]
      q_slot = cache['end'][:, None] + jnp.arange(t)[None]                     # [B, T]
      mask = attention_mask(q_slot, slots, jnp.ones((b, t), jnp.int32),
                            jnp.ones_like(slots), self.window)
      k, v = k.astype(dt), v.astype(dt)
    q = constrain(q, ('batch', 'length', 'heads', 'head_dim'))
    if self.kernel == 'cudnn' and cache is None:
      y = cudnn_attention(q, k, v, mask, segment_ids, self.window, self.cudnn_mask,
                          self.cudnn_segments)
    else:
      y = jax.nn.dot_product_attention(q, k, v, mask=mask)                    # [B, T, H, Dh]
    return jnp.einsum('bthk,hkd->btd', act(y, qc, n_in=2), kernel(self, 'o', qc, dt, n_in=2)), cache


_DBIAS_LOCK = threading.Lock()


def attention_kernel(cfg) -> str:
  """'cudnn' or 'xla': model.attention_impl with 'auto' resolved (cuDNN on a GPU with a 16-bit
  compute dtype). Decoding with a KV cache uses XLA's either way."""
  impl = cfg.get('attention_impl', 'auto')   # configs saved before the field
  if impl == 'auto':
    gpu = jax.default_backend() == 'gpu'
    return 'cudnn' if gpu and jnp.dtype(cfg.dtype) in (jnp.bfloat16, jnp.float16) else 'xla'
  return impl


def _cudnn_biased(q, k, v, mask, sliding):
  """cuDNN attention with `mask` as an additive bias (large negative where hidden), plus the
  causal/window flags (they let it skip hidden tiles). JAX's wrapper always has cuDNN compute
  the bias's gradient ([B, 1, T, S] in every layer's backward pass) through its module-level
  `should_export_dbias`; that hook answers False while this call is traced (under a lock:
  the benchmark traces steps in threads), so the gradient, which nothing uses (the mask is
  no parameter), is not computed."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  call = lambda: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                              implementation='cudnn', local_window_size=sliding)
  if not hasattr(cudnn, 'should_export_dbias'):
    return call()
  with _DBIAS_LOCK:
    hook = cudnn.should_export_dbias
    cudnn.should_export_dbias = lambda *a, **kw: False
    try:
      return call()
    finally:
      cudnn.should_export_dbias = hook


def segment_runs(segment_ids, max_runs: int):
  """The runs of equal segment ids in each row [B, T] (padding runs too), in cuDNN's packed
  layout: (lengths [B, M], offsets [B, M + 1], overflow [B]) with M = max_runs; lengths and
  first token of each run in order, -1 past a row's last run (and in the extra last column);
  overflow: the row has more than M runs (those past M are missing)."""
  b, t = segment_ids.shape
  starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  run = jnp.cumsum(starts, 1, dtype=jnp.int32) - 1                       # [B, T] run of a token
  rows = jnp.arange(b)[:, None]
  slot = jnp.where(starts & (run < max_runs), run, max_runs + 1)         # out of range: dropped
  offsets = jnp.full((b, max_runs + 1), -1, jnp.int32).at[rows, slot].set(
      jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), mode='drop')
  lengths = jnp.zeros((b, max_runs), jnp.int32).at[rows, run].add(1, mode='drop')
  return jnp.where(lengths > 0, lengths, -1), offsets, run[:, -1] >= max_runs


def _cudnn_segments(q, k, v, segment_ids, max_runs: int, window: int):
  """cuDNN attention over cuDNN's packed layout: each run of equal segment ids is its own
  sequence, causal (and windowed) by token index within it; only the tiles inside a run are
  computed, no [T, S] mask or bias exists. A row with more than max_runs runs gives NaN
  (caught as a non-finite step), never a silently wrong result; the NaN goes into q, whose
  producer (RoPE) it joins in one pass, not into the output, a pass of its own."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  lengths, offsets, overflow = segment_runs(segment_ids, max_runs)
  q = jnp.where(overflow[:, None, None, None], jnp.nan, q).astype(q.dtype)
  return cudnn.dot_product_attention(
      q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
      scale=q.shape[-1] ** -0.5, mask_type=cudnn.MaskType.CAUSAL,
      sliding_window_length=window or None)


def cudnn_attention(q, k, v, mask, segment_ids, window: int, how: str = 'auto',
                    max_segments: int = 0):
  """cuDNN flash attention (GPU, 16-bit): no [T, S] scores in memory. Causal, inside
  `window` (0 = global), within each document of a packed row (model.attention_mask):

  - 'bias_nograd': the documents/padding/window mask as a bias, without the bias gradient
    that JAX's public call has cuDNN compute (nothing uses it).
  - 'causal': the causal/window flags only, no mask: exact only when every row is one
    document without padding (segment ids are ignored).
  - 'segments': cuDNN's packed layout (`_cudnn_segments`), at most `max_segments` runs of
    equal segment ids per row: exact where each document's ids form one run and its
    positions step by one (how the data pipeline packs rows; train.trainer.step_config checks
    it on the host). Tokens of padding (id 0) attend within their run instead of to nothing:
    no real token attends to them either way.
  - 'auto': 'causal' when every row of the batch is one document without padding (checked
    at run time with lax.cond), else 'bias_nograd'. Exact for any rows.
  """
  sliding = (window - 1, 0) if window else None
  if how not in config_lib.CUDNN_MASKS:
    raise ValueError(f'unknown model.attention_mask {how!r}; known: {config_lib.CUDNN_MASKS}')
  if how == 'bias_nograd':
    return _cudnn_biased(q, k, v, mask, sliding)
  if how == 'segments':
    return _cudnn_segments(q, k, v, segment_ids, max_segments, window)

  def causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn',
                                        local_window_size=sliding)
  if how == 'causal':
    return causal(q, k, v)
  single = jnp.all(segment_ids == 1)      # one document (id 1) filling every row
  return jax.lax.cond(single, causal, lambda q, k, v: _cudnn_biased(q, k, v, mask, sliding),
                      q, k, v)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, cfg, hidden: int, rngs: nnx.Rngs):
    d, pd, std = cfg.d_model, jnp.dtype(cfg.param_dtype), cfg.init_std
    self.gate = param(rngs, (d, hidden), ('embed', 'mlp'), std, pd)
    self.up = param(rngs, (d, hidden), ('embed', 'mlp'), std, pd)
    self.down = param(rngs, (hidden, d), ('mlp', 'embed'), std / (2 * cfg.n_layers) ** 0.5, pd)
    self.dtype = jnp.dtype(cfg.dtype)
    self.quant = cfg.quant
    for name in ('gate', 'up', 'down'):
      add_quant_scale(self, name, cfg.quant)

  def __call__(self, x):
    dt, qc = self.dtype, self.quant
    x = act(x, qc)
    h = swiglu_hidden(x, kernel(self, 'gate', qc, dt), kernel(self, 'up', qc, dt), '...d,df->...f')
    h = constrain(h, ('batch', 'length', 'mlp'))
    return act(h, qc) @ kernel(self, 'down', qc, dt)
