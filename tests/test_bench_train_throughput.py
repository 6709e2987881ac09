"""bench/train_throughput.py: the packed-row batches and one workload end to end on CPU."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'bench', 'train_throughput.py')


def test_packed_rows_layout(bench_script):
  tt = bench_script('train_throughput')
  b = tt.packed_rows(np.random.default_rng(0), 16, 256, 1000)
  assert set(b) == {'inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'}
  assert all(v.shape == (16, 256) for v in b.values())
  seg, pos = b['segment_ids'], b['positions']
  assert (seg.max(axis=1) >= 2).mean() > 0.5          # most rows hold several documents
  for r in range(16):
    real = seg[r] > 0
    assert real.sum() >= 256 - 256 // 32               # padding only at the end, < seq / 32
    assert np.all(real[:real.sum()])
    starts = np.flatnonzero(np.diff(seg[r], prepend=0) != 0)
    for s in starts:                                   # positions restart in every document
      if seg[r, s]:
        assert pos[r, s] == 0
    same = (seg[r, 1:] == seg[r, :-1]) & real[1:]
    # inside a document, each target is the next input and positions count up
    np.testing.assert_array_equal(b['targets'][r, :-1][same], b['inputs'][r, 1:][same])
    np.testing.assert_array_equal(pos[r, 1:][same], pos[r, :-1][same] + 1)
    np.testing.assert_array_equal(b['loss_mask'][r], real.astype(np.float32))


def test_every_vs_names_a_workload_of_the_same_machine_kind(bench_script):
  tt = bench_script('train_throughput')
  for name, w in tt.WORKLOADS.items():
    if w.vs:
      assert w.vs in tt.WORKLOADS, name
      assert tt.WORKLOADS[w.vs].machine == w.machine, name
  assert set(tt.HEADLINE) <= set(tt.WORKLOADS)


@pytest.mark.slow
def test_tiny_packed_workload_end_to_end(tmp_path):
  out = tmp_path / 'train_throughput.json'
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, SCRIPT, '--workload=tiny_cpu_packed', '--alone',
                      '--warmup=0', '--steps=1', f'--out={out}'],
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  rows = json.loads(out.read_text())['rows']
  assert list(rows) == ['tiny_cpu_packed']
  row = rows['tiny_cpu_packed']
  assert 'error' not in row, row
  assert row['workload']['packed'] and row['workload']['preset'] == 'tiny'
  assert row['run']['machine']['cpu'] and row['run']['date'] and 'commit' in row['run']
  res = row['result']
  assert len(res['step_s_all']) == 1 and res['step_s_median'] > 0
  assert res['tokens_per_step'] == 4 * 128
  assert 0 < res['real_tokens_per_step'] <= res['tokens_per_step']
  assert np.isfinite(res['loss_last'])
  assert res['mfu'] is None                            # no peak FLOPs for a CPU
  assert row['model']['n_experts'] == 8 and row['model']['total_params'] > 0
