"""Tables and plots of a seeded sweep (records with 'run' and 'seed', as `sweep.py
--in_process` writes them): every number is a mean over seeds with its spread.

  python -m mobilemoe_jax.scaling.study bench/results/scaling_h200.jsonl --plots docs/figures

Run names are `d{width}_{shape}_s{steps}` (sweep._h200_run). Against dense, each shape's
difference is reported two ways: the difference of the seed means with its standard error
(sqrt(sd_a^2/n_a + sd_b^2/n_b)), and paired by seed (seed s of both saw the same batches in the
same order), as the mean and standard error of the per-seed differences.
"""
import argparse
import math
import os

import numpy as np

from mobilemoe_jax.scaling import law


def parse_run(run: str) -> tuple[int, str, int, str]:
  """'d128_e16k4_s800' -> (128, 'e16k4', 800, ''); 'd256_dense_s800_lr0.001' -> (..., 'lr0.001')."""
  parts = run.split('_')
  if len(parts) not in (3, 4) or parts[0][0] != 'd' or parts[2][0] != 's':
    raise ValueError(f'run name {run!r} is not d{{width}}_{{shape}}_s{{steps}}[_{{variant}}]')
  return int(parts[0][1:]), parts[1], int(parts[2][1:]), (parts[3] if len(parts) == 4 else '')


def summarize(records) -> dict:
  """{run: {'width', 'shape', 'steps', 'tokens', 'N', 'S', 'G', 'n', 'mean', 'sd',
  'by_seed': {seed: loss}}}; records of runs that went non-finite are refused."""
  out = {}
  for r in records:
    if r.get('bad_step'):
      raise ValueError(f"{r['name']}: non-finite at step {r['bad_step']}; its loss is not a result")
    run = r['run']
    d, shape, _, variant = parse_run(run)
    steps = r['steps']
    s = out.setdefault(run, {'width': d, 'shape': shape, 'steps': steps, 'variant': variant,
                             'tokens': r['tokens'],
                             'N': r['active_params'], 'S': r['total_params'] / r['active_params'],
                             'G': r['granularity'], 'by_seed': {}})
    s['by_seed'][r['seed']] = r['loss']
  for s in out.values():
    x = np.array(list(s['by_seed'].values()))
    s['n'], s['mean'] = len(x), float(x.mean())
    s['sd'] = float(x.std(ddof=1)) if len(x) > 1 else float('nan')
  return out


def versus(a: dict, b: dict) -> dict:
  """Shape a minus shape b: unpaired (means) and paired (same seeds) differences."""
  diff = a['mean'] - b['mean']
  se = math.sqrt(a['sd'] ** 2 / a['n'] + b['sd'] ** 2 / b['n'])
  common = sorted(set(a['by_seed']) & set(b['by_seed']))
  d = np.array([a['by_seed'][s] - b['by_seed'][s] for s in common])
  paired_se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float('nan')
  return {'diff': diff, 'se': se, 'paired_mean': float(d.mean()) if len(d) else float('nan'),
          'paired_se': paired_se, 'wins': int((d < 0).sum()), 'pairs': len(d)}


def table(summary: dict, baseline: str = 'dense') -> str:
  """Markdown: per (width, steps), every shape's mean +- sd over seeds and its difference from
  the baseline shape of the same width and steps."""
  rows = ['| width | steps (tokens) | shape | S | G | seeds | held-out loss mean +- sd | '
          f'minus {baseline}: means +- se | paired by seed +- se | seeds lower |',
          '|---|---|---|---:|---:|---:|---:|---:|---:|---:|']
  keyed = sorted(summary.values(), key=lambda s: (s['width'], s['variant'], -s['steps'],
                                                  s['shape'] != baseline, s['S'], s['G'], s['shape']))
  for s in keyed:
    base = next((b for b in summary.values() if b['shape'] == baseline and
                 (b['width'], b['steps'], b['variant']) == (s['width'], s['steps'], s['variant'])), None)
    cells = ['', '', '']
    if base is not None and s is not base:
      v = versus(s, base)
      cells = [f"{v['diff']:+.4f} +- {v['se']:.4f}", f"{v['paired_mean']:+.4f} +- {v['paired_se']:.4f}",
               f"{v['wins']}/{v['pairs']}"]
    width = f"d{s['width']}" + (f" {s['variant']}" if s['variant'] else '')
    rows.append(f"| {width} | {s['steps']} ({s['tokens'] / 1e6:.2f}M) | {s['shape']} | "
                f"{s['S']:.2f} | {s['G']:.2f} | {s['n']} | {s['mean']:.4f} +- {s['sd']:.4f} | "
                + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def plot_width(summary: dict, steps: int, shapes, path: str):
  """Held-out loss vs active non-embedding parameters at one token budget, one line per
  shape, error bars = sd over seeds."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4.6, 3.6), dpi=110)
  for i, shape in enumerate(shapes):
    pts = sorted((s['N'], s['mean'], s['sd']) for s in summary.values()
                 if s['shape'] == shape and s['steps'] == steps and not s['variant'])
    if pts:
      n, m, sd = map(np.array, zip(*pts))
      ax.errorbar(n * (1 + 0.03 * (i - len(shapes) / 2)), m, yerr=sd, marker='o', ms=3,
                  capsize=2, lw=1, label=shape)
  for s in summary.values():   # variants (another learning rate) as separate points
    if s['variant'] and s['steps'] == steps:
      ax.errorbar([s['N']], [s['mean']], yerr=[s['sd']], marker='x', ms=6, capsize=2, color='k',
                  ls='none', label=f"{s['shape']}, {s['variant']}")
  ax.set_xscale('log')
  dense = sorted({(s['N'], s['width']) for s in summary.values() if s['shape'] == 'dense'})
  ax.set_xticks([n for n, _ in dense], [f'd{w}\n{n / 1e6:.2f}M' for n, w in dense], fontsize=7)
  ax.minorticks_off()
  ax.set_xlabel('width, active non-embedding parameters')
  ax.set_ylabel('held-out loss (nats/token)')
  ax.set_title(f'equal active FFN per width, {steps} steps, lr 3e-3 unless marked;\n'
               'bars: sd over seeds', fontsize=8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_shapes(summary: dict, width: int, steps: int, path: str, baseline: str = 'dense'):
  """Every shape at one width and budget: loss minus dense, paired by seed, +- its se."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  base = summary[f'd{width}_{baseline}_s{steps}']
  shapes = sorted((s for s in summary.values() if s['width'] == width and s['steps'] == steps
                   and not s['variant'] and s is not base), key=lambda s: (s['S'], s['G'], s['shape']))
  v = [versus(s, base) for s in shapes]
  fig, ax = plt.subplots(figsize=(4.8, 3.4), dpi=110)
  y = np.arange(len(shapes))
  ax.errorbar([x['paired_mean'] for x in v], y, xerr=[2 * x['paired_se'] for x in v], fmt='o',
              capsize=3)
  ax.axvline(0, color='k', lw=0.8)
  ax.set_yticks(y, [f"{s['shape']} (S {s['S']:.1f}, G {s['G']:.1f})" for s in shapes], fontsize=7)
  ax.set_xlabel(f'held-out loss minus {baseline} (paired by seed; bars: 2 se)', fontsize=8)
  ax.set_title(f'd{width}, {steps} steps, equal active FLOPs', fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def main(argv=None):
  ap = argparse.ArgumentParser(description='Seed-averaged tables and plots of a seeded sweep.')
  ap.add_argument('records')
  ap.add_argument('--plots', default='', help='directory for scaling_h200_*.png')
  ap.add_argument('--steps', type=int, default=800, help='token budget (steps) of the plots')
  ap.add_argument('--width', type=int, default=128, help='width of the all-shapes plot')
  a = ap.parse_args(argv)
  summary = summarize(law.load_records(a.records))
  print(table(summary))
  if a.plots:
    os.makedirs(a.plots, exist_ok=True)
    print(plot_width(summary, a.steps, ['dense', 'e8k2', 'e16k4', 'e8k1s1'],
                     os.path.join(a.plots, 'scaling_h200_widths.png')))
    print(plot_shapes(summary, a.width, a.steps, os.path.join(a.plots, 'scaling_h200_shapes.png')))


if __name__ == '__main__':
  main()
