"""bench/runinfo.py: results files are written and read back by one pair of helpers."""
import pytest


def test_results_round_trip_and_a_broken_file_is_named(bench_script, tmp_path):
  runinfo = bench_script('runinfo')
  path = tmp_path / 'results' / 'x.json'
  res = dict(runinfo.run_record('bench/x.py', gpu=False), rows={'a': 1.5})
  runinfo.write_results(str(path), res)
  back = runinfo.read_results(str(path))
  assert back['rows'] == {'a': 1.5} and 'loadavg_end' in back['machine']
  path.write_text('{"rows": ')
  with pytest.raises(ValueError, match=str(path)):
    runinfo.read_results(str(path))
  with pytest.raises(FileNotFoundError, match='missing.json'):
    runinfo.read_results(str(tmp_path / 'missing.json'))
