"""bench/block_residency.py's plumbing: builds bench_block, runs a block with cached and with
DRAM-streamed weights, writes rows, ratios, the DRAM rate and the table (no timing asserted)."""
import json
import shutil

import pytest

pytestmark = pytest.mark.slow   # builds and runs the C++ harness


def test_writes_rows_ratios_and_table(bench_script, tmp_path, capsys, require):
  require(shutil.which('make') and shutil.which('g++') and shutil.which('gcc'), 'make, g++, gcc')
  br = bench_script('block_residency')
  br.WORKLOADS = {'cached_auto_2t': ('cached', 2, 'auto'), 'dram_auto_2t': ('dram', 2, 'auto')}
  br.SETS = {'cached': 1, 'dram': 2}     # two weight sets: the plumbing, not the cache effect
  br.TOKENS = 16
  out = tmp_path / 'block_residency.json'
  br.main(['--rounds', '2', '--out', str(out)])
  res = json.loads(out.read_text())
  assert set(res['rows']) == {'cached_auto_2t', 'dram_auto_2t'}
  rows = res['rows']
  assert all(len(r['rounds_median_ms']) == 2 and r['median_ms'] > 0 for r in rows.values())
  assert (rows['cached_auto_2t']['weight_sets'], rows['dram_auto_2t']['weight_sets']) == (1, 2)
  assert res['ratios'] == {'auto_2t': rows['dram_auto_2t']['median_ms'] /
                           rows['cached_auto_2t']['median_ms']}
  assert rows['dram_auto_2t']['weight_gbps'] == pytest.approx(
      br.WEIGHT_BYTES / rows['dram_auto_2t']['median_ms'] / 1e6)
  assert set(res['dram_read_gbps']) == {'2'} and res['dram_read_gbps']['2'] > 0
  capsys.readouterr()
  br.main(['--table', '--out', str(out)])
  table = capsys.readouterr().out
  assert res['machine']['cpu'] in table and '| 2 |' in table
