"""PyTorch MobileMoE == JAX model (fp32), its KV cache, files and error messages."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax.numpy as jnp
from flax import nnx

from configs import tiny
from export import torch_model as tm
from mobilemoe_jax.config import ConfigError
from mobilemoe_jax.model import Transformer
from tests.support.models import TOKENS, lsq_model, make


@pytest.mark.parametrize('kind,moe', [
    ('dense', {}),
    ('moe', {}),
    ('moe', dict(score_func='sigmoid', expert_bias=True, routed_scale=2.5, norm_topk_prob=False)),
])
def test_torch_logits_equal_jax(kind, moe):
  cfg, m = make(kind, **moe)
  want = np.asarray(m(jnp.asarray(TOKENS))[0])
  pt = tm.from_flax(m, cfg)
  with torch.no_grad():
    got = pt(torch.from_numpy(TOKENS)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize('kv_cache,storage', [(None, 'f32'), ('int8', 'f32'), ('int8', 'int8')])
def test_kv_cache_prefill_decode_equals_full_forward(kv_cache, storage):
  """With model.quant.kv_cache='int8', K/V go through the int8 grid as in JAX: the cache
  tensors hold those values in f32, or (storage 'int8', set_kv_cache_dtype) the integers
  and their scales."""
  cfg, m = make('moe')
  float_model = m
  if kv_cache:
    cfg.quant.kv_cache = kv_cache
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    nnx.update(m, nnx.state(float_model))
  pt = tm.from_flax(m, cfg).set_kv_cache_dtype(storage)
  tok = torch.from_numpy(TOKENS)
  rows = lambda t: [(2, t, cfg.n_kv_heads, cfg.head_dim)] * 2 + [(2, t, cfg.n_kv_heads)] * (
      2 if storage == 'int8' else 0)
  with torch.no_grad():
    full = pt(tok)
    # Stale junk past the fill must not leak in (the runner's cache slots beyond pos).
    cache = [tuple(torch.full_like(c, 100 if c.dtype == torch.int8 else 1e3) for c in kv)
             for kv in pt.empty_cache(2, 96)]
    assert [c.dtype for c in cache[0]] == ([torch.int8] * 2 + [torch.float32] * 2
                                           if storage == 'int8' else [torch.float32] * 2)
    out, new = pt(tok[:, :70], torch.arange(70, dtype=torch.int32), cache)
    assert [tuple(c.shape) for c in new[0]] == rows(70)
    steps = [out]
    for layer, kv in zip(cache, new):
      tm.write_cache(layer, kv, 0)
    for i in range(70, 90):
      o, new = pt(tok[:, i:i + 1], torch.tensor([i], dtype=torch.int32), cache)
      assert [tuple(c.shape) for c in new[0]] == rows(1)
      for layer, kv in zip(cache, new):
        tm.write_cache(layer, kv, i)
      steps.append(o)
  # int8: one token's K computed in another matmul shape can differ in the last ulp and
  # round to the neighbouring integer, a whole grid step: hence the looser tolerance.
  atol = 1e-4 if kv_cache else 1e-5
  np.testing.assert_allclose(torch.cat(steps, 1).numpy(), full.numpy(), atol=atol, rtol=0)
  if kv_cache:
    want = np.asarray(m(jnp.asarray(TOKENS))[0])
    np.testing.assert_allclose(full.numpy(), want, atol=1e-4, rtol=0)
    assert np.abs(want - np.asarray(float_model(jnp.asarray(TOKENS))[0])).max() > 1e-3  # it acts


def test_save_load_roundtrip(tmp_path):
  cfg, m = make('moe')
  pt = tm.from_flax(m, cfg)
  tm.save(pt, str(tmp_path))
  back = tm.load(str(tmp_path))
  with torch.no_grad():
    np.testing.assert_array_equal(back(torch.from_numpy(TOKENS)).numpy(),
                                  pt(torch.from_numpy(TOKENS)).numpy())


def test_checkpoint_config_mismatch_is_clear(tmp_path):
  cfg, m = make('moe')
  dense = tiny.get_config('dense').model
  with pytest.raises(tm.ConfigMismatch, match=r'blocks\.1\.ffn\.gate: checkpoint shape \(8, 128, 64\) != \(128, 384\)'):
    tm.from_flax(m, dense)
  wider = tiny.get_config('moe').model
  wider.d_model = 256
  with pytest.raises(tm.ConfigMismatch, match="embed: checkpoint shape"):
    tm.from_flax(m, wider)
  fewer = tiny.get_config('moe').model
  fewer.n_layers = 2
  with pytest.raises(tm.ConfigMismatch, match='does not use'):
    tm.from_flax(m, fewer)
  with pytest.raises(FileNotFoundError, match='config.json is missing'):
    tm.load(str(tmp_path))


def test_unsupported_config_is_clear():
  from mobilemoe_jax.config import ConfigError
  cfg = tiny.get_config('moe').model.to_dict()
  cfg['moe']['score_func'] = 'relu'
  with pytest.raises(ConfigError, match='score_func'):
    tm.config_dict(cfg)


@pytest.mark.parametrize('kind', ['dense', 'moe'])
def test_fake_quant_torch_equals_jax_qat_forward(kind):
  """The weights the INT4 .tflite holds (litert.fake_quant: every FC but the router and the
  tied embedding on int4_g32) give the JAX QAT forward (model.quant.weights='int4_g32')."""
  from export import litert
  cfg, m = make(kind)
  qcfg = copy.deepcopy(cfg)
  qcfg.quant.weights = 'int4_g32'
  qm = Transformer(qcfg, rngs=nnx.Rngs(0))
  nnx.update(qm, nnx.state(m, nnx.Param))
  want = np.asarray(qm(jnp.asarray(TOKENS))[0])
  with torch.no_grad():
    got = litert.fake_quant(tm.from_flax(m, cfg), 'int4_g32', 'auto')(torch.from_numpy(TOKENS)).numpy()
    as_xnnpack = litert.fake_quant(tm.from_flax(m, cfg), 'int4_g32', 'auto',
                                   xnnpack=True)(torch.from_numpy(TOKENS)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # Block scales on the 'tflite' rule are bf16 values: XNNPACK's rounding leaves them as they are.
  np.testing.assert_array_equal(as_xnnpack, got)


def test_cli_sources_fail_clearly(tmp_path):
  from export import checkpoint
  with pytest.raises(FileNotFoundError, match='no such file or directory'):
    checkpoint.load_any(str(tmp_path / 'nope'))
  cfg, m = make('moe')
  tm.save(tm.from_flax(m, cfg), str(tmp_path / 'moe'))
  with pytest.raises(tm.ConfigMismatch, match=r"differs from --config configs/tiny.py:dense in \['moe'\]"):
    checkpoint.load_any(str(tmp_path / 'moe'), 'configs/tiny.py:dense')
  assert checkpoint.load_any(str(tmp_path / 'moe'), 'configs/tiny.py:moe').cfg['moe']['n_experts'] == 8


def test_lsq_checkpoint_converts_to_its_exact_grid(tmp_path):
  """A QAT model with learned scales converts to the weights its forward computes with
  (PyTorch == JAX fake-quant forward), carrying its integers and scales, which survive
  save/load and are what the exporter's reference model (litert.fake_quant) uses."""
  from export import litert
  from mobilemoe_jax.quant import grid
  cfg, qm = lsq_model(*make('moe'))
  want = np.asarray(qm(jnp.asarray(TOKENS))[0])
  pt = tm.from_flax(qm, cfg)
  with torch.no_grad():
    got = pt(torch.from_numpy(TOKENS)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    ref = litert.fake_quant(pt, 'int4_g32', 'auto')(torch.from_numpy(TOKENS)).numpy()
  np.testing.assert_array_equal(ref, got)
  exact = tm.grids(pt)
  assert len(exact) == len(tm.grid_names(pt))
  learned = 0
  for name, g in exact.items():
    w = pt.get_parameter(name).detach().numpy()
    assert g.q.dtype == np.int8 and g.q.min() >= -8 and g.q.max() <= 7
    np.testing.assert_array_equal(grid.dequantize(g.q, g.scales), w)
    learned += not np.array_equal(grid.quantize(w, 'int4_g32')[1], g.scales)
  assert learned == len(exact) - 1          # all but the embedding (no learned scale there)
  tm.save(pt, str(tmp_path / 'pt'))
  back = tm.grids(tm.load(str(tmp_path / 'pt')))
  assert back.keys() == exact.keys()
  for name, g in exact.items():
    np.testing.assert_array_equal(back[name].q, g.q)
    np.testing.assert_array_equal(back[name].scales, g.scales)


@pytest.mark.slow
def test_litert_torch_does_not_change_jax_precision(tmp_path):
  """litert_torch turns on jax_enable_x64 at import and while converting; the export package
  must not let that leak into a process that also trains (it broke bit-exact resume when the
  test suite ran export and training tests in one process)."""
  import jax
  from export import import_litert_torch, litert
  from export.torch_model import from_flax
  assert not jax.config.jax_enable_x64
  import_litert_torch()
  assert not jax.config.jax_enable_x64
  cfg = tiny.get_config('dense').model
  cfg.n_layers = 1
  torch_model = from_flax(Transformer(cfg, rngs=nnx.Rngs(0)), cfg)
  litert.convert_fp32(torch_model, str(tmp_path / 'm.tflite'), prefill_lens=(4,), kv_len=8,
                      log=lambda _: None)
  assert not jax.config.jax_enable_x64


def test_torch_equals_jax_with_the_released_attention_and_layer_pattern():
  """QK-norm, llama3-scaled RoPE frequencies, a NoPE layer and MoE on every other layer (the
  released MobileMoE's features; original_max_len small enough that the scaling moves
  pairs at this head size): full forward and prefill + cached decode equal JAX."""
  cfg = tiny.get_config('moe').model
  cfg.qk_norm = True
  cfg.rope_scaling.update(dict(kind='llama3', factor=16.0, original_max_len=64,
                               low_freq_factor=1.0, high_freq_factor=4.0))
  cfg.nope_layers = (1,)
  cfg.moe.update(dict(first_dense=0, every=2, score_func='sigmoid', expert_bias=True,
                      routed_scale=2.5))
  m = Transformer(cfg, rngs=nnx.Rngs(0))
  for b in m.blocks:
    if hasattr(b.ffn, 'router'):
      b.ffn.router[...] = b.ffn.router[...] * 30.0
  want = np.asarray(m(jnp.asarray(TOKENS))[0])
  pt = tm.from_flax(m, cfg)
  assert [type(b.ffn).__name__ for b in pt.blocks][:2] == ['MLP', 'MoE']
  assert [b.attn.use_rope for b in pt.blocks][:3] == [True, False, True]
  tok = torch.from_numpy(TOKENS)
  with torch.no_grad():
    np.testing.assert_allclose(pt(tok).numpy(), want, atol=1e-4, rtol=0)
    cache = pt.empty_cache(2, 96)
    out, new = pt(tok[:, :80], torch.arange(80, dtype=torch.int32), cache)
    for layer, kv in zip(cache, new):
      tm.write_cache(layer, kv, 0)
    last, _ = pt(tok[:, 80:81], torch.tensor([80], dtype=torch.int32), cache)
  np.testing.assert_allclose(out.numpy(), want[:, :80], atol=1e-4, rtol=0)
  np.testing.assert_allclose(last.numpy()[:, 0], want[:, 80], atol=1e-4, rtol=0)


def test_release_grid_converts_with_its_experts_left_to_the_tflite_grid():
  """The released MobileMoE's grid (experts grouped along their output axis, mobilemoe_jax/
  convert): PyTorch computes with the exact dequantized weights (== JAX); every weight but
  the routed experts carries its integers for the .tflite, whose block-wise FCs can only
  group along inputs."""
  import re
  from mobilemoe_jax.quant import qat
  cfg, float_model = make('moe')
  cfg.quant.update(dict(weights='int4_g32', learnable_scale=True, learnable_embedding_scale=True,
                        expert_group_axis='out', scale_rule='release'))
  qm = Transformer(cfg, rngs=nnx.Rngs(0))
  nnx.update(qm, nnx.state(float_model, nnx.Param))
  qat.init_scales_from_weights(qm)
  want = np.asarray(qm(jnp.asarray(TOKENS))[0])
  pt = tm.from_flax(qm, cfg)
  with torch.no_grad():
    np.testing.assert_allclose(pt(torch.from_numpy(TOKENS)).numpy(), want, atol=1e-4, rtol=0)
  routed = re.compile(r'\.ffn\.(gate_up|down\.\d+)\.weight$')
  names = tm.grid_names(pt)
  assert set(tm.grids(pt)) == {n for n in names if not routed.search(n)}
  assert any(routed.search(n) for n in names) and 'embed.weight' in tm.grids(pt)


def test_export_dir_with_retired_fields_loads_or_is_refused(tmp_path):
  """An export dir written before fuse_gate_up was retired: its kept value loads the same
  model; the other value is refused naming the file, the field and what replaced it."""
  import json
  cfg, m = make('moe')
  pt = tm.from_flax(m, cfg)
  tm.save(pt, str(tmp_path))
  path = tmp_path / 'config.json'
  meta = json.loads(path.read_text())
  meta['model']['fuse_gate_up'] = True
  path.write_text(json.dumps(meta))
  with torch.no_grad():
    np.testing.assert_array_equal(tm.load(str(tmp_path))(torch.from_numpy(TOKENS)).numpy(),
                                  pt(torch.from_numpy(TOKENS)).numpy())
  meta['model']['fuse_gate_up'] = False
  path.write_text(json.dumps(meta))
  with pytest.raises(ConfigError, match=r'model\.fuse_gate_up` in .*config\.json: False .*one matmul'):
    tm.load(str(tmp_path))
