"""The accounting's one-pass `costs` and the latency model."""
import json

import pytest

from mobilemoe_jax.info import presets
from mobilemoe_jax.scaling import accounting


@pytest.mark.parametrize('name', sorted(presets()))
def test_costs_equal_the_single_functions(name):
  m = presets()[name].model
  dev = accounting.DeviceModel(bandwidth=50e9, compute=2e12, source='test')
  c = accounting.costs(m, 1024, dev)
  counts = accounting.count(m)
  assert (c.total_params, c.active_params) == (counts.total_params, counts.active_params)
  assert c.forward_flops == accounting.forward_flops_per_token(m, 1024)
  assert c.int4_bytes == accounting.int4_weight_bytes(m)
  assert c.active_int4_bytes == accounting.active_int4_bytes_per_token(m)
  assert c.kv_bytes == accounting.kv_cache_bytes(m, 1024)
  assert c.decode_s == pytest.approx(accounting.decode_seconds(m, dev, 1024))


def test_latency_is_bytes_over_bandwidth_and_flops_over_compute():
  m = presets()['mobilemoe_s'].model
  dev = accounting.DeviceModel(bandwidth=1e9, compute=1e12, source='test')
  assert accounting.decode_seconds(m, dev) == accounting.active_int4_bytes_per_token(m) / 1e9
  assert accounting.prefill_seconds(m, 512, dev) == pytest.approx(
      512 * accounting.forward_flops_per_token(m, 256) / 1e12)
  # MoE reads fewer weight bytes per token than the dense baseline, so it decodes faster.
  dense = presets()['mobilellm_pro'].model
  assert accounting.decode_seconds(m, dev) < accounting.decode_seconds(dense, dev) / 3


def test_device_constants_from_benchmark_file(tmp_path):
  assert accounting.load_device(str(tmp_path / 'none.json')) is accounting.ASSUMED_DEVICE
  p = tmp_path / 'ondevice.json'
  p.write_text(json.dumps({'decode_bytes_per_s': 3e10, 'prefill_flops_per_s': 5e11,
                           'device': 'Pixel'}))
  dev = accounting.load_device(str(p))
  assert (dev.bandwidth, dev.compute) == (3e10, 5e11) and 'Pixel' in dev.source
  p.write_text(json.dumps({'decode_tokens_per_s': 20}))
  with pytest.raises(ValueError, match='decode_bytes_per_s'):
    accounting.load_device(str(p))


def test_device_constants_from_the_block_benchmark_record(tmp_path):
  # The layout bench/ondevice.py writes: a block shape and per-method timing rows.
  block = dict(num_experts=4, top_k=1, d_model=8, d_expert=16, d_shared=16)
  rows = [dict(method='delegate', per='block', T=1, median_ms=2.0),
          dict(method='delegate', per='block', T=100, median_ms=10.0),
          dict(method='all_experts', per='block', T=1, median_ms=99.0)]
  p = tmp_path / 'ondevice.json'
  p.write_text(json.dumps({'machine': {'cpu': 'x86_64'}, 'block': block, 'rows': rows,
                           'active_bytes_per_token_per_block': 1000.0}))
  dev = accounting.load_device(str(p))
  assert dev.bandwidth == pytest.approx(1000 / 2e-3)
  flops = 2 * (1 * 3 * 16 + 3 * 16) * 8 + 2 * 4 * 8
  assert dev.compute == pytest.approx(flops * 100 / 10e-3)
  assert 'x86_64' in dev.source
  # Decode faster than the measured DRAM rate means cache hits; the DRAM rate bounds it.
  rec = json.loads(p.read_text())
  p.write_text(json.dumps({**rec, 'dram_read_gbps': 1e-4}))
  assert accounting.load_device(str(p)).bandwidth == pytest.approx(1e5)


# The released checkpoints' parameter counts (notes §1.3: the tied embedding once; norms,
# routers and expert biases included; active = 4 routed experts + the shared one + the rest)
# and their INT4 file data in bytes (§1.4: the sum over the §3.1 tensors; S's matches the
# real file's size less its header). The release keeps norms and expert biases in bf16, which
# the accounting counts as fp32: 2 bytes more per such value.
RELEASED = {
    'mobilemoe_s': (1_263_374_256, 272_469_936, 713_863_008),
    'mobilemoe_m': (2_818_390_552, 528_300_568, 1_590_916_144),
    'mobilemoe_l': (5_325_704_320, 921_685_120, 3_004_279_040),
}


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_released_presets_count_exactly(name):
  total, active, file_bytes = RELEASED[name]
  m = presets()[name].model
  c = accounting.count(m)
  assert (c.total_params, c.active_params) == (total, active)
  norms_and_biases = (2 * m.n_layers + 1) * m.d_model + m.n_layers * m.moe.n_experts
  assert accounting.int4_weight_bytes(m) == file_bytes + 2 * norms_and_biases


def test_info_prints_the_exact_counts():
  import subprocess
  import sys
  out = subprocess.run([sys.executable, '-m', 'mobilemoe_jax.info'], capture_output=True,
                       text=True, check=True).stdout
  total = next(line for line in out.splitlines() if line.startswith('total params')).split()
  active = next(line for line in out.splitlines() if line.startswith('active params')).split()
  header = out.splitlines()[0].split()
  for name, (t, a, _) in RELEASED.items():
    i = header.index(name)
    assert (total[2 + i], active[2 + i]) == (f'{t:,}', f'{a:,}')
