"""bench/kv_cache.py's plumbing on a small model: the exports, the measuring child processes,
the results file and its table (no timing is asserted; the cache sizes are exact)."""
import json

import pytest

pytest.importorskip('litert_torch')

pytestmark = pytest.mark.slow   # two .tflite exports


def test_writes_rows_ratios_and_table(bench_script, tmp_path, spm_tokenizer, capsys):
  kv = bench_script('kv_cache')
  kv.MODEL = dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128,
                  sliding_window=0)
  out = tmp_path / 'kv_cache.json'
  kv.main(['--tokenizer', str(spm_tokenizer.path), '--kv-lens', '160', '--no-litertlm',
           '--out', str(out)])
  res = json.loads(out.read_text())
  assert set(res['rows']) == {'runner_160_f32', 'runner_160_int8'}
  assert res['machine']['cpu'] and res['commit'] is not None and res['model'] == kv.MODEL
  f32, int8 = res['rows']['runner_160_f32'], res['rows']['runner_160_int8']
  # 2 layers x (K, V) x [1, kv_heads 1, 160, 32]: f32 4 bytes per value; int8 1 byte + one f32
  # scale per 32 values (per position and head).
  values = 2 * 2 * 160 * 32
  assert f32['cache_mb'] * 2**20 == values * 4
  assert int8['cache_mb'] * 2**20 == values + values // 32 * 4
  assert res['ratios']['runner_160_int8_over_f32_cache_mb'] == int8['cache_mb'] / f32['cache_mb']
  assert all(r['decode_ms'] > 0 and r['peak_rss_mb'] >= r['rss_loaded_mb'] for r in res['rows'].values())
  capsys.readouterr()
  kv.main(['--table', '--out', str(out)])
  table = capsys.readouterr().out
  assert '| 160 | f32 |' in table and '| 160 | int8 |' in table and res['machine']['cpu'] in table
