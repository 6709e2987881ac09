"""bench/release_agreement.py's --table (its measurement runs in tests/test_export_release.py,
which bounds the same comparisons)."""
from bench.release_agreement import markdown_tables


def test_release_agreement_table():
  """bench/release_agreement.py's --table: the README's two tables (parted prompts with both
  margins, per-prompt ranges) and the scales' line."""
  from bench.release_agreement import FILES, REFERENCES, RUNTIMES
  row = lambda agree, med, mx, **kw: dict(agree=agree, median_dlogit=med, max_dlogit=mx, **kw)
  per_prompt = [row(16, 0.02, 0.031), row(15, 0.041, 0.31, ref_margin=0.0007, file_margin=0.0034)]
  res = {'machine': {'cpu': 'CPU X'}, 'commit': 'abc', 'date': '2026-01-01T00:00:00', 'prompt_len': 8,
         'fc_scale_rounding_to_bf16': {'scales': 10, 'moved_fraction': 0.8,
                                       'median_relative_change': 0.0015, 'max_relative_change': 0.0039},
         'rows': [{'experts': e, 'runtime': rt, 'reference': ref, 'prompts_equal': 1, 'prompts': 2,
                   'steps': 16, 'delegate': {'claimed': 6}, 'per_prompt': per_prompt}
                  for e in FILES for rt in RUNTIMES for ref in REFERENCES]}
  table = markdown_tables(res)
  assert 'CPU X, commit abc' in table
  assert ('| released integers (`expert_group_axis` out) | XNNPACK | 1 of 2 | step 15 (0.0007 / 0.0034) '
          '| 0.02-0.041 | 0.031-0.31 |') in table
  # the delegate claimed no more nodes when offered the FCs: they stayed on XNNPACK
  assert '| XNNPACK (offered to the delegate, not claimed) | 1 of 2 |' in table
  res['rows'] = [dict(r, delegate={'claimed': 9}) if r['runtime'] == 'delegate_fc' else r for r in res['rows']]
  assert '| released integers (`expert_group_axis` out) | the delegate | 1 of 2 |' in markdown_tables(res)
  assert '| builtin kernels (`OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`) | JAX | 1 of 2 | 0.02-0.041 | 0.31 | 6 nodes |' in table
  assert '80% of 10, median 0.15%, max 0.39%' in table
