"""The README's `make` commands timed from a fresh clone: `make install` (a new .venv from
requirements.txt and pyproject.toml), then `make test-fast`, `make test` (through `.ci/run`,
what CI runs) or `make demo`, each in its own clone of this checkout's HEAD, so no XLA cache,
delegate build or data is left from earlier runs. The environment is cleaned of what would
reach back into this checkout (PYTHONPATH, JAX_COMPILATION_CACHE_DIR, MOBILEMOE_TEST_XLA_CACHE).

Per target it stores the install's and the command's wall time, the exit status, pytest's
summary (passed / failed / skipped counts and its own seconds) and, for the demo, the
pipeline's summary.json (losses, perplexities, stage times, the export's verify, the local
eval). A run replaces the rows of the targets it ran and keeps the others.

  python bench/fresh_clone.py test-fast          # -> bench/results/fresh_clone.json
  python bench/fresh_clone.py test demo          # run on an idle machine: it times it
  python bench/fresh_clone.py demo --keep        # keep the clone: its runs/demo feeds bench/qat.py
  python bench/fresh_clone.py --table
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import runinfo  # noqa: E402

OUT = os.path.join(REPO, 'bench', 'results', 'fresh_clone.json')
# target -> the command run in the clone after `make install`
TARGETS = {'test-fast': ['make', 'test-fast'], 'test': ['.ci/run'], 'demo': ['make', 'demo']}
CLEAN_ENV = ('PYTHONPATH', 'JAX_COMPILATION_CACHE_DIR', 'MOBILEMOE_TEST_XLA_CACHE', 'VIRTUAL_ENV')


def pytest_summary(text: str) -> dict | None:
  """Counts and seconds of pytest's last summary line ('== 675 passed, 3 skipped in 412.3s ==',
  or without the '=' under -q: '802 passed, 5 warnings in 871.00s (0:14:30)')."""
  lines = [l for l in text.splitlines()
           if re.search(r'\b\d+ (passed|failed|errors?)\b.*\bin [\d.]+s\b', l)]
  if not lines:
    return None
  last = lines[-1]
  out = {kind: int(n) for n, kind in re.findall(r'(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)', last)}
  out['seconds'] = float(re.search(r'\bin ([\d.]+)s\b', last).group(1))
  return out


def timed(cmd: list, cwd: str, env: dict, log: str) -> tuple:
  """(exit status, wall seconds) of cmd; its output goes to `log`."""
  t0 = time.time()
  with open(log, 'w') as f:
    rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
  return rc, round(time.time() - t0, 1)


def run_target(target: str, workdir: str) -> dict:
  clone = os.path.join(workdir, target)
  subprocess.run(['git', 'clone', '-q', REPO, clone], check=True)
  env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
  row = {'commit': subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=clone, check=True,
                                  capture_output=True, text=True).stdout.strip(),
         'command': ' '.join(TARGETS[target])}
  rc, row['install_seconds'] = timed(['make', 'install'], clone, env, os.path.join(workdir, f'{target}.install.log'))
  if rc:
    raise RuntimeError(f'make install failed in {clone} (exit {rc}); see {workdir}/{target}.install.log')
  log = os.path.join(workdir, f'{target}.log')
  row['exit_status'], row['seconds'] = timed(TARGETS[target], clone, env, log)
  with open(log) as f:
    text = f.read()
  summary = os.path.join(clone, 'runs', 'demo', 'summary.json')
  if target == 'demo' and os.path.exists(summary):
    with open(summary) as f:
      row['summary'] = json.load(f)
  else:
    row['pytest'] = pytest_summary(text)
  row['log_tail'] = text[-2000:]
  print(target, json.dumps({k: v for k, v in row.items() if k not in ('summary', 'log_tail')}), flush=True)
  return row


STAGE_LABELS = {'sft': 'sft (assistant tokens)',
                'qat': 'qat (INT4 g32 weights + int8 activations, fake-quant)'}


def demo_table(summary: dict) -> str:
  """README.md's table of the demo: each stage's steps, losses, perplexities and time."""
  ppl = lambda v: '' if v is None else f'{v:.0f}' if v >= 1000 else f'{v:.1f}'
  out = ['| stage | steps | train loss start -> end | held-out ppl start -> end | time |',
         '|---|---|---|---|---|', f"| data build | | | | {summary['data_seconds']:.0f} s |"]
  for st in summary['stages']:
    out.append(f"| {STAGE_LABELS.get(st['stage'], st['stage'])} | {st['steps']} | {st['loss_start']:.3f} -> "
               f"{st['loss_end']:.3f} | {ppl(st['ppl_start'])} -> {ppl(st['ppl_end'])} | {st['seconds']:.0f} s |")
  if 'ship' in summary:
    out.append('| export (+ LiteRT-LM bundle) + delegate and LiteRT-LM generation + local eval | | | '
               f"| {summary['ship']['seconds']:.0f} s |")
  return '\n'.join(out)


def markdown_table(res: dict) -> str:
  out = ['| target | command | commit | machine | install s | command s | pytest | exit |',
         '|---|---|---|---|---|---|---|---|']
  for name, r in res['targets'].items():
    p = r.get('pytest') or {}
    tests = ', '.join(f'{v} {k}' for k, v in p.items() if k != 'seconds')
    tests += f" in {p['seconds']:.0f} s" if 'seconds' in p else ''
    m = r['machine']
    out.append(f"| {name} | `{r['command']}` | {r['commit']} | {m['cpu']}, {m['cpu_count']} cores, "
               f"load {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f} | {r['install_seconds']:.0f} "
               f"| {r['seconds']:.0f} | {tests or '-'} | {r['exit_status']} |")
  demo = res['targets'].get('demo', {}).get('summary')
  if demo:
    out += ['', f"make demo at {res['targets']['demo']['commit']}:", '', demo_table(demo)]
  return '\n'.join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('targets', nargs='*', help=', '.join(TARGETS))
  ap.add_argument('--out', default=OUT)
  ap.add_argument('--table', action='store_true', help='print the table of --out')
  ap.add_argument('--keep', action='store_true',
                  help="keep the clones (e.g. the demo's runs/demo for bench/qat.py)")
  a = ap.parse_args(argv)
  if set(a.targets) - set(TARGETS):
    ap.error(f'unknown targets {sorted(set(a.targets) - set(TARGETS))}: choose from {list(TARGETS)}')
  res = {'targets': {}}
  if os.path.exists(a.out):
    with open(a.out) as f:
      res = json.load(f)
  if a.table or not a.targets:
    return print(markdown_table(res))
  workdir = tempfile.mkdtemp(prefix='fresh_clone_')
  res.update(runinfo.run_record('bench/fresh_clone.py', gpu=False))   # the newest run
  for target in a.targets:
    rec = runinfo.run_record('bench/fresh_clone.py', gpu=False)
    row = run_target(target, workdir)
    rec['machine']['loadavg_end'] = os.getloadavg()
    res['targets'][target] = dict(rec, **row)
  res['targets'] = dict(sorted(res['targets'].items()))
  runinfo.write_results(a.out, res)
  if a.keep:
    print(f'clones kept in {workdir}')
  else:
    shutil.rmtree(workdir, ignore_errors=True)
  print(markdown_table(res))
  print(f'wrote {a.out}')


if __name__ == '__main__':
  main()
