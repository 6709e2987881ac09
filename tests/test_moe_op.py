"""export/moe_op.py's MobileMoeBlock packing: the 16-row tiled INT4 layout (option
weight_tiles), its 'auto' rule, the PyTorch reference and read_ops on tiled files. The
delegate running tiled weights: tests/test_delegate_tiles.py."""

import numpy as np
import pytest
import torch

from export import moe_op, torch_model
from export.delegate import tflite_builder as tb


def _bytes(shape, seed=0, dtype=np.uint8):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8).view(dtype)


@pytest.mark.parametrize("shape", [(16, 64), (32, 128), (3, 48, 192), (2, 2, 16, 64)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_tile_untile_round_trip(shape, dtype):
  a = _bytes(shape, dtype=dtype)
  t = moe_op.tile_rows(a)
  assert t.shape == a.shape and t.dtype == a.dtype and t.flags.c_contiguous
  np.testing.assert_array_equal(moe_op.untile_rows(t), a)
  if shape[-2] > 16 or shape[-1] > 64:
    assert not np.array_equal(t, a)        # a real permutation, not the identity
  # each leading (expert) index is tiled on its own
  for i in np.ndindex(*shape[:-2]):
    np.testing.assert_array_equal(t[i], moe_op.tile_rows(a[i]))


@pytest.mark.parametrize("M, K", [(16, 128), (48, 384), (32, 256)])
def test_tiled_offsets_follow_the_contract_formula(M, K):
  # row-layout byte (m, j) lies at (m//16)*16*(K/2) + (j//64)*1024 + (m%16)*64 + j%64
  a = _bytes((M, K // 2), seed=M + K)
  m, j = np.indices(a.shape)
  off = (m // 16) * 16 * (K // 2) + (j // 64) * 1024 + (m % 16) * 64 + j % 64
  assert sorted(off.ravel().tolist()) == list(range(a.size))
  flat = moe_op.tile_rows(a).reshape(-1)
  np.testing.assert_array_equal(flat[off], a)
  # ... which is the brief's reshape
  ref = a.reshape(M // 16, 16, K // 128, 64).swapaxes(-3, -2).reshape(M, K // 2)
  np.testing.assert_array_equal(moe_op.tile_rows(a), ref)


@pytest.mark.parametrize("shape", [(8, 64), (24, 64), (16, 32), (16, 96), (64,), (4, 20, 64)])
def test_shapes_that_cannot_tile_are_refused_naming_the_shape(shape):
  a = np.zeros(shape, np.uint8)
  for f in (moe_op.tile_rows, moe_op.untile_rows):
    with pytest.raises(ValueError, match=r"M % 16 == 0 and K % 128 == 0.*" +
                       repr(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
      f(a)


def _moe(D=128, F=128, n_shared=1, d_shared=128, E=4, seed=0):
  torch.manual_seed(seed)
  cfg = {'d_model': D, 'moe': dict(n_experts=E, d_expert=F, n_shared=n_shared,
                                   d_shared=d_shared, expert_bias=False, top_k=2,
                                   score_func='softmax', norm_topk_prob=True, routed_scale=1.0)}
  return torch_model.MoE(cfg).eval()


@pytest.mark.parametrize("kw, tiles", [
    (dict(), 16),                                  # every matrix tiles
    (dict(n_shared=0), 16),                        # no shared expert: the routed ones decide
    (dict(F=64), 0),                               # down: K = F = 64
    (dict(d_shared=64), 0),                        # shared_down: K = Fs = 64
    (dict(n_shared=2, d_shared=64), 16),           # Fs = n_shared * d_shared = 128
    (dict(D=256, F=160), 0),                       # 2F = 320 rows tile, down K = F = 160 does not
])
@pytest.mark.parametrize("group_size", [32, 0])
def test_auto_tiles_when_every_matrix_allows_it(kw, tiles, group_size):
  moe = _moe(**kw)
  w_auto, o_auto = moe_op.moe_tensors(moe, group_size)
  w_rows, o_rows = moe_op.moe_tensors(moe, group_size, weight_tiles=0)
  assert o_auto['weight_tiles'] == tiles and o_rows['weight_tiles'] == 0
  assert {k: v for k, v in o_auto.items() if k != 'weight_tiles'} == \
         {k: v for k, v in o_rows.items() if k != 'weight_tiles'}
  assert moe_op.MoeBlockOp(moe, group_size).options == o_auto
  assert moe_op.MoeBlockOp(moe, group_size, weight_tiles=None).options == o_auto
  assert (tb.tiles_problem(w_rows) is None) == (tiles == 16)
  for k, v in w_rows.items():
    want = moe_op.tile_rows(v) if tiles and k.endswith('_q') else v
    np.testing.assert_array_equal(w_auto[k], want, err_msg=k)
  if tiles:
    w16, o16 = moe_op.moe_tensors(moe, group_size, weight_tiles=16)
    assert o16 == o_auto and all(np.array_equal(w16[k], w_auto[k]) for k in w16)
  else:
    with pytest.raises(ValueError, match=r'weight_tiles=16: \w+_q: 16-row tiled .*got shape'):
      moe_op.moe_tensors(moe, group_size, weight_tiles=16)


def test_bad_weight_tiles_value():
  with pytest.raises(ValueError, match=r'weight_tiles must be 0 \(rows\) or 16'):
    moe_op.MoeBlockOp(_moe(), 32, weight_tiles=8)


@pytest.mark.parametrize("group_size", [32, 0])
def test_reference_is_the_same_with_tiled_and_row_weights(group_size):
  moe = _moe(D=256, F=128, n_shared=1, d_shared=128, E=8)
  x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
  tiled, rows = (moe_op.MoeBlockOp(moe, group_size, weight_tiles=t) for t in (16, 0))
  assert tiled.options['weight_tiles'] == 16 and rows.options['weight_tiles'] == 0
  assert not torch.equal(tiled.gate_up_q, rows.gate_up_q)
  with torch.no_grad():
    y_tiled, y_rows = tiled(x), rows(x)
    torch.testing.assert_close(y_tiled, y_rows, rtol=0, atol=0)
    # and both are the MoE module's own math on the quantized weights (close to float)
    y_float = moe(x[None])[0]
  assert float((y_rows - y_float).norm() / y_float.norm()) < 0.2


def test_set_moe_lowering_tiles_by_default():
  # the export path (litert.export -> set_moe_lowering) tiles where it can: the tiny
  # config's d_expert = d_shared = 64 cannot (down's K), at 128 it does
  from configs import tiny
  cfg = torch_model.config_dict(tiny.get_config('moe').model)
  for f, tiles in ((64, 0), (128, 16)):
    cfg['moe'].update(d_expert=f, d_shared=f)
    model = torch_model.MobileMoE(cfg).set_moe_lowering('delegate')
    ops = [b.ffn.op for b in model.blocks if isinstance(b.ffn, torch_model.MoE)]
    assert ops and {op.options['weight_tiles'] for op in ops} == {tiles}
  model.set_moe_lowering('delegate', weight_tiles=0)
  assert {op.options['weight_tiles'] for op in
          (b.ffn.op for b in model.blocks if isinstance(b.ffn, torch_model.MoE))} == {0}


@pytest.mark.parametrize("group_size", [32, 0])
def test_read_ops_returns_row_layout_from_a_tiled_file(group_size):
  # the exporter's tiled tensors, written as they are into a one-op file
  moe = _moe(D=256, F=128, E=4)
  w16, o16 = moe_op.moe_tensors(moe, group_size)
  w0, o0 = moe_op.moe_tensors(moe, group_size, weight_tiles=0)
  assert o16['weight_tiles'] == 16
  for w, o in ((w16, o16), (w0, o0)):
    (opts, ws), = moe_op.read_ops(tb.moe_block_model(w, o, [1, 256]))
    assert opts == o                                   # what the file holds
    assert set(ws) == set(w0)
    for k in w0:
      np.testing.assert_array_equal(ws[k], w0[k], err_msg=k)   # always rows
      assert ws[k].dtype == (np.uint8 if k.endswith('_q') else np.float32)


def test_builder_tiles_on_request_and_leaves_rows_by_default():
  from export import flatbuf
  from export import delegate as dl
  rng = np.random.default_rng(2)
  o = dict(num_experts=4, top_k=2, d_model=256, d_expert=128, d_shared=128, group_size=32)
  w = dl.random_moe_weights(rng, 4, 256, 128, 128, 32)

  def stored(model):
    m, raw = flatbuf.load(model)
    name = lambda t: t.name.decode() if isinstance(t.name, bytes) else t.name
    return {flatbuf.tensor_value(m, raw, t).view(np.uint8).tobytes(): name(t)
            for t in m.subgraphs[0].tensors if t.buffer}

  (opts0, _), = moe_op.read_ops(tb.moe_block_model(w, o, [1, 256]))
  assert 'weight_tiles' not in opts0                  # default: the options as given
  model16 = tb.moe_block_model(w, o, [1, 256], weight_tiles=16)
  (opts16, _), = moe_op.read_ops(model16)
  assert opts16 == dict(o, weight_tiles=16)
  held = stored(model16)
  for k in tb.Q_SLOTS:
    assert held[moe_op.tile_rows(w[k]).tobytes()] == f'moe/{k}'
  assert held[w['gate_up_s'].tobytes()] == 'moe/gate_up_s'   # scales keep rows
  with pytest.raises(ValueError, match='weight_tiles=16: down_q'):
    tb.moe_block_model(dl.random_moe_weights(rng, 4, 256, 64, 0, 32),
                       dict(o, d_expert=64, d_shared=0), [1, 256], weight_tiles=16)


@pytest.mark.parametrize("n_shared", [0, 1])
def test_moe_tensors_follow_the_delegate_contract(n_shared):
  from export.delegate import contract
  weights, options = moe_op.moe_tensors(_moe(n_shared=n_shared, d_shared=128 if n_shared else 0), 32)
  assert list(weights) == [s for s in contract.MOE.input_names[1:] if s in weights]
  assert set(contract.MOE.input_names[1:7]) <= set(weights)
  keys = {o.key for o in contract.MOE.options}
  assert set(options) <= keys
  assert {o.key for o in contract.MOE.options if o.required} <= set(options)


def test_read_ops_names_the_operator_with_bad_options():
  rng = np.random.default_rng(0)
  from export import delegate as dl
  o = dict(num_experts=2, top_k=1, d_model=64, d_expert=64, group_size=32)
  g = tb.GraphBuilder()
  x = g.tensor("x", [1, 64])
  tb.add_moe_block(g, x, [1, 64], dl.random_moe_weights(rng, 2, 64, 64, 0, 32), o)
  g.ops[-1].customOptions = list(b"\xff\xfe\x01")
  g.inputs, g.outputs = [x], [len(g.tensors) - 1]
  with pytest.raises(ValueError, match="MobileMoeBlock operator 0: custom_options are not"):
    moe_op.read_ops(g.build())


def _with_release_experts(moe, seed=0):
  """Gives a torch MoE random released-layout expert integers (ExpertGrid, [E, in, out],
  groups of 32 outputs) and sets its weights to their dequantized values, as
  torch_model.from_flax does for an imported release checkpoint."""
  from mobilemoe_jax.quant import grid
  rng = np.random.default_rng(seed)
  e, f, d = moe.e, moe.f, moe.router.weight.shape[1]
  q = lambda *s: rng.integers(-8, 8, s).astype(np.int8)
  s = lambda *s: rng.uniform(0.004, 0.02, s).astype(np.float32)
  eg = torch_model.ExpertGrid(q(e, d, 2 * f), s(e, d, 2 * f // 32), q(e, f, d), s(e, f, d // 32),
                              'int4_g32')
  gu = grid.dequantize(eg.gate_up_q, eg.gate_up_s, in_axis=-1)          # [E, D, 2F]
  dn = grid.dequantize(eg.down_q, eg.down_s, in_axis=-1)                # [E, F, D]
  with torch.no_grad():
    moe.gate_up.weight.copy_(torch.from_numpy(gu.transpose(0, 2, 1).reshape(e * 2 * f, d)))
    for j in range(e):
      moe.down[j].weight.copy_(torch.from_numpy(dn[j].T))
  moe.expert_grid = eg
  return eg


@pytest.mark.parametrize("n_shared", [0, 1])
def test_release_experts_are_packed_unchanged_in_the_out_layout(n_shared):
  moe = _moe(n_shared=n_shared, d_shared=128 if n_shared else 0)
  eg = _with_release_experts(moe)
  w, o = moe_op.moe_tensors(moe, 32)
  assert o['expert_group_axis'] == 'out'
  np.testing.assert_array_equal(w['gate_up_q'], moe_op.grid.pack_int4(eg.gate_up_q))
  np.testing.assert_array_equal(w['down_q'], moe_op.grid.pack_int4(eg.down_q))
  np.testing.assert_array_equal(w['gate_up_s'], eg.gate_up_s)
  # weight_tiles: only the shared expert's matrices are tiled (and 16 only with one)
  assert o['weight_tiles'] == (16 if n_shared else 0)
  if n_shared:
    w_rows, _ = moe_op.moe_tensors(moe, 32, weight_tiles=0)
    np.testing.assert_array_equal(w['shared_down_q'], moe_op.tile_rows(w_rows['shared_down_q']))
  # the op's PyTorch reference reads that layout: equal to the module's own forward (the
  # shared expert's weights put on the block-32 grid first, so its packing is exact too)
  if n_shared:
    with torch.no_grad():
      for lin in (moe.shared.gate, moe.shared.up, moe.shared.down):
        lin.weight.copy_(torch.from_numpy(moe_op.unpack(*moe_op.pack(lin.weight.numpy(), 32))))
  x = torch.randn(1, 5, 128)
  with torch.no_grad():
    want = moe(x)
    moe.lowering, moe.op = 'delegate', moe_op.MoeBlockOp(moe, 32)
    got = moe(x)
  torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
  # channel-wise experts cannot hold the release's groups: re-gridded, input-axis
  assert moe_op.moe_tensors(moe, 0)[1]['expert_group_axis'] == 'in'

