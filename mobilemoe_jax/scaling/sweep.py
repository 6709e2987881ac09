"""Sweep driver: trains a grid of small models with the training pipeline and appends one
run record per finished run to a JSONL file that `law.py` reads.

  python -m mobilemoe_jax.scaling.sweep --grid=tiny --dry_run            # print the commands
  python -m mobilemoe_jax.scaling.sweep --grid=tiny --out=bench/results/scaling_tiny.jsonl
  python -m mobilemoe_jax.scaling.sweep --grid=tiny --device              # a device-tool command
  python -m mobilemoe_jax.scaling.sweep --grid=h200 --prepare_batches --seeds=0,1,2,3
  python -m mobilemoe_jax.scaling.sweep --grid=h200 --in_process --seeds=0,1,2,3 --workers=8

Each run is `python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:FAMILY[,data_dir=D]
--workdir=W --config.model.X=V ... --config.train.steps=S`: the grid is a list of overrides of
a stage config, so the trainer, the data and the config checks are the pipeline's own. The
record's accounting is computed from the same overrides applied in-process (one source of
truth for what was trained). A run already in the output file (same name) is skipped, so an
interrupted sweep resumes by re-running its command.

In-process mode (--in_process, run_in_process): every run in this process, each run's seeds
trained side by side (batched.py) from the batches --prepare_batches stored, a few runs at a
time in threads; one record per (run, seed), named RUN_seedS. For many tiny runs on one GPU,
where start-up and compiling would otherwise cost more than the training.

Record fields (law.FIELDS plus): name, family, overrides, steps, batch_size, seq_len,
params_with_embedding (total, active), final_eval_step, wall_s, returncode, code (git HEAD,
'+dirty.HASH' when mobilemoe_jax/ or configs/ had uncommitted changes); in-process records
have run, seed, curve and train_curve ([step, loss] every chunk), bad_step, eval_tokens,
group_wall_s (the run's seeds together, compile included), device instead of the
subprocess fields.
"""
import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from mobilemoe_jax import config as config_lib
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


def _h200_run(d, tag, steps, lr=None):
  """One run of the H200 grid: width d, 4 layers, first layer dense, and an FFN whose active
  hidden size is 3d in every shape, so every shape of a width has the same active parameters
  and FLOPs up to the router. tag: 'dense' or 'e{E}k{k}' / 'e{E}k{k}s1' (E routed experts,
  top-k, optionally one shared expert of the same size); each expert then has 3d / (k + shared)
  hidden units. Top-1 turns norm_topk_prob off (config.validate refuses it on)."""
  over = {'model.d_model': d, 'model.n_heads': d // 32, 'model.d_ff': 3 * d, 'model.n_layers': 4}
  if tag == 'dense':
    over['model.moe.n_experts'] = 0
  else:
    e, rest = tag[1:].split('k')
    k, shared = (int(rest[:-2]), 1) if rest.endswith('s1') else (int(rest), 0)
    size = 3 * d // (k + shared)
    over.update({'model.moe.n_experts': int(e), 'model.moe.top_k': k, 'model.moe.d_expert': size,
                 'model.moe.n_shared': shared, 'model.moe.d_shared': size})
    if k == 1:
      over['model.moe.norm_topk_prob'] = False
  over['train.steps'] = steps
  if lr is None:
    return f'd{d}_{tag}_s{steps}', over
  return f'd{d}_{tag}_s{steps}_lr{lr:g}', {**over, 'train.lr': lr}


def _h200_grid():
  """The seeded mini-study (docs/scaling.md section 5), most important runs first so a sweep
  cut short by its deadline still answers the main question. Batch 16 x 128 tokens; 800
  steps = 1.64M tokens, about two passes over the bundled corpus's 0.78M training tokens.
  1. dense vs MoE at equal active FLOPs, three widths: dense, 8 experts top-2, the same cut
     twice as fine (16 top-4), top-1 plus a shared expert.
  2. at d128: sparsity at a fixed expert size (4/16/32 experts of 1.5d, top-2), granularity at
     fixed sparsity (32 experts of 0.375d top-8), a shared expert with fine experts (16 top-3
     + 1), and 32 experts of 0.75d top-4.
  3. fewer tokens (200 and 400 steps) for dense and e8k2 at every width: the law's D axis.
  4. the sparsity and granularity ends at the other two widths.
  5. d256 dense and e8k2 at lr 1e-3: the first sweep's d256 runs (lr 3e-3, the tiny family's)
     ended above d128's, so the width axis needs a check of the learning rate."""
  runs = [_h200_run(d, tag, 800) for d in (64, 128, 256) for tag in ('dense', 'e8k2', 'e16k4', 'e8k1s1')]
  runs += [_h200_run(128, tag, 800) for tag in ('e4k2', 'e16k2', 'e32k2', 'e32k8', 'e16k3s1', 'e32k4')]
  runs += [_h200_run(d, tag, s) for s in (400, 200) for d in (64, 128, 256) for tag in ('dense', 'e8k2')]
  runs += [_h200_run(d, tag, 800) for d in (64, 256) for tag in ('e32k2', 'e32k8')]
  runs += [_h200_run(256, tag, 800, lr=1e-3) for tag in ('dense', 'e8k2')]
  return runs


GRIDS = {'tiny': _tiny_grid, 'seeds': _seed_grid, 'h200': _h200_grid,
         'smoke': lambda: _tiny_grid(steps=(20,))[:2]}


def build_config(family: str, overrides: dict, data_dir: str | None = None):
  """The stage config a run trains, with `overrides` ({'model.d_model': 64, ...}) applied."""
  cfg = config_lib.load_file(f'{STAGE}:{_arg(family, data_dir)}')
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
  dirty = git('diff', 'HEAD', '--', 'mobilemoe_jax', 'configs')
  untracked = git('ls-files', '--others', '--exclude-standard', '--', 'mobilemoe_jax', 'configs')
  if not (dirty or untracked):
    return git('rev-parse', '--short', 'HEAD')
  # Which uncommitted changes: a short hash of the diff tells two dirty trees apart.
  digest = hashlib.sha256((dirty + untracked).encode()).hexdigest()[:8]
  return git('rev-parse', '--short', 'HEAD') + f'+dirty.{digest}'


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


# ------------------------------------------------------------- in-process mode (one GPU)


def batch_file(batches_dir: str, seed: int | None) -> str:
  """Where prepare_batches writes a seed's training stream (seed None: the validation pass)."""
  return os.path.join(batches_dir, 'eval.npz' if seed is None else f'train_seed{seed}.npz')


def prepare_batches(runs, family, seeds, batches_dir, data_dir=None, log=print):
  """Writes each seed's training batches (enough for the longest run) and the validation
  split, from the data pipeline, as the .npz files run_in_process reads (see batched.py)."""
  from mobilemoe_jax.scaling import batched
  cfgs = [build_config(family, over, data_dir) for _, over in runs]
  shapes = {(c.train.batch_size, c.train.seq_len) for c in cfgs}
  if len(shapes) != 1:
    raise ValueError(f'runs of one sweep must share batch_size and seq_len; got {sorted(shapes)}')
  (batch_size, seq_len), steps = shapes.pop(), max(c.train.steps for c in cfgs)
  data = cfgs[0].data
  meta = dict(tokenizer=data.train.tokenizer, batch_size=batch_size, seq_len=seq_len)
  for seed in seeds:
    b = batched.take_batches(data.train, seq_len=seq_len, batch_size=batch_size, seed=seed, n=steps)
    batched.save_batches(batch_file(batches_dir, seed), b, seed=seed, steps=steps, **meta)
    log(f'seed {seed}: {steps} batches of {batch_size}x{seq_len} -> {batch_file(batches_dir, seed)}')
  b = batched.take_batches(data.eval, seq_len=seq_len, batch_size=batch_size, seed=0, n=None)
  batched.save_batches(batch_file(batches_dir, None), b, **meta)
  log(f'validation: {int(b["loss_mask"].sum())} tokens -> {batch_file(batches_dir, None)}')


def run_in_process(runs, family, out, batches_dir, seeds, *, chunk, workers=1, deadline_s=None,
                   data_dir=None, code=None, log=print):
  """Trains every run of the grid for every seed in this process (batched.train_seeds: a
  run's seeds side by side), `workers` runs at a time in threads, so compiling one run
  overlaps training others. Appends one record per (run, seed), named RUN_seedS, as each run
  finishes; runs already recorded for every seed are skipped; no run starts after
  `deadline_s` seconds (a device call has a hard limit)."""
  import concurrent.futures
  import threading

  import jax

  from mobilemoe_jax.scaling import batched
  start = time.time()
  train = {s: batched.load_batches(batch_file(batches_dir, s)) for s in seeds}
  evals = batched.load_batches(batch_file(batches_dir, None))
  done = done_names(out)
  todo = [(n, o) for n, o in runs if any(f'{n}_seed{s}' not in done for s in seeds)]
  log(f'{len(runs) - len(todo)} runs already in {out}; {len(todo)} to train x {len(seeds)} seeds '
      f'on {jax.devices()[0].device_kind}, {workers} at a time')
  code = code or _code_version()
  lock = threading.Lock()

  def one(name, over):
    if deadline_s is not None and time.time() - start > deadline_s:
      log(f'skip {name}: past the {deadline_s} s deadline')
      return
    cfg = build_config(family, over, data_dir)
    t0 = time.time()
    results = batched.train_seeds(cfg, seeds, [train[s] for s in seeds], evals, chunk=chunk)
    wall = round(time.time() - t0, 1)
    base = record_of(name, family, over, data_dir)
    with lock:
      os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
      with open(out, 'a') as f:
        for r in results:
          train_curve = [[(i + 1) * chunk, round(float(np.mean(r['train_losses'][i * chunk:(i + 1) * chunk])), 5)]
                         for i in range(cfg.train.steps // chunk)]
          f.write(json.dumps({**base, 'name': f'{name}_seed{r["seed"]}', 'run': name,
                              'seed': r['seed'], 'loss': r['loss'], 'curve': r['curve'],
                              'train_curve': train_curve, 'bad_step': r['bad_step'],
                              'eval_tokens': int(evals['loss_mask'].sum()),
                              'group_wall_s': wall, 'seeds_in_group': len(seeds),
                              'device': jax.devices()[0].device_kind, 'code': code}) + '\n')
      losses = ' '.join(f'{r["loss"]:.4f}' for r in results)
      log(f'{name}: held-out loss {losses} ({wall} s with compile, t={time.time() - start:.0f} s)')

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for f in [pool.submit(one, n, o) for n, o in todo]:
      f.result()           # re-raise a failed run's exception


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


def device_command(a) -> str:
  """A command for the device tool. In-process mode: install the wheels its image lacks
  (carried in WHEELS beside --batches; grain is imported by the configs, ml_collections is
  the config system) and train from the carried batches. Otherwise one trainer process per
  run, which needs the built data there."""
  out = f'--out=$OUT/{os.path.basename(a.out)}'
  if not a.in_process:
    return (f'python -m mobilemoe_jax.scaling.sweep --grid={a.grid} --family={a.family} {out} '
            f'--workdir=/tmp/scaling_sweep' + (f' --data_dir={a.data_dir}' if a.data_dir else ''))
  wheels = os.path.join(os.path.dirname(a.batches.rstrip('/')), 'whl')
  return (f'python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target '
          f'/tmp/site {wheels}/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 || exit; '
          f'python3 -m mobilemoe_jax.scaling.sweep --grid={a.grid} --family={a.family} --in_process '
          f'--seeds={a.seeds} --workers={a.workers} --chunk={a.chunk} '
          + (f'--deadline_s={a.deadline_s:g} ' if a.deadline_s else '')
          + f'--batches={a.batches} {out} --code={a.code or _code_version()} 2>&1 | tee $OUT/log.txt')


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
  ap.add_argument('--in_process', action='store_true',
                  help='train every run in this process, each run\'s --seeds side by side '
                  '(batched.py), reading the batches --prepare_batches wrote to --batches')
  ap.add_argument('--prepare_batches', action='store_true',
                  help='write the data pipeline\'s batches for --seeds to --batches and exit')
  ap.add_argument('--batches', default='runs/scaling_batches', help='dir of the .npz batch files')
  ap.add_argument('--seeds', default='0', help='comma-separated seeds (in-process mode)')
  ap.add_argument('--workers', type=int, default=1, help='runs trained at once (in-process mode)')
  ap.add_argument('--chunk', type=int, default=100,
                  help='steps per compiled call; held-out loss every chunk (in-process mode)')
  ap.add_argument('--deadline_s', type=float, default=None,
                  help='start no run after this many seconds (in-process mode)')
  ap.add_argument('--steps', type=int, default=0,
                  help='train every run this many steps instead (a quick check of the setup)')
  ap.add_argument('--code', default=None,
                  help='code version for the records (default: git HEAD here; a copy without '
                  '.git, like the device tool\'s, needs it)')
  a = ap.parse_args(argv)
  if a.report:
    print(report(law.load_records(a.out)))
    return
  runs = GRIDS[a.grid]()
  if a.only:
    keep = set(a.only.split(','))
    runs = [r for r in runs if r[0] in keep]
  if a.steps:
    runs = [(n, {**o, 'train.steps': a.steps}) for n, o in runs]
  if a.device:
    print(device_command(a))
    return
  seeds = [int(x) for x in a.seeds.split(',')]
  if a.prepare_batches:
    prepare_batches(runs, a.family, seeds, a.batches, a.data_dir)
  elif a.in_process:
    import jax
    # fp32 matmuls in full precision on the GPU too (no TF32): the CPU runs' arithmetic.
    jax.config.update('jax_default_matmul_precision', 'highest')
    run_in_process(runs, a.family, a.out, a.batches, seeds, chunk=a.chunk, workers=a.workers,
                   deadline_s=a.deadline_s, data_dir=a.data_dir, code=a.code)
  else:
    run_grid(runs, a.family, a.out, a.workdir, a.data_dir, a.dry_run)


if __name__ == '__main__':
  main()
