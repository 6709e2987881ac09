"""cuDNN attention against XLA's in the model's Attention layer, on a GPU: errors and time.

At MobileMoE-S's attention shape (12 query / 4 KV heads of 64, d_model 768), bf16, on
packed rows (several documents, padding), a global and a windowed (512) layer: the largest
differences of outputs (real tokens) and of input gradients from an fp32 XLA reference, for
XLA in bf16 and cuDNN with each model.attention_mask mode; then the attention op alone,
forward + backward, batch 8 x 2048, one document per row and packed rows (as
bench/train_throughput.py packs them), timed per call.

  python bench/attention_check.py      # a GPU -> bench/results/attention_check.json
  python bench/attention_check.py --table
"""
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, ROOT)
from bench import runinfo  # noqa: E402

OUT = os.path.join(ROOT, 'bench', 'results', 'attention_check.json')


def attention_check():
  """cuDNN attention (model.attention_impl='cudnn') against XLA's in the model's Attention
  layer at the S preset's shape: packed rows (several documents, padding), a global and a
  windowed layer, bf16. Reports the largest differences of outputs (real tokens) and of
  input gradients, next to bf16 XLA's own distance from an fp32 XLA reference."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from bench.train_throughput import _imports
  _imports()   # the presets import the data pipeline: stand-ins where grain is not installed
  from configs.stages.common import PRESETS
  from mobilemoe_jax.model import layers
  b, t = 4, 2048
  seg = np.zeros((b, t), np.int32)
  pos = np.zeros((b, t), np.int32)
  for row, lengths in enumerate([[2048], [700, 900, 400], [1500, 500], [300, 300, 1000]]):
    start = 0
    for i, n in enumerate(lengths):   # the last row ends with 48 padding tokens
      seg[row, start:start + n], pos[row, start:start + n] = i + 1, np.arange(n)
      start += n
  x = jax.random.normal(jax.random.key(0), (b, t, 768), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (b, t, 768), jnp.float32) * (seg > 0)[..., None]
  out = {}
  for window in (0, 512):
    res = {}
    # cudnn_nograd: the mask as a bias without its gradient (model.attention_mask
    # 'bias_nograd'); cudnn_auto: 'auto', which on these packed rows takes the 'bias_nograd'
    # branch at run time (lax.cond). The XLA rows ignore the mask mode.
    for key, impl, dtype, how in (('xla_float32', 'xla', 'float32', 'auto'),
                                  ('xla_bfloat16', 'xla', 'bfloat16', 'auto'),
                                  ('cudnn_nograd_bfloat16', 'cudnn', 'bfloat16', 'bias_nograd'),
                                  ('cudnn_auto_bfloat16', 'cudnn', 'bfloat16', 'auto'),
                                  ('cudnn_segments_bfloat16', 'cudnn', 'bfloat16', 'segments')):
      cfg = PRESETS['mobilemoe_s']().model
      # 'segments': cuDNN's packed layout, at most 4 runs per row (the last row's 3 + padding)
      cfg.update(dict(attention_impl=impl, dtype=dtype, attention_mask=how, attention_segments=4))
      layer = layers.Attention(cfg, window, nnx.Rngs(0))

      def loss(x):
        y, _ = layer(x.astype(dtype), jnp.asarray(pos), jnp.asarray(seg))
        return jnp.sum(y.astype(jnp.float32) * w), y.astype(jnp.float32)
      try:
        (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
      except Exception as e:  # noqa: BLE001
        res[key] = f'{type(e).__name__}: {str(e)[:300]}'
        continue
      # real tokens only: padding queries differ between the paths (and carry no loss), and
      # so do the gradients that reach padding positions.
      res[key] = (np.asarray(y) * (seg > 0)[..., None], np.asarray(g) * (seg > 0)[..., None])
    ref_y, ref_g = res['xla_float32']
    err = lambda a, r: float(np.abs(a - r).max() / np.abs(r).max())
    out[f'window_{window}'] = {
        f'{k}_vs_xla_float32': {'output_max_rel_err': err(v[0], ref_y), 'grad_max_rel_err': err(v[1], ref_g)}
        if isinstance(v, tuple) else v for k, v in res.items() if k != 'xla_float32'}
    print(f'window {window}: {out[f"window_{window}"]}')
  # Time of the attention op alone (forward + backward, batch 8 x 2048, 12 heads / 4 KV heads
  # of 64, bf16): XLA with the mask, cuDNN with the mask as the model calls it (no bias
  # gradient; 'auto'), JAX's public cuDNN call with the mask (which has cuDNN compute the bias
  # gradient too), and cuDNN with only the causal/window flags (exact for one document per
  # row only).
  b8 = 8
  q = jax.random.normal(jax.random.key(2), (b8, t, 12, 64), jnp.bfloat16)
  kv = jax.random.normal(jax.random.key(3), (2, b8, t, 4, 64), jnp.bfloat16)
  p8 = jnp.broadcast_to(jnp.arange(t), (b8, t))
  s8 = jnp.ones((b8, t), jnp.int32)
  timing = {}

  def time_calls(prefix, calls):
    """Median ms of 10 jitted forward + backward calls of each fn(q, k, v) (or its error)."""
    for impl, fn in calls.items():
      step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
      try:
        jax.block_until_ready(step(q, kv[0], kv[1]))
      except Exception as e:  # noqa: BLE001
        timing[f'{prefix}/{impl}'] = f'{type(e).__name__}: {str(e)[:300]}'
        continue
      ts = []
      for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(step(q, kv[0], kv[1]))
        ts.append(time.perf_counter() - t0)
      timing[f'{prefix}/{impl}'] = round(1e3 * statistics.median(ts), 3)

  for window in (0, 512):
    mask = layers.attention_mask(p8, p8, s8, s8, window)
    lw = (window - 1, 0) if window else None
    time_calls(f'window_{window}', {
        'cudnn_mask_nograd': lambda q, k, v: layers.cudnn_attention(q, k, v, mask, s8, window, 'bias_nograd'),
        'cudnn_auto': lambda q, k, v: layers.cudnn_attention(q, k, v, mask, s8, window, 'auto'),
        'xla_mask': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask),
        'cudnn_mask': lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=True, implementation='cudnn', local_window_size=lw),
        'cudnn_flags_only': lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation='cudnn', local_window_size=lw)})
  # Packed rows (as the training benchmark packs them): the mask as a bias (no gradient)
  # against cuDNN's packed layout.
  from bench.train_throughput import packed_rows
  from mobilemoe_jax.train.trainer import packed_runs
  rows = packed_rows(np.random.default_rng(0), b8, t, 1000)
  max_runs = 1 << (packed_runs(rows['segment_ids'], rows['positions']) - 1).bit_length()
  sp, pp = jnp.asarray(rows['segment_ids']), jnp.asarray(rows['positions'])
  for window in (0, 512):
    mask = layers.attention_mask(pp, pp, sp, sp, window)
    time_calls(f'packed_window_{window}', {
        'cudnn_mask_nograd': lambda q, k, v: layers.cudnn_attention(q, k, v, mask, sp, window, 'bias_nograd'),
        'cudnn_segments': lambda q, k, v: layers.cudnn_attention(q, k, v, None, sp, window,
                                                                 'segments', max_runs)})
  print(f'attention fwd+bwd ms per layer: {timing}')
  return {'errors_relative_to_max': out,
          'rows': 'packed: [2048], [700, 900, 400], [1500, 500], [300, 300, 1000] + 48 padding',
          'attention_fwd_bwd_ms_per_layer_batch8': timing}


def markdown_tables(res: dict) -> str:
  """bench/README.md's two tables: errors against fp32 (cuDNN's modes in one cell when they
  agree), and ms per call, the fastest of a packed row in bold."""
  e = lambda x: re.sub(r'e-0?(\d)', r'e-\1', f'{x:.1e}')
  modes = ('cudnn_nograd', 'cudnn_auto', 'cudnn_segments')

  def cell(errs, key):
    cudnn = sorted({e(errs[f'{m}_bfloat16_vs_xla_float32'][key]) for m in modes})
    return f"{e(errs['xla_bfloat16_vs_xla_float32'][key])} / {', '.join(cudnn)}"
  out = ['| layer | output: XLA bf16 / cuDNN (`bias_nograd`, `auto`, `segments`) '
         '| input gradient: XLA bf16 / cuDNN (those modes) |', '|---|---|---|']
  for window, errs in res['errors_relative_to_max'].items():
    name = 'global' if window == 'window_0' else window.replace('_', ' ')
    out.append(f"| {name} | {cell(errs, 'output_max_rel_err')} | {cell(errs, 'grad_max_rel_err')} |")
  t = res['attention_fwd_bwd_ms_per_layer_batch8']
  cols = ('xla_mask', 'cudnn_mask_nograd', 'cudnn_flags_only', 'cudnn_segments')
  out += ['', '| rows | XLA, mask | cuDNN, mask as bias (no gradient) | cuDNN, flags only (`causal`) '
          '| cuDNN, packed layout (`segments`) |', '|---|---|---|---|---|']
  for packed in (False, True):
    for window in (0, 512):
      row = {c: t.get(f"{'packed_' if packed else ''}window_{window}/{c}") for c in cols}
      best = min(v for v in row.values() if v is not None)
      cells = ['- (inexact)' if packed and c == 'cudnn_flags_only' else '-' if v is None
               else f'**{v:.2f}**' if packed and v == best else f'{v:.2f}' for c, v in row.items()]
      name = f"{'packed' if packed else 'one document'}, {'global' if window == 0 else f'window {window}'}"
      out.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(out)


if __name__ == '__main__':
  if sys.argv[1:] == ['--table']:
    print(markdown_tables(runinfo.read_results(OUT)))
    sys.exit()
  record = dict(runinfo.run_record('bench/attention_check.py', gpu=True), **attention_check())
  with open(OUT, 'w') as f:
    json.dump(record, f, indent=1)
  print(f'wrote {OUT}')
