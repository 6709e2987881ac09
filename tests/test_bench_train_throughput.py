"""bench/train_throughput.py: the packed-row batches and one workload end to end on CPU."""
import argparse
import dataclasses
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


def test_released_workloads_run_the_released_counts(bench_script):
  """rs_* / rm_* train the released S / M presets (their published parameter counts) with the
  capacity each workload names."""
  from mobilemoe_jax import config
  from mobilemoe_jax.scaling import accounting
  tt = bench_script('train_throughput')
  released = {'rs_b8_packed': (1_263_374_256, 272_469_936),
              'rm_b256_accum64_packed': (2_818_390_552, 528_300_568)}
  for name, want in released.items():
    cfg = tt.model_cfg(tt.WORKLOADS[name])
    config.validate(cfg)
    counts = accounting.count(cfg)
    assert (counts.total_params, counts.active_params) == want, name
    assert cfg.moe.capacity_factor == 1.25, name
  assert tt.model_cfg(tt.WORKLOADS['rs_b8_dropless_packed']).moe.capacity_factor == 0


def test_weak_scaling_workloads_are_the_one_gpu_step_on_more_gpus(bench_script):
  """rs_ep2 / rs_ep4: rs_b8_packed's step, rows per GPU and all, with the experts split over
  2 / 4 GPUs; each is measured beside rs_b8_packed (its `vs`), the 1-GPU point."""
  import dataclasses
  tt = bench_script('train_throughput')
  one = tt.WORKLOADS['rs_b8_packed']
  assert one.devices == 1
  for n_gpu, name in tt.SUMMARY['weak_scaling'].items():
    w = tt.WORKLOADS[name]
    assert (w.devices, w.vs) == (n_gpu, 'rs_b8_packed')
    same = {f.name for f in dataclasses.fields(w)} - {'what', 'devices', 'vs'}
    assert {f: getattr(w, f) for f in same} == {f: getattr(one, f) for f in same}, name
    assert tt.select(argparse.Namespace(headline=False, workload=name, alone=False)) == [
        'rs_b8', 'rs_b8_packed', name]


def test_worker_env_turns_on_the_latency_hiding_scheduler_where_collectives_run(bench_script):
  tt = bench_script('train_throughput')
  flag = '--xla_gpu_enable_latency_hiding_scheduler=true'
  env = tt.worker_env(tt.WORKLOADS['rs_ep4'], {'XLA_FLAGS': '--xla_dump_to=/tmp/x'})
  assert env['XLA_FLAGS'] == f'--xla_dump_to=/tmp/x {flag}' and env['CUDA_VISIBLE_DEVICES'] == '0,1,2,3'
  assert 'XLA_FLAGS' not in tt.worker_env(tt.WORKLOADS['rs_b8_packed'], {})   # one GPU
  cpu = tt.worker_env(tt.WORKLOADS['tiny_cpu_ep2'], {})
  assert cpu['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=2']
  assert cpu['JAX_PLATFORMS'] == 'cpu'


def _row(tps, date, device='NVIDIA H100 80GB HBM3', commit=None, **result):
  return {'result': dict(tokens_per_s_per_device=tps, **result), 'device_kind': device,
          'run': {'date': date, 'commit': commit}}


def test_varlen_shim_maps_torchtitans_keywords_onto_an_older_varlen_attn(bench_script):
  """torchtitan calls varlen_attn with window_size / num_splits / enable_gqa; a torch whose
  varlen_attn has only is_causal gets the causal flag and none of the others."""
  tt = bench_script('train_throughput')
  calls = []

  def old_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                 is_causal=False):
    calls.append(dict(return_aux=return_aux, scale=scale, is_causal=is_causal))
    return 'out'
  shim = tt._varlen_attn_for(old_varlen, frozenset(['return_aux', 'scale', 'is_causal']))
  assert shim(1, 2, 3, 4, 5, 6, 7, scale=0.125, window_size=(-1, 0), num_splits=1,
              enable_gqa=True) == 'out'
  assert calls == [dict(return_aux=None, scale=0.125, is_causal=True)]
  shim(1, 2, 3, 4, 5, 6, 7, window_size=(-1, -1))
  assert calls[-1]['is_causal'] is False
  with pytest.raises(NotImplementedError, match='window_size'):
    shim(1, 2, 3, 4, 5, 6, 7, window_size=(128, 0))


def test_gpu_summary_takes_the_fastest_peer_of_the_same_run(bench_script):
  tt = bench_script('train_throughput')
  rows = {'rs_b256_accum16_packed': _row(170e3, 'd0', mfu=0.3),
          'rs_b8': _row(150e3, 'd1'), 'rs_b8_packed': _row(140e3, 'd1'),
          'rs_b8_dropless_packed': {'error': 'out of memory', 'run': {'date': 'd0'}},
          'peer_torchtitan_rs_b8_packed': _row(100e3, 'd0'),          # another run: ignored
          'peer_torchtitan_eager_rs_b8_packed': _row(70e3, 'd1'),
          'peer_transformers_rs_b8': _row(30e3, 'd1')}
  s = tt.gpu_summary(rows)
  assert s['mfu_released_s_1gpu'] == 0.3
  assert s['mfu_released_s_1gpu_workload'] == 'rs_b256_accum16_packed'
  assert s['mfu_released_s_1gpu_dropless'] is None
  assert s['mfu_released_s_1gpu_dropless_reason'] == 'rs_b256_accum16_dropless_packed not measured'
  assert s['mfu_released_m_1gpu'] is None
  assert s['mfu_released_m_1gpu_reason'].startswith('rm_b256_accum64_packed not measured; ')
  assert s['best_peer'] == 'peer_torchtitan_eager_rs_b8_packed'
  assert s['speedup_vs_best_peer'] == 2.0
  assert s['speedup_dropless_vs_best_peer'] is None
  assert s['speedup_dropless_vs_best_peer_reason'] == 'out of memory'
  for n in (2, 4):
    assert s[f'weak_scaling_efficiency_{n}gpu'] is None
    assert s[f'weak_scaling_efficiency_{n}gpu_reason'] == (
        f'rs_ep{n} not measured: it needs a machine with {n} GPUs')
  rows['rs_ep4'] = dict(_row(120e3, 'd2'), vs={'ratio': 0.9})
  rows['rs_ep2'] = {'error': 'out of memory', 'run': {'date': 'd2'}}
  s = tt.gpu_summary(rows)
  assert s['weak_scaling_efficiency_4gpu'] == 0.9
  assert s['weak_scaling_efficiency_2gpu'] is None
  assert s['weak_scaling_efficiency_2gpu_reason'] == 'out of memory'
  rows['rs_ep2'] = _row(130e3, 'd3')                  # measured --alone: no ratio to take
  assert 'without rs_b8_packed' in tt.gpu_summary(rows)['weak_scaling_efficiency_2gpu_reason']
  rows = {k: v for k, v in rows.items() if not k.startswith('peer_')}
  assert tt.gpu_summary(rows)['speedup_vs_best_peer'] is None
  rows['rs_b256_accum16_dropless_packed'] = _row(180e3, 'd0', mfu=0.32)
  assert tt.gpu_summary(rows)['mfu_released_s_1gpu_dropless'] == 0.32
  rows['rm_b256_accum64_packed'] = _row(90e3, 'd5', mfu=0.31)
  s = tt.gpu_summary(rows)
  assert s['mfu_released_m_1gpu'] == 0.31 and s['mfu_released_m_1gpu_date'] == 'd5'
  rows['rs_b256_accum16_packed'] = {'error': 'out of memory', 'run': {'date': 'd4'}}
  s = tt.gpu_summary(rows)
  assert s['mfu_released_s_1gpu'] is None
  assert s['mfu_released_s_1gpu_reason'] == ('out of memory; rs_b256_accum8_packed not measured; '
                                             'rs_b256_accum4_packed not measured')
  # the best of the micro-batch sizes measured; a failed one is listed beside it
  rows['rs_b256_accum8_packed'] = _row(200e3, 'd6', commit='abc', mfu=0.35)
  rows['rs_b256_accum4_packed'] = _row(210e3, 'd6', commit='abc', mfu=0.37)
  s = tt.gpu_summary(rows)
  assert (s['mfu_released_s_1gpu'], s['mfu_released_s_1gpu_workload']) == (0.37, 'rs_b256_accum4_packed')
  assert (s['mfu_released_s_1gpu_commit'], s['mfu_released_s_1gpu_date']) == ('abc', 'd6')
  assert s['mfu_released_s_1gpu_by_workload'] == {
      'rs_b256_accum16_packed': 'failed: out of memory', 'rs_b256_accum8_packed': 0.35,
      'rs_b256_accum4_packed': 0.37}


H100, H200 = 'NVIDIA H100 80GB HBM3', 'NVIDIA H200'


def test_summary_names_each_figures_gpu_and_keeps_every_gpus_own(bench_script):
  """MFU: the best over GPUs and micro-batch sizes, the other GPU's figure under by_gpu; the
  peer speedup: the lowest over GPUs; weak scaling: null with the reason where no GPU has it."""
  tt = bench_script('train_throughput')
  h100 = {'rs_b256_accum16_packed': _row(188e3, 'd0', H100, 'c1', mfu=0.347),
          'rs_b8_packed': _row(143e3, 'd1', H100, 'c2'),
          'peer_torchtitan_rs_b8_packed': _row(94e3, 'd1', H100, 'c2')}
  h200 = {'rs_b256_accum16_packed': _row(200e3, 'd2', H200, 'c3', mfu=0.37),
          'rs_b256_accum8_packed': _row(215e3, 'd2', H200, 'c3', mfu=0.39),
          'rs_b8_packed': _row(160e3, 'd3', H200, 'c3'),
          'peer_torchtitan_rs_b8_packed': _row(100e3, 'd3', H200, 'c3')}
  s = tt.summary({H100: h100, H200: h200, 'cpu': {'tiny_cpu': _row(2e3, 'd4', 'cpu')}})
  assert s['mfu_released_s_1gpu'] == 0.39
  assert (s['mfu_released_s_1gpu_gpu'], s['mfu_released_s_1gpu_workload'],
          s['mfu_released_s_1gpu_commit']) == (H200, 'rs_b256_accum8_packed', 'c3')
  assert set(s['by_gpu']) == {H100, H200}
  h = s['by_gpu'][H100]
  assert (h['mfu_released_s_1gpu'], h['mfu_released_s_1gpu_workload'], h['mfu_released_s_1gpu_commit'],
          h['mfu_released_s_1gpu_date']) == (0.347, 'rs_b256_accum16_packed', 'c1', 'd0')
  assert s['speedup_vs_best_peer'] == 143e3 / 94e3 and s['speedup_vs_best_peer_gpu'] == H100
  assert s['best_peer'] == 'peer_torchtitan_rs_b8_packed' and s['best_peer_tokens_per_s'] == 94e3
  assert s['by_gpu'][H200]['speedup_vs_best_peer'] == 1.6
  assert s['mfu_released_m_1gpu'] is None and H200 in s['mfu_released_m_1gpu_reason']
  assert s['weak_scaling_efficiency_4gpu'] is None
  assert s['weak_scaling_efficiency_4gpu_reason'] == 'rs_ep4 not measured: it needs a machine with 4 GPUs'
  del h200['peer_torchtitan_rs_b8_packed']
  del h100['peer_torchtitan_rs_b8_packed']
  s = tt.summary({H100: h100, H200: h200})
  assert s['speedup_vs_best_peer'] is None and 'same run' in s['speedup_vs_best_peer_reason']


def test_a_device_run_merged_keeps_the_other_gpus_rows(bench_script, tmp_path):
  """--merge of an H200 run's file replaces the H200 rows of its workloads only; a file of the
  earlier shape (rows keyed by workload alone) is keyed by GPU on reading."""
  tt = bench_script('train_throughput')
  out, device = tmp_path / 'stored.json', tmp_path / 'device.json'
  old = _row(188e3, 'd0', H100, 'c1', mfu=0.347)
  oom = {'error': 'out of memory', 'run': {'date': 'd0', 'machine': {'gpus': [f'{H100}, 81559 MiB']}}}
  out.write_text(json.dumps({'benchmark': 'x', 'rows': {
      'rs_b256_accum16_packed': old, 'rs_b256_accum8_packed': oom,
      'tiny_cpu': _row(2e3, 'd4', 'cpu'), 'a_workload_since_removed': old}}))
  new = _row(200e3, 'd2', H200, 'c3', mfu=0.37)
  device.write_text(json.dumps({'benchmark': 'x', 'rows': {H200: {'rs_b256_accum16_packed': new}}}))
  a = argparse.Namespace(out=str(out))
  tt.merge([str(device)], a)
  stored = json.loads(out.read_text())
  assert stored['rows'] == {H100: {'rs_b256_accum16_packed': old, 'rs_b256_accum8_packed': oom},
                            H200: {'rs_b256_accum16_packed': new},
                            'cpu': {'tiny_cpu': _row(2e3, 'd4', 'cpu')}}
  assert stored['summary']['mfu_released_s_1gpu_gpu'] == H200
  assert stored['summary']['by_gpu'][H100]['mfu_released_s_1gpu'] == 0.347
  newer = _row(210e3, 'd5', H200, 'c4', mfu=0.38)   # the same workload and GPU: replaced
  device.write_text(json.dumps({'benchmark': 'x', 'rows': {H200: {'rs_b256_accum16_packed': newer}}}))
  tt.merge([str(device)], a)
  rows = json.loads(out.read_text())['rows']
  assert rows[H200] == {'rs_b256_accum16_packed': newer} and rows[H100]['rs_b256_accum16_packed'] == old
  results = json.loads(out.read_text())
  for n, r in ((n, r) for rs in results['rows'].values() for n, r in rs.items()):
    r['workload'] = dataclasses.asdict(tt.WORKLOADS[n])
    r['run'].setdefault('machine', {'cpu': 'AMD EPYC'})
    r.get('result', {}).setdefault('step_s_median', 1.0)
  table = tt.table(results)
  assert table.index(f'| {H100} |') < table.index(f'| {H200} |') < table.index('| rs_b256_accum8_packed')




@pytest.mark.slow
def test_tiny_packed_workload_end_to_end(tmp_path):
  out = tmp_path / 'train_throughput.json'
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, SCRIPT, '--workload=tiny_cpu_packed', '--alone',
                      '--warmup=0', '--steps=1', f'--out={out}'],
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  rows = json.loads(out.read_text())['rows']
  assert {d: list(r) for d, r in rows.items()} == {'cpu': ['tiny_cpu_packed']}
  row = rows['cpu']['tiny_cpu_packed']
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


@pytest.mark.slow
def test_expert_parallel_workload_end_to_end(tmp_path):
  """The multi-device path the weak-scaling rows take (mesh expert=devices), on 2 fake CPU
  devices."""
  out = tmp_path / 'train_throughput.json'
  r = subprocess.run([sys.executable, SCRIPT, '--workload=tiny_cpu_ep2', '--alone', '--warmup=0',
                      '--steps=1', f'--out={out}'], env=dict(os.environ, PYTHONPATH=ROOT),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  row = json.loads(out.read_text())['rows']['cpu']['tiny_cpu_ep2']
  assert 'error' not in row, row
  res = row['result']
  assert row['workload']['devices'] == 2 and res['tokens_per_step'] == 2 * 4 * 128
  assert res['ep_overlap_chunks'] == 2 and np.isfinite(res['loss_last'])
  assert '--xla_force_host_platform_device_count=2' in res['xla_flags'].split()


def test_ab_step_variant_settings(bench_script):
  """bench/ab_step.py: a variant's settings split into module switches and XLA options."""
  ab = bench_script('ab_step')
  assert ab.parse_variant('base') == ('base', {}, {})
  name, switches, options = ab.parse_variant(
      "v=mobilemoe_jax.train.trainer.FP32_MATRICES=('router',) xla_gpu_triton_gemm_any=True")
  assert name == 'v' and options == {'xla_gpu_triton_gemm_any': True}
  assert switches == {('mobilemoe_jax.train.trainer', 'FP32_MATRICES'): ('router',)}
