"""Where the delegate's prefill-128 MoE block loses time: the same block with its weights
cached against streamed from DRAM (export/delegate/tools/bench_block.cc, no LiteRT around it).

A whole model's prefill reads each block's 28 MB of INT4 experts once and then 19 other
blocks' before it comes back, so every block starts from DRAM. `cached` runs one weight set
again and again (it stays in the last-level cache); `dram` cycles through 24 (~680 MB, more
than any cache here). The block is the released MobileMoE-S's as the exporter ships it:
D 768, 60 experts of 384 top-4 and a shared 1536, channel-wise INT4 in 16-row tiles, 128
tokens (~8 per expert). `auto` is the best kernel the CPU has (AMX tiles where Linux grants
them), `avx512` the AVX-512 VNNI kernels alone. The weight stream in GB/s is the block's
INT4 weight bytes over its median time, beside the box's DRAM read rate with as many threads
(bench/ondevice.py's reader, measured in the same run): far below it means the kernel does not
overlap its arithmetic with the stream.

  python bench/block_residency.py            # -> bench/results/block_residency.json
  python bench/block_residency.py --table    # the README table of that file

Each (workload, round) is one bench_block process; rounds interleave the workloads, so a
change in the box's load hits all of them.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import runinfo  # noqa: E402
from bench.delegate_block import TILES, interleaved_rounds, round_stats, time_block  # noqa: E402
from configs import mobilemoe_s  # noqa: E402
from bench.ondevice import dram_read_bandwidth  # noqa: E402

TOKENS, SETS = 128, {'cached': 1, 'dram': 24}
# name: (where the weights are, threads, kernel)
WORKLOADS = {f'{where}_{kernel}_{threads}t': (where, threads, kernel)
             for kernel in ('auto', 'avx512') for threads in (1, 2) for where in SETS}
# The released S block (the preset's shape, which bench_block's `released` shape restates in C++):
# routed + shared INT4 matrices, gate, up and down each.
_S = mobilemoe_s.get_config().model
WEIGHT_BYTES = 3 * _S.d_model * (_S.moe.n_experts * _S.moe.d_expert
                                 + _S.moe.n_shared * _S.moe.d_shared) // 2


def run_once(binary: str, name: str) -> dict:
  where, threads, kernel = WORKLOADS[name]
  sets = SETS[where]
  iters = max(20, 240 // sets)   # at least ~240 blocks timed
  return time_block(binary, [str(TOKENS), str(iters), str(threads), '0', kernel, str(sets), '0',
                             str(TILES), 'in', 'released'])


def markdown_table(res: dict) -> str:
  m = res['machine']
  lines = [f"{m['cpu']}, load average {m['loadavg_start'][0]:.1f} at start, "
           f"{m['loadavg_end'][0]:.1f} at the end; commit {res['commit']}, {res['date']}; "
           f"{res['tokens']} tokens, median ms per block over {res['rounds']} rounds (each "
           f"round's median); weight stream = {res['weight_bytes'] / 1e6:.1f} MB of INT4 per "
           'block / median time',
           '',
           '| kernel | threads | cached ms | DRAM ms | DRAM / cached | weight stream from DRAM GB/s '
           '| DRAM read rate GB/s |', '|---|---|---|---|---|---|---|']
  for key, r in res['ratios'].items():
    kernel, threads = key.rsplit('_', 1)
    c, d = res['rows'][f'cached_{key}'], res['rows'][f'dram_{key}']
    lines.append(f"| {d['kernel']} | {threads[:-1]} | {c['median_ms']:.3g} | {d['median_ms']:.3g} | "
                 f"{r:.2f}x | {d['weight_gbps']:.1f} | {res['dram_read_gbps'][threads[:-1]]:.1f} |")
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'block_residency.json'))
  ap.add_argument('--table', action='store_true', help='print the README table of --out')
  a = ap.parse_args(argv)
  if a.table:
    return print(markdown_table(runinfo.read_results(a.out)))
  record = runinfo.run_record('bench/block_residency.py', gpu=False)
  runs = interleaved_rounds(WORKLOADS, run_once, a.rounds)
  rows = {}
  for name, rs in runs.items():
    where, threads, _ = WORKLOADS[name]
    stats = round_stats(rs)
    rows[name] = {'weights': where, 'weight_sets': SETS[where], 'threads': threads, **stats,
                  'weight_gbps': WEIGHT_BYTES / (stats['median_ms'] * 1e-3) / 1e9}
  ratios = {name[len('dram_'):]: rows[name]['median_ms'] / rows['cached_' + name[len('dram_'):]]['median_ms']
            for name in rows if name.startswith('dram_')}
  threads = sorted({t for _, t, _ in WORKLOADS.values()})
  res = dict(record, tokens=TOKENS, weight_bytes=WEIGHT_BYTES, rounds=a.rounds, rows=rows,
             ratios=ratios, dram_read_gbps={str(t): dram_read_bandwidth(t) for t in threads})
  runinfo.write_results(a.out, res)
  print(markdown_table(res))
  return res


if __name__ == '__main__':
  main()
