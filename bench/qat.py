"""What QAT buys: held-out loss of (a) the float SFT model, (b) its post-training INT4
rounding (PTQ: the same weights on the exporter's grid), (c) the QAT model, and (d) the QAT
model's weights run in float, side by side. The INT4 gap before QAT is b - a, after it c - d.

  python -m mobilemoe_jax.pipeline --workdir=runs/demo      # trains sft/ and qat/ stages
  python -m mobilemoe_jax.train --config=configs/stages/qat.py:tiny --workdir=runs/demo/qat_lsq \
      --config.train.init_from=runs/demo/sft/checkpoints --config.model.quant.learnable_scale=True
  python bench/qat.py --workdir=runs/demo                   # -> bench/results/qat.json

The second command (optional) adds (e) QAT with learned (LSQ) scales, same stage otherwise,
and (f) its weights in float.

Held-out sets (bundled data, never trained on): the held-out corpus documents (all tokens)
and the held-out chats (assistant tokens only, the SFT/QAT objective). PTQ and QAT use the
same grid (model.quant: symmetric INT4, groups of 32, fp16 scales; router float), so (b)
and (c) compute with exactly the integers the exported .tflite holds.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from bench import runinfo  # noqa: E402
from mobilemoe_jax.data import pipeline  # noqa: E402
from mobilemoe_jax.train.loading import load_checkpoint  # noqa: E402
from mobilemoe_jax.model import Transformer  # noqa: E402
from mobilemoe_jax.model.layers import QuantScale  # noqa: E402
from mobilemoe_jax.quant import grid  # noqa: E402
from mobilemoe_jax.quant.extract import integer_weights  # noqa: E402


@nnx.jit
def ce_sum(model, batch):
  logits, _, _ = model(batch['inputs'], positions=batch['positions'],
                       segment_ids=batch['segment_ids'])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  return jnp.sum(ce * batch['loss_mask']), jnp.sum(batch['loss_mask'])


def held_out_loss(model, data_config, seq_len: int, max_batches: int) -> float:
  total, count = 0.0, 0.0
  ds = pipeline.make_dataset(data_config, seq_len=seq_len, batch_size=16, seed=0)
  for i, batch in enumerate(ds):
    if i == max_batches:
      break
    c, n = jax.device_get(ce_sum(model, {k: jnp.asarray(v) for k, v in batch.items()}))
    total, count = total + float(c), count + float(n)
  return total / max(count, 1.0)


def with_quant(model, scheme):
  """The same parameters with fake quantization on `scheme` (None: the float forward)."""
  cfg = model.cfg.copy_and_resolve_references()
  cfg.quant.weights = scheme
  cfg.quant.embedding = scheme or cfg.quant.embedding
  cfg.quant.learnable_scale = False
  quantized = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  nnx.update(quantized, nnx.state(model, nnx.Not(QuantScale)))   # learned scales dropped
  return quantized


def scale_drift(model) -> dict:
  """How far learned (LSQ) scales, as stored, moved from the max-abs scales of the final
  weights: quantiles of |learned / max-abs - 1| over all groups (the embedding has none)."""
  state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  ratios = []
  for path, e in integer_weights(model).items():
    if path == ('embed',):
      continue
    s = np.asarray(e['scales'])
    w = np.asarray(state[path][...]).reshape(*s.shape[:-2], -1, s.shape[-1])
    ratios.append(np.abs(s / grid.scales(w, model.cfg.quant.weights, -2) - 1).ravel())
  r = np.concatenate(ratios)
  return {f'q{round(q * 100)}': float(np.quantile(r, q)) for q in (0.5, 0.9, 0.99)}


def markdown_table(result: dict) -> str:
  """The README table: each model's held-out loss per set (lettered in the order measured),
  then the INT4 gaps."""
  rows, gaps = result['loss'], result['quantization_gap']
  sets = list(next(iter(rows.values())))
  out = ['| model | ' + ' | '.join(f'{s} loss' for s in sets) + ' |', '|---|' + '---|' * len(sets)]
  out += [f'| ({chr(ord("a") + i)}) {n} | ' + ' | '.join(f'{rows[n][s]:.4f}' for s in sets) + ' |'
          for i, n in enumerate(rows)]
  for key, label in (('ptq', 'before QAT (b - a)'), ('after_qat', 'after QAT (c - d)'),
                     ('after_lsq_qat', 'after LSQ QAT (e - f)')):
    if key in gaps[sets[0]]:
      out.append(f'| INT4 gap {label} | ' + ' | '.join(f'{gaps[s][key]:+.4f}' for s in sets) + ' |')
  return '\n'.join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--workdir', default='runs/demo')
  ap.add_argument('--data_dir', default='data')
  ap.add_argument('--seq_len', type=int, default=128)
  ap.add_argument('--max_batches', type=int, default=32)
  ap.add_argument('--lsq', default='qat_lsq', help='stage dir (under --workdir) of a QAT run with '
                  'learned scales (model.quant.learnable_scale); its rows are added when it exists')
  ap.add_argument('--out', default='bench/results/qat.json')
  ap.add_argument('--table', action='store_true', help='print the README table of --out')
  a = ap.parse_args(argv)
  if a.table:
    return print(markdown_table(runinfo.read_results(a.out)))

  start = time.time()
  sft = load_checkpoint(os.path.join(a.workdir, 'sft', 'checkpoints')).model
  qat = load_checkpoint(os.path.join(a.workdir, 'qat', 'checkpoints')).model
  scheme = qat.cfg.quant.weights
  if scheme is None:
    raise SystemExit(f'{a.workdir}/qat was not trained with fake quantization (model.quant.weights)')
  models = {'float (SFT)': sft, f'PTQ {scheme} (SFT rounded)': with_quant(sft, scheme),
            f'QAT {scheme}': qat, 'QAT weights, float forward': with_quant(qat, None)}
  lsq_dir = os.path.join(a.workdir, a.lsq, 'checkpoints')
  drift = None
  if os.path.isdir(lsq_dir):
    lsq = load_checkpoint(lsq_dir).model
    models.update({f'QAT {scheme}, learned scales (LSQ)': lsq,
                   'LSQ weights, float forward': with_quant(lsq, None)})
    drift = scale_drift(lsq)
  sets = {'held-out corpus': pipeline.bundled_data_config(a.data_dir, 'eval'),
          'held-out chats (assistant tokens)': pipeline.bundled_data_config(a.data_dir, 'sft_eval')}
  rows = {}
  for name, model in models.items():
    rows[name] = {s: held_out_loss(model, cfg, a.seq_len, a.max_batches) for s, cfg in sets.items()}
    print(name, {s: round(v, 4) for s, v in rows[name].items()}, flush=True)
  names = list(models)
  # The quantization gap = INT4 loss - the same weights' float loss. QAT also trains 150 more
  # steps (on the SFT chats), so comparing QAT with the float SFT model mixes two effects;
  # comparing each INT4 model with its own float weights isolates the rounding.
  gaps = {s: {'ptq': rows[names[1]][s] - rows[names[0]][s],
              'after_qat': rows[names[2]][s] - rows[names[3]][s]} for s in sets}
  if drift is not None:
    for s in sets:
      gaps[s]['after_lsq_qat'] = rows[names[4]][s] - rows[names[5]][s]
  result = {
      'workdir': a.workdir, 'scheme': scheme, 'seq_len': a.seq_len, 'max_batches': a.max_batches,
      'loss': rows, 'ppl': {n: {s: math.exp(v) for s, v in r.items()} for n, r in rows.items()},
      'quantization_gap': gaps,
      'lsq_scale_drift_from_max_abs': drift,
      'seconds': round(time.time() - start, 1),
      **runinfo.run_record('bench/qat.py', gpu=False),   # command, date, commit, machine
  }
  runinfo.write_results(a.out, result)
  print(markdown_table(result))
  if drift is not None:
    print(f'LSQ scales vs max-abs of the final weights, |ratio - 1| quantiles: {drift}')

if __name__ == '__main__':
  main()
