"""bench/ondevice.py's summaries: the comparisons of the block rows and the whole-model ratios."""
import pytest


def test_block_summary_ratios_and_bandwidth_limit(bench_script):
  od = bench_script('ondevice')
  rows = [{'method': m, 'T': T, 'median_ms': ms} for m, T, ms in (
      ('delegate', 1, 0.1), ('delegate', 128, 2.0), ('upstream_moe', 1, 2.0),
      ('upstream_moe', 128, 20.0), ('delegate_cw', 1, 0.08))]
  s = od.block_summary(rows, dict(od.BLOCK), bw=50.0)
  assert s['ratios']['delegate_vs_upstream_moe'] == pytest.approx({'1': 20.0, '128': 10.0})
  assert s['ratios']['delegate_cw_vs_delegate'] == pytest.approx({'1': 1.25})
  assert 'delegate_vs_all_experts' not in s['ratios']          # not timed: left out
  lim = s['bandwidth_limit']['delegate']
  assert lim['limit_ms'] == pytest.approx(od.active_bytes_per_token(od.BLOCK) / 50e9 * 1e3)
  assert lim['fraction'] == pytest.approx(lim['limit_ms'] / 0.1)
  # channel-wise experts read fewer scale bytes than block-32 ones
  assert s['bandwidth_limit']['delegate_cw']['active_bytes'] < lim['active_bytes']


def test_whole_ratios_fastest_next_to_same_arrangement(bench_script):
  od = bench_script('ondevice')
  raw = {'moe_decode_ms': 5.0, 'moe_decode_rounds_ms': [5.0, 5.2], 'moe_fc_decode_ms': 4.0,
         'moe_fc_decode_rounds_ms': [4.0, 4.1], 'dense_decode_ms': 12.0,
         'dense_decode_rounds_ms': [12.0, 12.3], 'dense_fc_decode_ms': 14.0,
         'dense_fc_decode_rounds_ms': [14.0, 14.0], 'moe_prefill128_ms': 80.0,
         'dense_prefill128_ms': 240.0, 'moe_peak_rss_mb': 1200, 'moe_fc_peak_rss_mb': 2000,
         'dense_peak_rss_mb': 2400, 'dense_fc_peak_rss_mb': 3500}
  arr = od.whole_arrangements(raw)
  assert arr['moe'] == {'decode_ms': 5.0, 'decode_rounds_ms': [5.0, 5.2], 'prefill128_ms': 80.0,
                        'peak_rss_mb': 1200}
  assert arr['moe_fc']['peak_rss_mb'] == 2000
  r = od.whole_ratios(arr)
  assert r['decode']['fastest_arrangements'] == {'moe': 'moe_fc', 'dense': 'dense'}
  assert r['decode']['fastest'] == pytest.approx(12.0 / 4.0)
  assert r['decode']['fastest_rounds_min_median_max'] == pytest.approx([12.0 / 4.0, 3.0, 12.3 / 4.1])
  assert r['decode']['same_arrangement'] == pytest.approx(
      {'one_interpreter': 12.0 / 5.0, 'decode_delegate': 14.0 / 4.0})
  assert r['prefill128'] == pytest.approx(3.0)
  assert 'decode_long' not in r and 'prefill512' not in r


def test_released_s_summary_keys_from_the_whole_rows(bench_script):
  od = bench_script('ondevice')
  raw = {'moe_decode_ms': 5.0, 'moe_decode_rounds_ms': [5.0], 'moe_fc_decode_ms': 4.0,
         'moe_fc_decode_rounds_ms': [4.0], 'dense_decode_ms': 12.0,
         'dense_decode_rounds_ms': [12.0], 'dense_fc_decode_ms': 14.0,
         'dense_fc_decode_rounds_ms': [14.0], 'moe_prefill128_ms': 80.0,
         'dense_prefill128_ms': 200.0}
  arr = od.whole_arrangements(raw)
  s = od.released_s_summary({'arrangements': arr, 'ratios': od.whole_ratios(arr)}, bw=40.0)
  assert s['released_s_decode_speedup_vs_dense'] == pytest.approx(3.0)
  assert s['released_s_prefill128_speedup_vs_dense'] == pytest.approx(2.5)
  lim = s['released_s_decode_bandwidth_limit']
  assert lim['arrangement'] == 'moe_fc' and lim['measured_ms'] == 4.0
  # the released S reads ~140-170 MB of INT4 weights per token (272M active params, head included)
  assert 100e6 < lim['weight_bytes_per_token'] < 200e6
  assert lim['limit_ms'] == pytest.approx(
      (lim['weight_bytes_per_token'] + lim['kv_bytes_per_token']) / 40e9 * 1e3)
  assert s['released_s_decode_fraction_of_bandwidth_limit'] == pytest.approx(lim['limit_ms'] / 4.0)
  assert s['cpu_model']


def test_litertlm_workload_writes_its_row_beside_the_runners(bench_script, spm_tokenizer, tmp_path):
  """--litertlm=tiny exports the tiny workload in both conventions, times LiteRT-LM's runtime
  and our runner on it and merges the row into --out, keeping what was there; only the
  headline workload sets the top-level litertlm_* keys. (No timing is asserted.)"""
  import json
  od = bench_script('ondevice')
  out = tmp_path / 'ondevice.json'
  out.write_text(json.dumps({'released_s_decode_speedup_vs_dense': 2.9}))
  od.main(['--litertlm=tiny', '--tokenizer', spm_tokenizer.path, '--out', str(out)])
  res = json.loads(out.read_text())
  assert res['released_s_decode_speedup_vs_dense'] == 2.9
  row = res['litertlm_vs_runner']['tiny']
  assert row['litertlm_decode_tokens_per_s'] > 0 and row['runner_decode_tokens_per_s'] > 0
  assert len(row['litertlm_rounds']) == len(row['runner_rounds']) == row['rounds']
  assert row['threads'] == 2 and row['cpu_model'] and 'command' in row['run']
  assert row['model']['n_layers'] == 2 and row['model']['vocab_size'] == spm_tokenizer.vocab_size
  assert 'litertlm_decode_tokens_per_s' not in res          # tiny is no headline
  headline = dict(row, workload=od.LITERTLM_HEADLINE)
  top = od.merge_litertlm(res, headline, row['run'])
  assert top['litertlm_decode_tokens_per_s'] == row['litertlm_decode_tokens_per_s']
  assert top['litertlm_runner_decode_tokens_per_s'] == row['runner_decode_tokens_per_s']
  assert top['litertlm_cpu_model'] == row['cpu_model'] and top['litertlm_threads'] == 2
  assert set(top['litertlm_vs_runner']) == {'tiny', od.LITERTLM_HEADLINE}


def test_full_run_keeps_the_litertlm_rows_of_the_file_it_replaces(bench_script, tmp_path):
  """A full run rewrites ondevice.json; the --litertlm rows (another mode, with their own run
  record) and the headline's top-level keys come back from the old file."""
  import json
  od = bench_script('ondevice')
  row = {'workload': od.LITERTLM_HEADLINE, 'litertlm_decode_tokens_per_s': 3000.0,
         'runner_decode_tokens_per_s': 2500.0, 'threads': 2, 'cpu_model': 'cpu X'}
  old = od.merge_litertlm({'released_s_decode_speedup_vs_dense': 2.0}, row, {'command': 'old run'})
  path = tmp_path / 'ondevice.json'
  path.write_text(json.dumps(old))
  res = od.keep_litertlm_rows({'released_s_decode_speedup_vs_dense': 3.0}, str(path))
  assert res['released_s_decode_speedup_vs_dense'] == 3.0          # the new run's own keys
  assert res['litertlm_vs_runner'][od.LITERTLM_HEADLINE]['run'] == {'command': 'old run'}
  assert res['litertlm_decode_tokens_per_s'] == 3000.0 and res['litertlm_cpu_model'] == 'cpu X'
  assert od.keep_litertlm_rows({'a': 1}, str(tmp_path / 'missing.json')) == {'a': 1}
