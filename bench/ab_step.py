"""A/B of train-step variants at one workload of bench/train_throughput.py, in one process.

The initial state is built once (most of a run's minutes at full size); each variant is traced
with its settings, compiled and timed on from the state the one before left, so variants
differ only in their code path. A variant `NAME_again` times NAME's compiled step again: the
spread between the two is the noise. Prints one JSON line per variant and a table; with --out
also ab.json (rewritten after every variant, so a run cut off keeps what it measured),
NAME.profile.json (--profile: GPU time per kernel, as train_throughput's rows) and
NAME.hlo.txt.gz (--hlo). Timings are not stored as results.

A variant is NAME or NAME=SETTING SETTING...: `xla_*=VALUE` is an XLA compile option,
`module.path.ATTR=VALUE` sets a module attribute while that variant is traced (an A/B switch in
the code; reset afterwards). VALUE is a Python literal.

  python bench/ab_step.py --workload rs_b256_accum16_packed \
      --variants 'base;tgany=xla_gpu_triton_gemm_any=True;base_again'
"""
import argparse
import ast
import gzip
import importlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, ROOT)
import bench.train_throughput as tt  # noqa: E402


def parse_variant(spec: str):
  """'NAME=a.b.C=1 xla_f=True' -> (NAME, {(module, attr): value}, {xla option: value})."""
  name, _, rest = spec.partition('=')
  switches, options = {}, {}
  for setting in rest.split():
    key, _, value = setting.partition('=')
    value = ast.literal_eval(value)
    if key.startswith('xla_'):
      options[key] = value
    else:
      module, _, attr = key.rpartition('.')
      switches[(module, attr)] = value
  return name, switches, options


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--workload', default='rs_b256_accum16_packed')
  ap.add_argument('--variants', default='base;base_again', help="';'-separated (module docstring)")
  ap.add_argument('--warmup', type=int, default=1)
  ap.add_argument('--steps', type=int, default=4)
  ap.add_argument('--deadline-s', type=float, default=540, help='no new compile past this - 90 s')
  ap.add_argument('--out', default='')
  ap.add_argument('--profile', default='', help='variants to profile (comma list; needs --out)')
  ap.add_argument('--hlo', default='', help='variants whose compiled HLO to keep (needs --out)')
  a = ap.parse_args()
  start = time.time()
  tt._imports()
  import jax
  from mobilemoe_jax.scaling import accounting
  from mobilemoe_jax.train import trainer
  w = tt.WORKLOADS[a.workload]
  devices = jax.devices()[:w.devices]
  cfg_model, config, mesh = tt._config(w, devices)
  tokens, flops_tok = config.train.batch_size * w.seq, accounting.train_flops_per_token(cfg_model, w.seq)
  peak = tt.PEAK_FLOPS.get(devices[0].device_kind)
  results, compiled_by = [], {}
  with jax.set_mesh(mesh):
    p = tt.step_parts(w, cfg_model, config, mesh)
    batch = {k: jax.device_put(v, p.batch_sh) for k, v in p.host.items()}
    t0 = time.time()
    state = jax.block_until_ready(jax.jit(p.init_state, out_shardings=p.state_sh)(
        jax.random.key(config.train.seed)))
    print(f'init {time.time() - t0:.1f} s', flush=True)

    def measure(name, compiled, state):
      times, losses = [], []
      for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        if i >= a.warmup:
          times.append(time.perf_counter() - t0)
        losses.append(float(m['loss']))
      med = statistics.median(times)
      results.append({'variant': name, 'step_ms': med * 1e3, 'all_ms': [t * 1e3 for t in times],
                      'mfu': tokens / med * flops_tok / peak if peak else None,
                      'losses': losses, 'grad_norm': float(m['grad_norm'])})
      print(json.dumps(results[-1]), flush=True)
      if a.out:
        with open(os.path.join(a.out, 'ab.json'), 'w') as f:
          json.dump({'workload': a.workload, 'device': devices[0].device_kind,
                     'commit': os.environ.get('MOBILEMOE_COMMIT'), 'variants': a.variants,
                     'results': results}, f, indent=1)
      return state

    for spec in a.variants.split(';'):
      name, switches, options = parse_variant(spec)
      if name.endswith('_again'):
        if name[:-len('_again')] in compiled_by and time.time() - start < a.deadline_s - 20:
          state = measure(name, compiled_by[name[:-len('_again')]], state)
        continue
      if time.time() - start > a.deadline_s - 90:
        print(f'{name}: skipped (deadline)', flush=True)
        continue
      saved = {}
      for (module, attr), value in switches.items():
        mod = importlib.import_module(module)
        saved[(mod, attr)] = getattr(mod, attr)
        setattr(mod, attr, value)
      try:
        step = jax.jit(trainer.make_train_step(p.step_cfg, p.tx, p.lr),
                       in_shardings=(p.state_sh, p.batch_sh), out_shardings=(p.state_sh, None),
                       donate_argnums=0)
        t0 = time.time()
        compiled = step.lower(p.abstract, batch).compile(compiler_options=options or None)
      except Exception as e:  # noqa: BLE001  e.g. out of memory
        print(f'{name}: failed {type(e).__name__}: {str(e)[:300]}', flush=True)
        continue
      finally:
        for (mod, attr), value in saved.items():
          setattr(mod, attr, value)
      print(f'{name}: compiled in {time.time() - t0:.1f} s, '
            f'{tt._compiled_bytes(compiled) / 1e9:.2f} GB', flush=True)
      if a.out and name in a.hlo.split(','):
        with gzip.open(os.path.join(a.out, f'{name}.hlo.txt.gz'), 'wt') as f:
          f.write(compiled.as_text())
      compiled_by[name] = compiled
      state = measure(name, compiled, state)
      if a.out and name in a.profile.split(','):
        state, prof = tt.profile_steps(compiled, state, batch, 2)
        with open(os.path.join(a.out, f'{name}.profile.json'), 'w') as f:
          json.dump(prof, f, indent=1)
  print('\nvariant | step ms | MFU | vs first')
  for r in results:
    mfu = '-' if r['mfu'] is None else f"{100 * r['mfu']:.2f}%"
    print(f"{r['variant']} | {r['step_ms']:.1f} | {mfu} | {results[0]['step_ms'] / r['step_ms']:.4f}x")


if __name__ == '__main__':
  main()
