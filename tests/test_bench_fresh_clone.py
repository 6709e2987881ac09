"""bench/fresh_clone.py's plumbing: a clone of HEAD, the command's row (pytest's counts, its
exit status, the machine), other targets' rows kept, the table; `make install` is stubbed
(no new venv here) and nothing is timed."""
import json
import shutil

from bench.release_agreement import markdown_tables


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
  assert fc.pytest_summary('no summary') is None


def test_release_agreement_table():
  """bench/release_agreement.py's --table: parted prompts with both margins, per-prompt ranges."""
  row = lambda agree, med, mx, **kw: dict(agree=agree, median_dlogit=med, max_dlogit=mx, **kw)
  res = {'machine': {'cpu': 'CPU X'}, 'commit': 'abc', 'date': '2026-01-01T00:00:00', 'prompt_len': 8,
         'fc_scale_rounding_to_bf16': {'scales': 10, 'moved_fraction': 0.8,
                                       'median_relative_change': 0.0015, 'max_relative_change': 0.0039},
         'rows': [{'experts': 'released', 'runtime': 'xnnpack', 'reference': 'jax', 'prompts_equal': 1,
                   'prompts': 2, 'steps': 16, 'delegate': {'claimed': 6},
                   'per_prompt': [row(16, 0.02, 0.031), row(15, 0.041, 0.31, ref_margin=0.0007,
                                                            file_margin=0.0034)]}]}
  table = markdown_tables(res)
  assert 'CPU X, commit abc' in table
  assert '| released | xnnpack | jax | 1 of 2 | 15 (0.0007 / 0.0034) | 0.02-0.041 | 0.031-0.31 | 6 |' in table
  assert '80% of 10, median 0.15%, max 0.39%' in table
