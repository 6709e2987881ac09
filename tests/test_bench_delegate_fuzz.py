"""bench/delegate_fuzz.py's table: the outcome counts and LiteRT's own crashes grouped by the
sanitizer's summary line (the fuzzing itself runs in tests/test_delegate_hostile.py)."""


def test_table_groups_runtime_crashes(bench_script):
  fz = bench_script('delegate_fuzz')
  seg = ('SUMMARY: AddressSanitizer: SEGV (/x/libpywrap_litert_common.so+0x51) in '
         'tflite::xnnpack::(anonymous namespace)::Subgraph::VisitFullyConnectedNode(xnn_subgraph*, int)')
  res = {'machine': {'cpu': 'CPU X', 'cpu_count': 2}, 'commit': 'abc', 'date': '2026-01-01T00:00:00',
         'options': {'command': 'options_fuzzer -runs=10', 'executed_units': 10, 'seconds': 1.0,
                     'new_units_added': 3, 'exit_status': 0, 'sanitizer_reports': 0},
         'models': {'command': 'python -m export.delegate.fuzz.models --mutants 5 --seed 1', 'seconds': 2.0,
                    'counts': {'mutants': 5, 'delegate_crashes': 0, 'runtime_crashes': 3, 'refused': 1,
                               'invoked': 1, 'seconds': 2.0},
                    'crash_reports': [{'crash': 'runtime_crash on 7: rc -11', 'summary': seg}] * 2 +
                                     [{'crash': 'runtime_crash on 9: rc 1', 'summary': ''}]}}
  table = fz.markdown_table(res)
  assert '| 5 (2 s): 1 invoked, 1 refused | 0 / -; 0 writes into constants |' in table
  assert '| 10 (1 s, 3 new coverage units) | 0 / 0 |' in table
  assert '- 2 x SEGV in tflite::xnnpack::Subgraph::VisitFullyConnectedNode' in table
  assert '- 1 x no sanitizer summary' in table
