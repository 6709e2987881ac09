"""The delegate's MoE block alone (export/delegate/tools/bench_block.cc, no LiteRT around it):
the released MobileMoE-S's experts in their own layout (groups of 32 along the output axis,
`expert_group_axis` out: the released integers) against the input-axis layout the exporter
re-grids them to, per kernel, decode (1 token) and prefill (128 tokens).

  python bench/delegate_block.py            # -> bench/results/delegate_block.json
  python bench/delegate_block.py --table    # the README table of that file

Block: D 768, 60 experts of 384, top-4, shared 1536 in 16-row tiles, INT4 groups of 32, 8
weight sets so decode streams from DRAM, 2 threads. Each (workload, round) is one bench_block
process; rounds interleave the candidates, so a change in the box's load hits both.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import runinfo  # noqa: E402

DELEGATE = os.path.join(REPO, 'export', 'delegate')
# name: (tokens, iterations, kernel, expert_group_axis)
WORKLOADS = {f'{axis}_{kernel}_t{t}': (t, iters, kernel, axis)
             for kernel in ('auto', 'avx2') for t, iters in ((1, 300), (128, 30))
             for axis in ('in', 'out')}
THREADS, GROUP, WEIGHT_SETS, TILES = 2, 32, 8, 16
LINE = re.compile(r'(?P<kernel>[\w-]+): median (?P<median>[\d.]+) ms\s+p10 (?P<p10>[\d.]+) ms\s+'
                  r'cpu (?P<cpu>[\d.]+) ms/block')


def time_block(binary: str, argv: list) -> dict:
  """One bench_block process (argv after the binary): its kernel and median / p10 / CPU ms."""
  out = subprocess.run([binary, *argv], capture_output=True, text=True, check=True).stdout
  m = LINE.search(out)
  if m is None:
    raise RuntimeError(f'{binary} {" ".join(argv)}: no timing line in its output:\n{out[-2000:]}')
  return {'kernel': m['kernel'], **{k: float(m[k]) for k in ('median', 'p10', 'cpu')}}


def run_once(binary: str, name: str) -> dict:
  t, iters, kernel, axis = WORKLOADS[name]
  return time_block(binary, [str(t), str(iters), str(THREADS), str(GROUP), kernel,
                             str(WEIGHT_SETS), '0', str(TILES), axis, 'released'])


def interleaved_rounds(names, run_once, rounds: int) -> dict:
  """Builds bench_block, then runs every workload once per round, rounds interleaving them:
  {name: [each round's time_block result]}."""
  subprocess.run(['make', '-s', '-C', DELEGATE, 'bench_block'], check=True)
  runs = {name: [] for name in names}
  for r in range(rounds):
    for name in names:
      runs[name].append(run_once(os.path.join(DELEGATE, 'bench_block'), name))
      print(f'round {r + 1}/{rounds} {name}: {runs[name][-1]}', file=sys.stderr, flush=True)
  return runs


def round_stats(rs: list) -> dict:
  """A workload's row fields from its rounds (time_block results): kernel, median of the
  rounds' medians, and each round's median and CPU ms."""
  return {'kernel': rs[0]['kernel'], 'median_ms': statistics.median(x['median'] for x in rs),
          'rounds_median_ms': [x['median'] for x in rs], 'rounds_cpu_ms': [x['cpu'] for x in rs]}


def markdown_table(res: dict) -> str:
  m = res['machine']
  lines = [f"{m['cpu']}, {res['threads']} threads, load average {m['loadavg_start'][0]:.1f} at "
           f"start, {m['loadavg_end'][0]:.1f} at the end; commit {res['commit']}, {res['date']}; "
           f"median ms per block over {res['rounds']} rounds (each round's median)",
           '',
           '| kernel | tokens | experts in (input-axis groups) | experts out (released layout) | out / in |',
           '|---|---|---|---|---|']
  for key, r in res['ratios'].items():
    kernel, t = key.split('_t')
    inn, out = res['rows'][f'in_{kernel}_t{t}'], res['rows'][f'out_{kernel}_t{t}']
    lines.append(f"| {inn['kernel']} | {t} | {inn['median_ms']:.3g} | {out['median_ms']:.3g} | {r:.2f}x |")
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'delegate_block.json'))
  ap.add_argument('--table', action='store_true', help='print the README table of --out')
  a = ap.parse_args(argv)
  if a.table:
    return print(markdown_table(runinfo.read_results(a.out)))
  record = runinfo.run_record('bench/delegate_block.py', gpu=False)
  runs = interleaved_rounds(WORKLOADS, run_once, a.rounds)
  rows = {name: {'tokens': WORKLOADS[name][0], 'expert_group_axis': WORKLOADS[name][3],
                 **round_stats(rs)} for name, rs in runs.items()}
  ratios = {f'{k}_t{t}': rows[f'out_{k}_t{t}']['median_ms'] / rows[f'in_{k}_t{t}']['median_ms']
            for _, (t, _, k, axis) in WORKLOADS.items() if axis == 'in'}
  res = dict(record, threads=THREADS, group_size=GROUP, weight_sets=WEIGHT_SETS, tiles=TILES,
             rounds=a.rounds, rows=rows, ratios=ratios)
  runinfo.write_results(a.out, res)
  print(markdown_table(res))
  return res


if __name__ == '__main__':
  main()
