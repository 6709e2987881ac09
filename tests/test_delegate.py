"""The MobileMoE LiteRT delegate against the numpy reference of its op."""

import ctypes
import os
import subprocess
import zlib

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from export import delegate as dl
from export.delegate import tflite_builder as tb
from tests.support.delegate import (assert_close, assert_rel_l2, copy_sources, graph_with_builtins,
                                   opts, run, tokens, weights)


def test_pack_int4_convention():
  # low nibble = even index, two's complement
  assert dl.pack_int4(np.array([1, -1], np.int8)).tolist() == [0xF1]
  assert dl.pack_int4(np.array([-8, 7], np.int8)).tolist() == [0x78]
  q = np.random.default_rng(0).integers(-8, 8, size=(3, 5, 64)).astype(np.int8)
  np.testing.assert_array_equal(dl.unpack_int4(dl.pack_int4(q), 64), q)
  with pytest.raises(ValueError):
    dl.pack_int4(np.array([8, 0]))


def test_quantize_int4_roundtrip():
  w = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
  packed, s = dl.quantize_int4(w, 32)
  err = np.abs(dl.dequantize_int4(packed, s, 32) - w).max()
  assert err <= np.abs(w).max() / 7 / 2 + 1e-6
  # group_size 0: channel-wise, one scale per row (the row's max |w| / 7)
  packed, s = dl.quantize_int4(w, 0)
  assert s.shape == (4, 1)
  np.testing.assert_allclose(s[:, 0], np.abs(w).max(-1) / 7, rtol=1e-6)
  err = np.abs(dl.dequantize_int4(packed, s, 0) - w).max(-1)
  assert np.all(err <= s[:, 0] / 2 + 1e-6)


@pytest.mark.parametrize("group_size", [32, 0])
def test_exporter_packing_matches_delegate_format(group_size):
  # export/moe_op.pack (quant.grid) writes what the delegate and its reference read:
  # [..., out, in/2] bytes and [..., out, in/G] scales ([..., out, 1] channel-wise)
  from export import moe_op
  w = np.random.default_rng(2).standard_normal((3, 16, 256)).astype(np.float32)
  packed, s = moe_op.pack(w, group_size)
  assert packed.shape == (3, 16, 128) and s.shape == (3, 16, 256 // (group_size or 256))
  deq = dl.dequantize_int4(packed, s, group_size)
  np.testing.assert_array_equal(deq, moe_op.unpack(packed, s))
  assert np.abs(deq - w).max() <= np.abs(w).max() / 7 / 2 + 1e-6


@pytest.mark.parametrize("case", [
    # (E, k, D, F, Fs, G, T, extra options)       SIMD path: D, F % 128 == 0
    (8, 2, 256, 128, 0, 32, 1, {}),
    (8, 2, 256, 128, 128, 32, 5, {}),
    (16, 4, 384, 256, 128, 64, 33, dict(score_func="sigmoid")),
    (8, 1, 256, 128, 0, 128, 7, dict(norm_topk_prob=False, routed_scale=2.5)),
    # group_size 0: channel-wise experts (one scale per row; SIMD: integer sums over K)
    (8, 2, 256, 128, 128, 0, 5, {}),
    (16, 4, 384, 256, 128, 0, 33, dict(score_func="sigmoid")),
    (6, 2, 768, 512, 512, 0, 1, {}),
    # scalar fallback shapes: not multiples of 128, small groups
    (6, 3, 96, 64, 32, 16, 4, {}),
    (4, 4, 64, 48, 0, 8, 9, dict(score_func="sigmoid", norm_topk_prob=False)),
    (6, 3, 96, 70, 38, 0, 4, {}),
])
@pytest.mark.parametrize("kernel", ["auto", "avx2", "scalar"])
def test_matches_reference(case, kernel):
  E, k, D, F, Fs, G, T, extra = case
  rng = np.random.default_rng(zlib.crc32(repr((case, kernel)).encode()))
  o = opts(E, k, D, F, Fs, G, **extra)
  w = weights(rng, o)
  x = tokens(rng, w, o, T)
  model = tb.moe_block_model(w, o, [T, D])
  ref32 = dl.reference_moe(x, w, o)
  # fp32 activations: only summation order differs from the reference
  (y,), _ = run(model, x, dl.load(activations="fp32", kernel=kernel))
  assert_close(y, ref32, 1e-5)
  # int8 activations: close to a reference that rounds the same way (a rare
  # flip of one rounding moves an element by ~1e-3), a few % from fp32 math
  (y8,), _ = run(model, x, dl.load(activations="int8", kernel=kernel))
  ref8 = dl.reference_moe(x, w, o, activations="int8")
  assert_rel_l2(y8, ref8, 2e-3)
  assert_close(y8, ref8, 1e-2)
  assert_rel_l2(y8, ref32, 4e-2)


@pytest.mark.parametrize("case", [
    # (E, k, D, F, Fs, G, T, extra options): routed experts [E, in, out], groups along out
    (8, 2, 256, 128, 0, 32, 1, {}),
    (8, 2, 256, 128, 128, 32, 5, dict(weight_tiles=16)),   # the shared expert tiled
    (16, 4, 384, 192, 128, 64, 33, dict(score_func="sigmoid")),
    # columns that are no multiple of the SIMD chunks (ragged ends go scalar), odd T
    (6, 3, 96, 32, 32, 32, 4, {}),
    (4, 4, 160, 96, 0, 32, 9, dict(score_func="sigmoid", norm_topk_prob=False)),
])
@pytest.mark.parametrize("kernel", ["auto", "avx2", "scalar"])
def test_out_axis_experts_match_reference(case, kernel):
  """The released experts' layout: fp32 rows times the weights dequantized in registers, so
  int8 mode equals the reference on the grid's values up to summation order (and rare
  rounding flips of the hidden's int8)."""
  E, k, D, F, Fs, G, T, extra = case
  extra = dict(extra)
  tiles = extra.pop("weight_tiles", 0)
  rng = np.random.default_rng(zlib.crc32(repr((case, kernel, "out")).encode()))
  o = opts(E, k, D, F, Fs, G, expert_group_axis="out", **extra)
  w = weights(rng, o)
  assert w["gate_up_q"].shape == (E, D, F) and w["down_s"].shape == (E, F, D // G)
  x = tokens(rng, w, o, T)
  model = tb.moe_block_model(w, o, [T, D], weight_tiles=tiles)
  (y,), _ = run(model, x, dl.load(activations="fp32", kernel=kernel))
  assert_close(y, dl.reference_moe(x, w, o), 1e-5)
  (y8,), _ = run(model, x, dl.load(activations="int8", kernel=kernel))
  ref8 = dl.reference_moe(x, w, o, activations="int8")
  assert_rel_l2(y8, ref8, 2e-3)
  assert_close(y8, ref8, 1e-2)


def test_output_changes_with_input_and_weights():
  # guards against a test that passes because everything is zero
  rng = np.random.default_rng(3)
  o = opts()
  w = weights(rng, o)
  x = tokens(rng, w, o, 2)
  (y,), _ = run(tb.moe_block_model(w, o, [2, 256]), x, dl.load(activations="fp32"))
  assert np.abs(y).max() > 0.1
  w2 = dict(w, down_s=w["down_s"] * 2)
  (y2,), _ = run(tb.moe_block_model(w2, o, [2, 256]), x, dl.load(activations="fp32"))
  assert_close(y2, 2 * y, 1e-5)


def test_int4_tensor_type_and_rank3_tokens():
  rng = np.random.default_rng(4)
  o = opts(Fs=128)
  w = weights(rng, o)
  x = tokens(rng, w, o, 6).reshape(2, 3, 256)
  model = tb.moe_block_model(w, o, [2, 3, 256], int4_type=True)
  (y,), _ = run(model, x, dl.load(activations="fp32"))
  assert y.shape == (2, 3, 256)
  assert_close(y, dl.reference_moe(x, w, o), 1e-5)


def test_resize_token_count():
  # decode-shaped model resized to a prefill chunk: the delegate re-prepares
  rng = np.random.default_rng(5)
  o = opts(Fs=128)
  w = weights(rng, o)
  x = tokens(rng, w, o, 19)
  (y,), _ = run(tb.moe_block_model(w, o, [1, 256]), x, dl.load(activations="fp32"),
                resize=[19, 256])
  assert_close(y, dl.reference_moe(x, w, o), 1e-5)


@pytest.mark.parametrize("T", [3, 11])   # a decode-sized step (T < 8) and a prefill-sized one
def test_thread_counts_agree(T):
  rng = np.random.default_rng(6)
  o = opts(E=16, k=4, Fs=128)
  w = weights(rng, o)
  x = tokens(rng, w, o, T)
  model = tb.moe_block_model(w, o, [T, 256])
  outs = [run(model, x, dl.load(num_threads=n))[0][0] for n in (1, 2, 3)]
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], outs[2])


def test_ties_pick_lower_index():
  # zero router: every score ties, so selection falls to the bias, then index
  rng = np.random.default_rng(7)
  o = opts(E=8, k=3)
  w = weights(rng, o)
  w["router_w"][:] = 0
  w["router_bias"][:] = 0
  w["router_bias"][5] = 1.0  # expert 5 first, then 0 and 1
  x = rng.standard_normal((2, 256)).astype(np.float32)
  chosen, _, _ = dl.route(x, w["router_w"], w["router_bias"], o)
  assert chosen.tolist() == [[5, 0, 1]] * 2
  (y,), _ = run(tb.moe_block_model(w, o, [2, 256]), x, dl.load(activations="fp32"))
  assert_close(y, dl.reference_moe(x, w, o), 1e-5)


@pytest.mark.parametrize("chain", [False, True])
def test_every_node_claimed_and_builtins_run(chain):
  rng = np.random.default_rng(8)
  o = opts(Fs=128)
  model, reference = graph_with_builtins(rng, o, chain)
  x = rng.standard_normal((4, 256)).astype(np.float32)
  d = dl.load(activations="fp32")
  (y,), it = run(model, x, d)
  s = dl.stats(d)
  n_moe = sum(op["op_name"] == tb.OP_NAME for op in it._get_ops_details())
  assert n_moe == 2
  assert (s["claimed"], s["refused"], s["invokes"]) == (2, 0, 1 if chain else 2)
  assert_close(y, reference(x), 1e-4)


@pytest.mark.parametrize("T", [2, 33])   # decode-sized, then prefill-sized (AMX on CPUs with it)
def test_nodes_of_different_shapes_share_the_delegates_block(T):
  """The delegate runs every MoE node on one MoeBlock (its scratch buffers) and each node on
  its own weights' row sums: two chained nodes of different shapes, int8 activations (where
  the row sums enter), each invoke also after the other shape ran."""
  rng = np.random.default_rng(31)
  D = 256
  o1, o2 = opts(8, 2, D, 128, 0, 0), opts(16, 4, D, 256, 128, 32, score_func="sigmoid")
  w1, w2 = weights(rng, o1), weights(rng, o2)
  g = tb.GraphBuilder()
  x = g.tensor("x", [T, D])
  m1 = tb.add_moe_block(g, x, [T, D], w1, o1, name="moe1")
  m2 = tb.add_moe_block(g, m1, [T, D], w2, o2, name="moe2")
  g.inputs, g.outputs = [x], [m2]
  d = dl.load(activations="int8")
  it = Interpreter(model_content=g.build(), experimental_delegates=[d], num_threads=2)
  it.allocate_tensors()
  assert dl.stats(d)["claimed"] == 2
  for _ in range(2):   # the second invoke finds the buffers left by the other node
    xv = tokens(rng, w1, o1, T)
    it.set_tensor(it.get_input_details()[0]["index"], xv)
    it.invoke()
    y = it.get_tensor(it.get_output_details()[0]["index"])
    h = dl.reference_moe(xv, w1, o1, activations="int8")
    assert_rel_l2(y, dl.reference_moe(h, w2, o2, activations="int8"), 4e-3)


@pytest.mark.parametrize("change, message", [
    (dict(act="gelu"), "unsupported act 'gelu'"),
    (dict(score_func="sparsemax"), "unsupported score_func"),
    (dict(top_k=9), "top_k must be in [1, num_experts]"),
    (dict(group_size=48), "multiples of group_size"),
    (dict(group_size=3), "group_size must be 0 (channel-wise) or even"),
    (dict(group_size=0), "gate_up_s: expected float32 [8,256,1]"),  # block-32 scales
    (dict(d_model=512), "x must be float32 [..., d_model=512]"),
    (dict(d_expert=64), "gate_up_q: expected packed int4"),
    (dict(num_experts=None), "missing option 'num_experts'"),
    (dict(expert_group_axis="rows"), "unsupported expert_group_axis 'rows' (in|out)"),
    (dict(expert_group_axis="out", group_size=0), "expert_group_axis 'out' needs group_size > 0"),
    # input-axis weights under the 'out' option: down_q [E, D, F/2] is not [E, F, D/2]
    (dict(expert_group_axis="out"), "down_q: expected packed int4 [8,128,128] bytes (uint8), "
     "got type 3 shape [8,256,64] (expert_group_axis 'out'"),
])
def test_unsupported_options_are_refused_with_reason(change, message):
  rng = np.random.default_rng(9)
  o = opts()
  w = weights(rng, o)
  bad = {k: v for k, v in {**o, **change}.items() if v is not None}
  model = tb.moe_block_model(w, bad, [2, 256])
  d = dl.load()
  with pytest.raises(RuntimeError) as e:
    run(model, np.zeros((2, 256), np.float32), d)
  assert "MobileMoE delegate: not claiming" in str(e.value)
  assert message in str(e.value)
  s = dl.stats(d)
  assert (s["claimed"], s["refused"]) == (0, 1)
  assert message in s["messages"]


def test_out_axis_scales_of_the_wrong_shape_are_refused():
  # [E, in, out] integers with input-axis-shaped scales: named, with the layout it expected
  rng = np.random.default_rng(11)
  o = opts(F=64, expert_group_axis="out")
  w = weights(rng, o)
  w["down_s"] = np.ones((8, 256, 64 // 32), np.float32)
  d = dl.load()
  with pytest.raises(RuntimeError, match=r"down_s: expected float32 \[8,64,8\], got type 1 shape "
                     r"\[8,256,2\] \(expert_group_axis 'out': \[E, in, out\], groups along out\)"):
    run(tb.moe_block_model(w, o, [2, 256]), np.zeros((2, 256), np.float32), d)
  assert dl.stats(d)["refused"] == 1


def test_missing_required_input_is_refused():
  rng = np.random.default_rng(10)
  o = opts(Fs=128)
  w = weights(rng, o)
  model = tb.moe_block_model(w, o, [2, 256], drop_inputs=(9,))
  with pytest.raises(RuntimeError, match="shared input 9 is absent"):
    run(model, np.zeros((2, 256), np.float32), dl.load())


def test_garbage_custom_options_do_not_crash():
  rng = np.random.default_rng(11)
  o = opts()
  w = weights(rng, o)
  g = tb.GraphBuilder()
  x = g.tensor("x", [1, 256])
  tb.add_moe_block(g, x, [1, 256], w, o)
  for junk in (b"", b"\x00", bytes(rng.integers(0, 256, 64, dtype=np.uint8)),
               tb.moe_options_bytes(o)[:-3] + b"\x01\x2c\x08"):
    g.ops[-1].customOptions = list(junk)
    g.inputs, g.outputs = [x], [len(g.tensors) - 1]
    with pytest.raises(RuntimeError, match="not claiming"):
      run(g.build(), np.zeros((1, 256), np.float32), dl.load())


def test_kernel_option_caps_the_isa():
  cpu = dl.stats(dl.load())["cpu_isa"]
  assert dl.stats(dl.load())["isa"] == cpu
  assert dl.stats(dl.load(kernel="scalar"))["isa"] == "scalar"
  # "avx2" forces the AVX2 kernels on an AVX-512 CPU (what the avx2 cases above run)
  x86 = ("avx512-amx", "avx512-vnni", "avx2")
  want = "avx2" if cpu in x86 else cpu if cpu == "neon-dot" else "scalar"
  assert dl.stats(dl.load(kernel="avx2"))["isa"] == want
  # "avx512" leaves out the AMX tiles (the AVX-512 VNNI kernels alone)
  want = "avx512-vnni" if cpu in x86[:2] else want
  assert dl.stats(dl.load(kernel="avx512"))["isa"] == want


def test_bad_delegate_option():
  with pytest.raises(ValueError, match="activations must be"):
    dl.load(activations="int4")
  with pytest.raises(ValueError, match="unknown option 'threads'"):
    from ai_edge_litert.interpreter import load_delegate
    load_delegate(dl.library_path(), {"threads": 2})


@pytest.mark.slow
def test_builds_from_clean_tree(tmp_path):
  copy_sources(tmp_path)
  subprocess.run(["make", "-C", str(tmp_path)], check=True, capture_output=True)
  lib = tmp_path / "libmobilemoe_delegate.so"
  assert lib.exists()
  syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                        text=True, check=True).stdout
  for name in ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate"):
    assert name in syms
  ctypes.CDLL(str(lib))  # loads without unresolved symbols


def test_sanitized_variant_is_what_runs():
  # Under test_delegate_asan.py's child process this checks the ASan build is
  # the one loaded; in a normal run, that the release build is.
  s = dl.stats(dl.load())
  assert s["sanitized"] == (os.environ.get("MOBILEMOE_DELEGATE_VARIANT") == "asan")
