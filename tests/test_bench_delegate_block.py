"""bench/delegate_block.py's plumbing: builds bench_block, runs the in and out expert layouts,
writes rows, ratios and the table (no timing asserted)."""
import json
import shutil

import pytest

pytestmark = pytest.mark.slow   # builds and runs the C++ harness


def test_writes_rows_ratios_and_table(bench_script, tmp_path, capsys, require):
  require(shutil.which('make') and shutil.which('g++'), 'make and g++')
  blk = bench_script('delegate_block')
  blk.WORKLOADS = {'in_auto_t1': (1, 5, 'auto', 'in'), 'out_auto_t1': (1, 5, 'auto', 'out')}
  out = tmp_path / 'delegate_block.json'
  blk.main(['--rounds', '2', '--out', str(out)])
  res = json.loads(out.read_text())
  assert set(res['rows']) == {'in_auto_t1', 'out_auto_t1'}
  assert all(len(r['rounds_median_ms']) == 2 and r['median_ms'] > 0 for r in res['rows'].values())
  assert res['rows']['out_auto_t1']['expert_group_axis'] == 'out'
  assert res['ratios'] == {'auto_t1': res['rows']['out_auto_t1']['median_ms'] /
                           res['rows']['in_auto_t1']['median_ms']}
  capsys.readouterr()
  blk.main(['--table', '--out', str(out)])
  table = capsys.readouterr().out
  assert res['machine']['cpu'] in table and '| 1 |' in table
