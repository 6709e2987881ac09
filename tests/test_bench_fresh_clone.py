"""bench/fresh_clone.py's plumbing: a clone of HEAD, the command's row (pytest's counts, its
exit status, the machine), other targets' rows kept, the table; `make install` is stubbed
(no new venv here) and nothing is timed."""
import json
import shutil


def test_writes_a_target_row_and_keeps_the_others(bench_script, tmp_path, capsys, require):
  require(shutil.which('git'), 'git')
  fc = bench_script('fresh_clone')
  real = fc.timed
  fc.timed = lambda cmd, cwd, env, log: (0, 1.0) if cmd == ['make', 'install'] else real(cmd, cwd, env, log)
  # what the clone's command sees: pytest's summary, and no PYTHONPATH from this checkout
  fc.TARGETS = {'test-fast': ['bash', '-c', 'echo "== 3 passed, 1 skipped in 1.50s =="; '
                                            'test -z "$PYTHONPATH"']}
  out = tmp_path / 'fresh_clone.json'
  kept = {'command': '.ci/run', 'commit': 'abc', 'install_seconds': 60.0, 'seconds': 700.0,
          'exit_status': 0, 'pytest': None,
          'machine': {'cpu': 'CPU X', 'cpu_count': 2, 'loadavg_start': [0, 0, 0], 'loadavg_end': [1, 1, 1]}}
  out.write_text(json.dumps({'targets': {'test': kept}}))
  fc.main(['test-fast', '--out', str(out)])
  res = json.loads(out.read_text())
  row = res['targets']['test-fast']
  assert row['pytest'] == {'passed': 3, 'skipped': 1, 'seconds': 1.5}
  assert row['exit_status'] == 0 and row['install_seconds'] == 1.0
  assert row['machine']['cpu'] and len(row['machine']['loadavg_end']) == 3 and row['commit']
  assert res['targets']['test'] == kept
  assert res['machine']['cpu'] == row['machine']['cpu']
  capsys.readouterr()
  fc.main(['--table', '--out', str(out)])
  table = capsys.readouterr().out
  assert '| test | `.ci/run` | abc | CPU X, 2 cores, load 0.0 -> 1.0 | 60 | 700 | - | 0 |' in table
  assert '| 3 passed, 1 skipped in 2 s | 0 |' in table


def test_pytest_summary(bench_script):
  fc = bench_script('fresh_clone')
  assert fc.pytest_summary('x\n=== 675 passed, 3 skipped, 12 warnings in 412.34s (0:06:52) ===\n') == \
      {'passed': 675, 'skipped': 3, 'seconds': 412.34}
  assert fc.pytest_summary('= 1 failed, 2 passed, 1 error in 3.00s =') == \
      {'failed': 1, 'passed': 2, 'error': 1, 'seconds': 3.0}
  # pytest -q (the project's addopts) prints the line without the '='
  assert fc.pytest_summary('.... [100%]\n802 passed, 5 warnings in 871.00s (0:14:30)\n') == \
      {'passed': 802, 'seconds': 871.0}
  assert fc.pytest_summary('no summary') is None
  assert fc.pytest_summary('collected 5 items in 2.0s') is None


def test_demo_table(bench_script):
  """The demo's summary.json as README.md's stage table."""
  fc = bench_script('fresh_clone')
  stage = lambda name, steps, l0, l1, p0, p1, sec: dict(stage=name, steps=steps, loss_start=l0, loss_end=l1,
                                                         ppl_start=p0, ppl_end=p1, seconds=sec)
  summary = {'data_seconds': 7.2, 'ship': {'seconds': 80.4},
             'stages': [stage('pretrain', 600, 7.5591, 4.0081, 1954.2, 74.21, 170.3),
                        stage('qat', 150, 4.104, 4.105, 72.8, 70.8, 83.0)]}
  table = fc.demo_table(summary)
  assert '| data build | | | | 7 s |' in table
  assert '| pretrain | 600 | 7.559 -> 4.008 | 1954 -> 74.2 | 170 s |' in table
  assert '| qat (INT4 g32 weights + int8 activations, fake-quant) | 150 | 4.104 -> 4.105 | 72.8 -> 70.8 | 83 s |' in table
  assert table.endswith('| 80 s |')
