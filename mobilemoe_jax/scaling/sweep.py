"""Sweep driver: trains a grid of small models with the training pipeline and appends one
run record per finished run to a JSONL file that `law.py` reads.

  python -m mobilemoe_jax.scaling.sweep --grid=tiny --dry_run            # print the commands
  python -m mobilemoe_jax.scaling.sweep --grid=tiny --out=bench/results/scaling_tiny.jsonl
  python -m mobilemoe_jax.scaling.sweep --grid=tiny --device              # a device-tool command

Each run is `python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:FAMILY[,data_dir=D]
--workdir=W --config.model.X=V ... --config.train.steps=S`: the grid is a list of overrides of
a stage config, so the trainer, the data and the config checks are the pipeline's own. The
record's accounting is computed from the same overrides applied in-process (one source of
truth for what was trained). A run already in the output file (same name) is skipped, so an
interrupted sweep resumes by re-running its command.

Record fields (law.FIELDS plus): name, family, overrides, steps, batch_size, seq_len,
params_with_embedding (total, active), final_eval_step, wall_s, returncode, code (git HEAD,
'+dirty' when mobilemoe_jax/ or configs/ had uncommitted changes).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from mobilemoe_jax.scaling import law

STAGE = 'configs/stages/pretrain.py'


def _tiny_grid(steps=(300, 150)):
  """Dense vs MoE at equal active FFN size on the tiny family (vocab 2048, head_dim 32):
  per width, a dense FFN of 3*d; 8 experts of 1.5*d top-2 (same active FFN, S > 1); 16 of
  0.75*d top-4 (same active FFN, twice the granularity); 8 of 1.5*d top-1 plus a shared
  expert of 1.5*d (same active FFN, with a shared expert). Ordered longest runs first, so a
  sweep cut short still has every shape at one token count.
  Top-1 turns norm_topk_prob off: renormalising one weight makes it exactly 1 and the router
  would get no gradient from the LM loss (config.validate now refuses it). The committed
  'e8k1s1' records (bench/results/scaling_tiny*.jsonl) predate this fix and have that flaw."""
  runs = []
  for s in steps:
    for d in (64, 128):
      ff, half, quarter = 3 * d, 3 * d // 2, 3 * d // 4
      shapes = {
          'dense': {'moe.n_experts': 0},
          'e8k2': {'moe.n_experts': 8, 'moe.top_k': 2, 'moe.d_expert': half, 'moe.n_shared': 0},
          'e16k4': {'moe.n_experts': 16, 'moe.top_k': 4, 'moe.d_expert': quarter,
                    'moe.n_shared': 0},
          'e8k1s1': {'moe.n_experts': 8, 'moe.top_k': 1, 'moe.d_expert': half,
                     'moe.n_shared': 1, 'moe.d_shared': half, 'moe.norm_topk_prob': False},
      }
      for tag, moe in shapes.items():
        over = {'model.d_model': d, 'model.n_heads': d // 32, 'model.d_ff': ff,
                'model.n_layers': 4, **{f'model.{k}': v for k, v in moe.items()},
                'train.steps': s}
        runs.append((f'd{d}_{tag}_s{s}', over))
  return runs


def _seed_grid():
  """Two tiny-grid runs again with another seed: how far apart two identical runs land."""
  return [(f'{name}_seed1', {**over, 'train.seed': 1})
          for name, over in _tiny_grid(steps=(300,)) if name in ('d64_dense_s300', 'd64_e8k2_s300')]


GRIDS = {'tiny': _tiny_grid, 'seeds': _seed_grid,
         'smoke': lambda: _tiny_grid(steps=(20,))[:2]}


def build_config(family: str, overrides: dict, data_dir: str | None = None):
  """The stage config a run trains, with `overrides` ({'model.d_model': 64, ...}) applied."""
  from configs.stages import pretrain
  cfg = pretrain.get_config(_arg(family, data_dir))
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value          # a locked ConfigDict refuses unknown fields, like the CLI
  return cfg


def _arg(family, data_dir):
  return family + (f',data_dir={data_dir}' if data_dir else '')


def command(name: str, family: str, overrides: dict, workdir: str, data_dir: str | None,
            python: str = sys.executable) -> list[str]:
  return [python, '-m', 'mobilemoe_jax.train', f'--config={STAGE}:{_arg(family, data_dir)}',
          f'--workdir={os.path.join(workdir, name)}'] + [
              f'--config.{k}={v}' for k, v in overrides.items()] + ['--config.train.progress=False']


def record_of(name: str, family: str, overrides: dict, data_dir=None) -> dict:
  """Everything about a run that is known before it runs."""
  from mobilemoe_jax.scaling import accounting
  cfg = build_config(family, overrides, data_dir)
  counts = accounting.count(cfg.model)
  n, s, g = law.law_inputs(cfg.model, counts)
  t = cfg.train
  return {'name': name, 'family': family, 'overrides': overrides,
          'active_params': n, 'total_params': round(n * s), 'granularity': g,
          'tokens': t.steps * t.batch_size * t.seq_len, 'steps': t.steps,
          'batch_size': t.batch_size, 'seq_len': t.seq_len,
          'params_with_embedding': {'total': counts.total_params, 'active': counts.active_params}}


def final_eval_loss(workdir: str) -> tuple[float, int]:
  """The last logged held-out loss ('eval/loss') in the trainer's metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  last = None
  with open(path) as f:
    for line in f:
      m = json.loads(line)
      if 'eval/loss' in m:
        last = (float(m['eval/loss']), int(m['step']))
  if last is None:
    raise RuntimeError(f'{path}: no eval/loss logged (is train.eval_batches 0?)')
  return last


def _code_version() -> str:
  """HEAD plus '+dirty' when the trainer or model has uncommitted changes: a record should
  say which code produced it."""
  def git(*args):
    return subprocess.run(['git', *args], capture_output=True, text=True).stdout.strip()
  dirty = git('status', '--porcelain', '--', 'mobilemoe_jax', 'configs')
  return git('rev-parse', '--short', 'HEAD') + ('+dirty' if dirty else '')


def done_names(out: str) -> set:
  if not os.path.exists(out):
    return set()
  with open(out) as f:
    return {json.loads(l)['name'] for l in f if l.strip()}


def run_grid(runs, family, out, workdir, data_dir=None, dry_run=False, log=print):
  for name, over in runs:
    cmd = command(name, family, over, workdir, data_dir)
    if dry_run:
      log(shlex.join(cmd))
      continue
    if name in done_names(out):   # re-read each time: two sweeps may share one output file
      log(f'skip {name}: already in {out}')
      continue
    rec = record_of(name, family, over, data_dir)
    rec['code'] = _code_version()
    log(f'run {name}: {rec["active_params"]} active non-embedding params, {rec["tokens"]} tokens')
    t0 = time.time()
    proc = subprocess.run(cmd)
    rec['wall_s'] = round(time.time() - t0, 1)
    rec['returncode'] = proc.returncode
    if proc.returncode != 0:
      log(f'run {name} failed (exit {proc.returncode}); not recorded')
      continue
    rec['loss'], rec['final_eval_step'] = final_eval_loss(os.path.join(workdir, name))
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out, 'a') as f:
      f.write(json.dumps(rec) + '\n')
    log(f'  loss {rec["loss"]:.4f} in {rec["wall_s"]} s')


def report(records) -> str:
  """Markdown: per (width, steps), each shape's held-out loss and its difference from the
  dense run of the same width and steps (equal active parameters by the grid's construction)."""
  groups = {}
  for r in records:
    if r['name'].count('_') != 2:
      continue                      # not a tiny-grid name (e.g. a seed repeat)
    d, tag, steps = r['name'].split('_')
    groups.setdefault((d, steps), {})[tag] = r
  tags = ['dense', 'e8k2', 'e16k4', 'e8k1s1']
  rows = ['| width, steps | tokens | ' + ' | '.join(tags) + ' |', '|---|---:|' + '---:|' * len(tags)]
  for (d, steps), g in sorted(groups.items()):
    base = g.get('dense')
    cells = []
    for t in tags:
      if t not in g:
        cells.append('not run')
      elif base is None or t == 'dense':
        cells.append(f"{g[t]['loss']:.4f}")
      else:
        cells.append(f"{g[t]['loss']:.4f} ({g[t]['loss'] - base['loss']:+.4f})")
    tokens = next(iter(g.values()))['tokens']
    rows.append(f'| {d}, {steps} | {tokens:.0f} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def main(argv=None):
  ap = argparse.ArgumentParser(description='Train a grid of small models; append run records.')
  ap.add_argument('--grid', default='tiny', choices=sorted(GRIDS))
  ap.add_argument('--family', default='tiny', help='stage-config preset the overrides modify')
  ap.add_argument('--out', default='bench/results/scaling_tiny.jsonl')
  ap.add_argument('--workdir', default='runs/scaling_sweep')
  ap.add_argument('--data_dir', default=None, help='bundled data dir (stage default: data)')
  ap.add_argument('--only', default='', help='comma-separated run names to run')
  ap.add_argument('--dry_run', action='store_true', help='print the training commands only')
  ap.add_argument('--report', action='store_true',
                  help='print the dense-vs-MoE table of the records in --out and exit')
  ap.add_argument('--device', action='store_true',
                  help='print a command for the device tool (GPU) that runs this sweep there '
                  'and leaves the records under $OUT')
  a = ap.parse_args(argv)
  if a.report:
    print(report(law.load_records(a.out)))
    return
  runs = GRIDS[a.grid]()
  if a.only:
    keep = set(a.only.split(','))
    runs = [r for r in runs if r[0] in keep]
  if a.device:
    print(f'python -m mobilemoe_jax.scaling.sweep --grid={a.grid} --family={a.family} '
          f'--out=$OUT/{os.path.basename(a.out)} --workdir=/tmp/scaling_sweep'
          + (f' --data_dir={a.data_dir}' if a.data_dir else ''))
    return
  run_grid(runs, a.family, a.out, a.workdir, a.data_dir, a.dry_run)


if __name__ == '__main__':
  main()
