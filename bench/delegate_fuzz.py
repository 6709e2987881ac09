"""The delegate's long fuzz runs (export/delegate/README.md, "Hostile models"), counted and
stored: the libFuzzer options fuzzer (fuzz/options_fuzzer.cc, clang with ASan + UBSan) for a
fixed number of inputs from the seeds and the regression inputs, and the structure-aware
model mutants (`export.delegate.fuzz.models`, the ASan build of the delegate). A crash of
LiteRT itself (the same model crashes with our delegate not loaded) is counted apart, with its
sanitizer summary line.

  python bench/delegate_fuzz.py                 # 10M option inputs, 10,000 mutants from seed 1000
  python bench/delegate_fuzz.py --runs 100000 --mutants 500 --out /tmp/f.json   # a short run
  python bench/delegate_fuzz.py --table
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import runinfo  # noqa: E402

OUT = os.path.join(REPO, 'bench', 'results', 'delegate_fuzz.json')
DLG = os.path.join(REPO, 'export', 'delegate')
REGRESSIONS = os.path.join(REPO, 'tests', 'delegate_regressions', 'options')


def sanitizer_reports(text: str) -> int:
  return text.count('ERROR: AddressSanitizer') + text.count('runtime error:')


def options_fuzzer(runs: int) -> dict:
  """libFuzzer over both ops' options parsers: `runs` inputs from an empty corpus plus the
  seeds and the inputs that crashed earlier parsers."""
  r = subprocess.run(['make', '-C', DLG, 'fuzz/options_fuzzer'], capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f'building {DLG}/fuzz/options_fuzzer failed:\n{r.stdout}{r.stderr}')
  with tempfile.TemporaryDirectory() as corpus:
    cmd = [os.path.join(DLG, 'fuzz', 'options_fuzzer'), f'-runs={runs}', '-print_final_stats=1',
           '-rss_limit_mb=8192', corpus, os.path.join(DLG, 'fuzz', 'seeds'), REGRESSIONS]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, errors='replace', cwd=corpus)
    seconds = round(time.time() - t0, 1)
  stats = dict(re.findall(r'^stat::(\w+):\s+(\d+)', r.stderr, re.M))
  return {'command': ' '.join(['export/delegate/fuzz/options_fuzzer'] + cmd[1:4] + ['CORPUS_DIR', 'fuzz/seeds',
                                                                                  'tests/delegate_regressions/options']),
          'exit_status': r.returncode, 'seconds': seconds,
          'executed_units': int(stats.get('number_of_executed_units', 0)),
          'new_units_added': int(stats.get('new_units_added', 0)),
          'sanitizer_reports': sanitizer_reports(r.stderr),
          'stderr_tail': r.stderr[-1500:]}


def model_mutants(mutants: int, seed: int) -> dict:
  """export.delegate.fuzz.models over `mutants` mutants from `seed`: its outcome counts, and
  for each crash of LiteRT itself the sanitizer's summary line."""
  from export.delegate.fuzz import models
  crashes = []

  def log(msg):   # the crash's first line and the sanitizer's summary (cut: C++ signatures run long)
    lines = msg.splitlines()
    summary = [l for l in lines if l.startswith('SUMMARY:')]
    crashes.append({'crash': lines[0][:200], 'summary': summary[-1][:300] if summary else ''})
  t0 = time.time()
  counts = models.fuzz(mutants, seed, save=None, log=log)
  return {'command': f'python -m export.delegate.fuzz.models --mutants {mutants} --seed {seed}',
          'seconds': round(time.time() - t0, 1), 'counts': counts,
          'crash_reports': crashes}


def where_crashed(report: dict) -> str:
  """'<sanitizer error> in <function>' of the sanitizer's summary line."""
  m = re.match(r'SUMMARY: \w+: (\S+) .*? in ([^(]+)',
               report['summary'].replace('(anonymous namespace)::', ''))
  return f'{m.group(1)} in {m.group(2).strip()}' if m else 'no sanitizer summary'


def markdown_table(res: dict) -> str:
  o, m = res['options'], res['models']
  c = dict(m['counts'])
  where = {}
  for r in m['crash_reports']:
    if r['crash'].startswith('runtime_crash'):
      key = where_crashed(r)
      where[key] = where.get(key, 0) + 1
  outcomes = ', '.join(f'{v:,} {k}' for k, v in sorted(c.items())
                       if k not in ('mutants', 'delegate_crashes', 'runtime_crashes', 'seconds'))
  lines = [f"{res['machine']['cpu']}, {res['machine']['cpu_count']} cores, commit {res['commit']}, "
           f"{res['date'][:10]}", '',
           '| fuzzer | command | inputs | delegate crashes / sanitizer reports |', '|---|---|---|---|',
           f"| options parser | `{o['command']}` | {o['executed_units']:,} ({o['seconds']:.0f} s, "
           f"{o['new_units_added']} new coverage units) | {int(o['exit_status'] != 0)} / {o['sanitizer_reports']} |",
           f"| hostile models | `{m['command']}` | {c['mutants']:,} ({m['seconds']:.0f} s): {outcomes} "
           f"| {c['delegate_crashes']} / -; {c.get('wrote_constant', 0)} writes into constants |", '',
           f"Crashes of LiteRT itself (each also without our delegate): {c['runtime_crashes']}"]
  lines += [f'- {n} x {k}' for k, n in sorted(where.items(), key=lambda kv: -kv[1])]
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--runs', type=int, default=10_000_000, help='options fuzzer inputs')
  ap.add_argument('--mutants', type=int, default=10_000)
  ap.add_argument('--seed', type=int, default=1000, help="the first mutant's seed")
  ap.add_argument('--out', default=OUT)
  ap.add_argument('--table', action='store_true', help='print the table of --out')
  a = ap.parse_args(argv)
  if a.table:
    return print(markdown_table(runinfo.read_results(a.out)))
  res = runinfo.run_record('bench/delegate_fuzz.py', gpu=False)
  res['options'] = options_fuzzer(a.runs)
  print('options', json.dumps({k: v for k, v in res['options'].items() if k != 'stderr_tail'}), flush=True)
  res['models'] = model_mutants(a.mutants, a.seed)
  runinfo.write_results(a.out, res)
  print(markdown_table(res))
  print(f'wrote {a.out}')


if __name__ == '__main__':
  main()
