"""MoE dispatch candidates side by side: time, TFLOP/s, ratio to the fastest.

Measures the project's own implementations (mobilemoe_jax/moe/dispatch.py: dense reference,
sorted capacity buffer, gather-only capacity buffer, lax.ragged_dot) and candidates defined
here: a one-hot GShard einsum dispatch (dispatch/combine tensors [G, S, E, C]) and, where it
imports (GPU, jax >= 0.11.1, wheels carried), tokamax's ragged_dot. Every candidate is first
checked against the dense reference run in float32 (output and all five gradients), with
capacities large enough that no token is dropped.

Useful FLOPs are those of the routed experts only: 6*N*k*D*F forward (three matmuls of
2*N*k*D*F), x3 for forward+backward; TFLOP/s = useful FLOPs / time, so it is comparable
across candidates whatever work they waste.

Results: bench/results/moe_dispatch.json, one record per shape (the newest run of it, with
its command, date, commit and machine); a run replaces the shapes it measured.

  python bench/moe_dispatch.py                      # the GPU shapes on the default backend
  python bench/moe_dispatch.py --platform=cpu       # the CPU shapes
  python bench/moe_dispatch.py --table              # the results as markdown
"""
import argparse
import functools
import json
import os
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
p.add_argument('--platform', default=None, help='JAX_PLATFORMS to use (cpu, cuda, ...)')
p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                          'moe_dispatch.json'), help='results JSON (%(default)s)')
p.add_argument('--only', default=None, help='comma-separated candidate names')
p.add_argument('--shapes', default=None,
               help='comma-separated shape names (default: those of the backend\'s kind)')
p.add_argument('--deadline-s', type=float, default=1e9,
               help='skip remaining work after this many seconds (results so far are kept)')
p.add_argument('--min-round-s', type=float, default=0.05, help='time per timed round')
p.add_argument('--rounds', type=int, default=5)
p.add_argument('--table', action='store_true', help='print the table of --out and exit')
args = p.parse_args()
if args.platform:
  os.environ['JAX_PLATFORMS'] = args.platform

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from bench import runinfo  # noqa: E402
from mobilemoe_jax.moe import dispatch, routing  # noqa: E402

T0 = time.time()
BACKEND = jax.default_backend()

# name: ((tokens N, d_model D, experts E, top-k, expert hidden F), kind of machine) -- one
# MoE layer per device; N is a training micro-batch's tokens (8 x 2048, 16 x 2048).
SHAPES = {
    'S (mobilemoe_s)': ((16384, 768, 64, 4, 512), 'gpu'),
    'released S': ((16384, 768, 60, 4, 384), 'gpu'),   # facebook/MobileMoE-S, 8 x 2048
    'S-like E32': ((16384, 1024, 32, 4, 512), 'gpu'),
    'M (mobilemoe_m)': ((32768, 1024, 64, 8, 512), 'gpu'),
    'L (mobilemoe_l)': ((32768, 1280, 72, 6, 640), 'gpu'),
    'tiny': ((4096, 128, 8, 2, 64), 'cpu'),
    'small E32': ((2048, 384, 32, 4, 256), 'cpu'),
}
GSHARD_GROUP = 1024
GROUP_TILES = (128, 256, 512)   # tile sizes of `grouped` measured beside its default


# ---------------------------------------------------------------- candidates defined here
def gshard_onehot(x, weights, experts, gate, up, down, *, group, cap):
  """GShard/Switch einsum dispatch: tokens in groups of S, per-group capacity C,
  one-hot dispatch and weighted combine tensors [G, S, E, C]; no gather or scatter."""
  n, k = experts.shape
  n_exp, dt = gate.shape[0], x.dtype
  g = n // group
  onehot = jax.nn.one_hot(experts.reshape(g, group, k), n_exp, dtype=jnp.int32)  # [G,S,k,E]
  pos = jnp.cumsum(onehot.reshape(g, group * k, n_exp), 1).reshape(onehot.shape) - 1
  pos = jnp.sum(pos * onehot, -1)                                                # [G,S,k]
  slot = jax.nn.one_hot(pos, cap, dtype=dt)                      # pos >= cap -> dropped
  oh = onehot.astype(dt)
  disp = jnp.einsum('gske,gskc->gsec', oh, slot)
  comb = jnp.einsum('gske,gskc,gsk->gsec', oh, slot, weights.reshape(g, group, k).astype(dt))
  buf = jnp.einsum('gsec,gsd->egcd', disp, x.reshape(g, group, -1)).reshape(n_exp, g * cap, -1)
  out = dispatch.batched_experts(buf, gate, up, down).reshape(n_exp, g, cap, -1)
  y = jnp.einsum('gsec,egcd->gsd', comb, out).reshape(n, -1)
  dropped = n * k - jnp.sum(disp.astype(jnp.float32)).astype(jnp.int32)
  return y, dropped


def import_tokamax():
  """tokamax, or the reason it is not there. Its __init__ imports xprof's kernel-stats tool
  (a 32 MB wheel with many dependencies) for benchmarking only: stubbed if missing."""
  if BACKEND != 'gpu':
    return None, f'GPU kernels (Mosaic GPU); backend here is {BACKEND}'
  try:
    import xprof.cli.tools  # noqa: F401
  except ImportError:
    import types
    for name in ('xprof', 'xprof.cli', 'xprof.cli.tools'):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules['xprof.cli.tools'].get_kernel_stats_tool = None
  try:
    import tokamax
    return tokamax, None
  except Exception as e:  # noqa: BLE001
    return None, f'import tokamax failed: {type(e).__name__}: {e}'[:300]


def tokamax_ragged(tokamax):
  def fn(x, weights, experts, gate, up, down):
    """The project's `ragged` with tokamax.ragged_dot (default implementation) in place of
    jax.lax.ragged_dot."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    h = jax.nn.silu(tokamax.ragged_dot(xs, gate, sizes)) * tokamax.ragged_dot(xs, up, sizes)
    out = tokamax.ragged_dot(h, down, sizes)
    unsorted = jnp.zeros_like(out).at[order].set(out)
    y = (unsorted.reshape(n, k, -1) * weights[..., None].astype(out.dtype)).sum(1)
    return y, jnp.zeros((), jnp.int32)
  return fn


def candidates(cf_exact, group_cap):
  """name -> (fn(x, w, e, gate, up, down) -> (y, dropped), description)."""
  c = {
      'dense': (dispatch.dense, 'project reference: every expert on every token'),
      'sorted cf=0': (lambda *a: dispatch.sorted_capacity(*a, capacity_factor=0.0),
                      'project sorted_capacity, dropless capacity C=N (the config default)'),
      'sorted': (lambda *a: dispatch.sorted_capacity(*a, capacity_factor=cf_exact),
                 'project sorted_capacity, C = max expert load (no drops)'),
      'gather cf=0': (lambda *a: dispatch.gather_capacity(*a, capacity_factor=0.0),
                      'project gather_capacity, dropless capacity C=N'),
      'gather': (lambda *a: dispatch.gather_capacity(*a, capacity_factor=cf_exact),
                 'project gather_capacity, C = max expert load (no drops)'),
      'ragged (lax)': (dispatch.ragged, 'project ragged: jax.lax.ragged_dot, dropless'),
      'grouped': (dispatch.grouped, f'project grouped: dropless, tiles of {dispatch.GROUP_TILE} '
                                    'rows of one expert each'),
      **{f'grouped tile={t}': (functools.partial(dispatch.grouped, tile=t),
                               f'project grouped with tiles of {t} rows')
         for t in GROUP_TILES if t != dispatch.GROUP_TILE},
      'gshard one-hot': (lambda *a: gshard_onehot(*a, group=GSHARD_GROUP, cap=group_cap),
                         f'one-hot einsum dispatch, groups of {GSHARD_GROUP} tokens, '
                         'C = max per-group load (no drops)'),
  }
  tk, why = import_tokamax()
  c['ragged (tokamax)'] = ((tokamax_ragged(tk), 'tokamax.ragged_dot (default impl), dropless')
                           if tk else (None, why))
  return c, (getattr(tk, '__version__', None) if tk else None)


# ---------------------------------------------------------------- measuring
def problem(n, d, e, k, f, seed=0):
  ks = jax.random.split(jax.random.key(seed), 8)
  x = jax.random.normal(ks[0], (n, d), jnp.float32)
  # per-expert bias: uneven loads, as routers have early in training
  logits = jax.random.normal(ks[1], (n, e)) + 0.3 * jax.random.normal(ks[2], (e,))
  w, experts, _ = routing.route(logits, top_k=k, score_func='softmax', norm_topk_prob=True,
                                routed_scale=1.0)
  gate = jax.random.normal(ks[3], (e, d, f)) * d ** -0.5
  up = jax.random.normal(ks[4], (e, d, f)) * d ** -0.5
  down = jax.random.normal(ks[5], (e, f, d)) * f ** -0.5
  ct = jax.random.normal(ks[6], (n, d))
  return x, w, experts, gate, up, down, ct


def fwd_and_grad(fn):
  fwd = jax.jit(lambda x, w, e, g, u, dn: fn(x, w, e, g, u, dn)[0])

  def loss(x, w, e, g, u, dn, ct):
    y, dropped = fn(x, w, e, g, u, dn)
    return jnp.sum(y.astype(jnp.float32) * ct), dropped

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4, 5), has_aux=True))
  return fwd, grad


def bench(f, a):
  """Seconds per call: compile + one call, then rounds of back-to-back calls."""
  t = time.perf_counter()
  jax.block_until_ready(f(*a))
  first = time.perf_counter() - t
  jax.block_until_ready(f(*a))
  t = time.perf_counter()
  jax.block_until_ready(f(*a))
  one = max(time.perf_counter() - t, 1e-6)
  reps = max(1, min(200, int(args.min_round_s / one)))
  ts = []
  for _ in range(args.rounds):
    t = time.perf_counter()
    for _ in range(reps):
      out = f(*a)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t) / reps)
  return float(np.median(ts)), first


def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_shape(name, shape, run):
  n, d, e, k, f = shape
  x, w, experts, gate, up, down, ct = problem(*shape)
  ex = np.asarray(experts)
  load = np.bincount(ex.reshape(-1), minlength=e)
  cf_exact = float(load.max() * e / (n * k))
  group_load = max(np.bincount(ex[i:i + GSHARD_GROUP].reshape(-1), minlength=e).max()
                   for i in range(0, n, GSHARD_GROUP))
  cands, tk_version = candidates(cf_exact, int(group_load))
  useful = 6.0 * n * k * d * f
  rec = dict(shape=dict(tokens=n, d_model=d, experts=e, top_k=k, d_expert=f),
             routing=dict(mean_load=n * k / e, max_load=int(load.max()), min_load=int(load.min()),
                          capacity_factor_no_drop=cf_exact, gshard_group=GSHARD_GROUP,
                          gshard_group_capacity=int(group_load)),
             useful_gflop_fwd=useful / 1e9, useful_gflop_fwd_bwd=3 * useful / 1e9,
             candidates={}, run=dict(run, tokamax_version=tk_version))

  # float32 reference: the project's dense dispatch at full matmul precision
  with jax.default_matmul_precision('float32'):
    ref_f, ref_g = fwd_and_grad(dispatch.dense)
    y_ref = ref_f(x, w, experts, gate, up, down)
    g_ref, _ = ref_g(x, w, experts, gate, up, down, ct)
  bf = lambda t: t.astype(jnp.bfloat16)
  a16 = (bf(x), bf(w), experts, bf(gate), bf(up), bf(down))
  del ref_f, ref_g

  only = set(args.only.split(',')) if args.only else None
  for cname, (fn, desc) in cands.items():
    if only and cname not in only:
      continue
    r = rec['candidates'][cname] = dict(desc=desc)
    if fn is None:
      r['skipped'] = desc
      continue
    if time.time() - T0 > args.deadline_s:
      r['skipped'] = 'deadline'
      continue
    try:
      fwd, grad = fwd_and_grad(fn)
      y = fwd(*a16)
      g, dropped = grad(*a16, ct)
      r['dropped'] = int(dropped)
      r['err_y'] = rel(y, y_ref)
      r['err_grads'] = max(rel(a, b) for a, b in zip(g, g_ref))
      r['check'] = 'ok' if (r['err_y'] < 2e-2 and r['err_grads'] < 2e-2 and r['dropped'] == 0) \
          else 'FAIL'
      del y, g
      if r['check'] != 'ok':
        continue
      r['fwd_s'], r['fwd_first_s'] = bench(fwd, a16)
      r['fwd_bwd_s'], r['fwd_bwd_first_s'] = bench(lambda *a: grad(*a, ct), a16)
      r['fwd_tflops'] = useful / r['fwd_s'] / 1e12
      r['fwd_bwd_tflops'] = 3 * useful / r['fwd_bwd_s'] / 1e12
    except Exception as err:  # noqa: BLE001  (OOM, unsupported shape...)
      r['error'] = f'{type(err).__name__}: {err}'[:400]
    finally:
      print(f'  {cname:18s} ' + ', '.join(f'{k_}={v:.4g}' if isinstance(v, float) else f'{k_}={v}'
                                           for k_, v in r.items() if k_ != 'desc'), flush=True)

  for mode in ('fwd', 'fwd_bwd'):
    times = {c: r[f'{mode}_s'] for c, r in rec['candidates'].items() if f'{mode}_s' in r}
    if times:
      best = min(times.values())
      for c, t in times.items():
        rec['candidates'][c][f'{mode}_x_fastest'] = t / best
      rec[f'fastest_{mode}'] = min(times, key=times.get)
  return rec


def tf(v):
  return f'{v:.1f}' if v >= 10 else f'{v:.3g}'


def table(results):
  lines = []
  for name, rec in results['shapes'].items():
    s, run = rec['shape'], rec['run']
    lines.append(f"\n{name}: N={s['tokens']} D={s['d_model']} E={s['experts']} k={s['top_k']} "
                 f"F={s['d_expert']}  (max/mean expert load "
                 f"{rec['routing']['capacity_factor_no_drop']:.2f}); "
                 f"{run['device'] if run['backend'] != 'cpu' else run['machine']['cpu'] or 'CPU model not recorded'}, "
                 f"jax {run['versions'].get('jax')}, {run['date']}, commit {run['commit'] or 'not recorded'}\n")
    lines.append('| candidate | fwd ms | fwd TFLOP/s | fwd x fastest | fwd+bwd ms | fwd+bwd TFLOP/s '
                 '| fwd+bwd x fastest | max rel err |')
    lines.append('|---|---|---|---|---|---|---|---|')
    for c, r in rec['candidates'].items():
      if 'fwd_s' in r:
        lines.append(f"| {c} | {r['fwd_s'] * 1e3:.3f} | {tf(r['fwd_tflops'])} | "
                     f"{r['fwd_x_fastest']:.2f} | {r['fwd_bwd_s'] * 1e3:.3f} | "
                     f"{tf(r['fwd_bwd_tflops'])} | {r['fwd_bwd_x_fastest']:.2f} | "
                     f"{max(r['err_y'], r['err_grads']):.1e} |")
      else:
        why = r.get('skipped') or r.get('error') or (
            f"check {r.get('check')}: rel err y {r.get('err_y', 0):.1e}, grads "
            f"{r.get('err_grads', 0):.1e} (limit 2e-2), dropped {r.get('dropped')}")
        lines.append(f'| {c} | not timed: {why[:110]} | | | | | | |')
  return '\n'.join(lines)


METHOD = dict(
    dtype='bfloat16 inputs and weights, float32 accumulation',
    flops='useful = 6*N*k*D*F forward, x3 forward+backward (routed experts only)',
    check='vs dense dispatch in float32 (matmul precision float32): relative L2 error of '
          'y and of each gradient < 2e-2, and zero dropped tokens')


def main():
  dev = jax.devices()[0]
  kind = 'cpu' if BACKEND == 'cpu' else 'gpu'
  run = dict(runinfo.run_record('bench/moe_dispatch.py', gpu=kind == 'gpu'), backend=BACKEND,
             device=dev.device_kind,
             timing=f'median of {args.rounds} rounds of back-to-back calls (>= {args.min_round_s}s '
                    'each) after compile and one warm call; jit of forward, and of grad wrt x, '
                    'routing weights, gate, up, down')
  print(f"device: {dev.device_kind} ({BACKEND}), jax {jax.__version__}", flush=True)
  names = args.shapes.split(',') if args.shapes else [n for n, (_, k) in SHAPES.items() if k == kind]
  try:
    with open(args.out) as fh:
      results = json.load(fh)
  except FileNotFoundError:
    results = dict(benchmark='bench/moe_dispatch.py', method=METHOD, shapes={})
  for name in names:
    shape = SHAPES[name][0]
    print(f'{name}: {shape}', flush=True)
    results['shapes'][name] = run_shape(name, shape, run)
    results['shapes'] = {n: results['shapes'][n] for n in SHAPES if n in results['shapes']}
    with open(args.out, 'w') as fh:
      json.dump(results, fh, indent=1)
  print(table({'shapes': {n: results['shapes'][n] for n in names}}))
  print(f'\nwrote {args.out} in {time.time() - T0:.0f}s')


if __name__ == '__main__':
  if args.table:
    print(table(runinfo.read_results(args.out)))
  else:
    main()
