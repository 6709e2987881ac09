"""The delegate's `fully_connected` option: INT4 FULLY_CONNECTED nodes run on its kernels,
with the same int8 dynamic-activation grid as XNNPACK's qd8 x qc4w kernels. Channel-wise
weights (one f32 scale per row), and block-wise ones (fp16 scales per 32 inputs: the
exporter's int4_g32, a released MobileMoE's linears), whose scales it keeps exactly where
XNNPACK rounds them to bf16."""

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from export import delegate as dl
from export.delegate import tflite_builder as tb


def fc_chain(rng, N, dims, bias=False, relu=False):
  """x [1, N, dims[0]] -> FC -> ... -> [1, N, dims[-1]]; returns (model, fp32 weights)."""
  g = tb.GraphBuilder()
  x = y = g.tensor("x", [1, N, dims[0]])
  ws = []
  for i, (k, m) in enumerate(zip(dims, dims[1:])):
    w, wf = tb.int4_channelwise(g, f"w{i}", rng, m, k)
    ws.append(wf)
    b = g.const(f"b{i}", np.zeros(m, np.float32)) if bias else -1
    act = schema.ActivationFunctionType.RELU if relu else schema.ActivationFunctionType.NONE
    y = tb.fully_connected(g, y, w, [1, N, m], f"y{i}", bias=b, activation=act)
  g.inputs, g.outputs = [x], [y]
  return g.build(), ws


def run(model, x, delegate=None):
  it = Interpreter(model_content=model, num_threads=2,
                   experimental_delegates=[delegate] if delegate else None)
  it.allocate_tensors()
  it.set_tensor(it.get_input_details()[0]["index"], x)
  it.invoke()
  return it.get_tensor(it.get_output_details()[0]["index"])


@pytest.mark.parametrize("N,dims", [
    (1, [768, 2000]),          # a decode GEMV (an LM head's shape, fewer rows)
    (1, [768, 1280, 768]),     # two FCs in one delegate partition (internal tensor)
    (5, [256, 300]),           # rows not a multiple of the tiles
    (128, [768, 1024]),        # a prefill GEMM
    (3, [200, 64]),            # K not a SIMD size: the scalar kernels
])
def test_fc_matches_xnnpack(N, dims):
  rng = np.random.default_rng(N + dims[-1])
  model, ws = fc_chain(rng, N, dims)
  x = rng.standard_normal((1, N, dims[0])).astype(np.float32)
  d = dl.load(num_threads=2, fully_connected=True)
  ours = run(model, x, d)
  s = dl.stats(d)
  assert s["claimed"] == len(ws) and s["refused"] == 0, s
  xnn = run(model, x)
  ref = x
  for w in ws:
    ref = ref @ w.T
  scale = np.abs(ref).max()
  # Same int8 grid as XNNPACK: equal up to fp32 summation order.
  assert np.abs(ours - xnn).max() <= 1e-5 * scale
  # And both within the int8-activation error of the fp32 product.
  assert np.abs(ours - ref).max() <= 3e-2 * scale


def test_fc_not_claimed_without_the_option():
  model, _ = fc_chain(np.random.default_rng(0), 1, [256, 128])
  d = dl.load(num_threads=2)
  run(model, np.zeros((1, 1, 256), np.float32), d)
  assert dl.stats(d)["claimed"] == 0


@pytest.mark.parametrize("kw,needle", [(dict(bias=True), "has a bias"),
                                       (dict(relu=True), "fused activation")])
def test_fc_refused_with_reason_and_left_to_the_builtin(kw, needle):
  rng = np.random.default_rng(1)
  model, ws = fc_chain(rng, 2, [256, 128], **kw)
  x = rng.standard_normal((1, 2, 256)).astype(np.float32)
  d = dl.load(num_threads=2, fully_connected=True)
  y = run(model, x, d)          # still runs: the builtin kernel keeps the node
  s = dl.stats(d)
  assert s["claimed"] == 0 and s["refused"] == 1 and needle in s["messages"], s
  np.testing.assert_allclose(y, run(model, x), rtol=0, atol=1e-6)


# ---- Block-wise weights (fp16 scales per block of inputs). ----

def block_chain(rng, N, dims, block):
  """fc_chain with block-wise INT4 weights; returns (model, [(q int8, fp16 scales)])."""
  g = tb.GraphBuilder()
  x = y = g.tensor("x", [1, N, dims[0]])
  grids = []
  for i, (k, m) in enumerate(zip(dims, dims[1:])):
    w, q, s = tb.int4_blockwise(g, f"w{i}", rng, m, k, block)
    grids.append((q, s))
    y = tb.fully_connected(g, y, w, [1, N, m], f"y{i}")
  g.inputs, g.outputs = [x], [y]
  return g.build(), grids


def block_reference(x, grids, activations, scales=lambda s: s.astype(np.float32)):
  """The chain in float64 with each FC's weights q * scales(s) (int8 mode: each FC's input
  on the delegate's int8 grid first), rounded to float32 after each FC."""
  y = x
  for q, s in grids:
    if activations == "int8":
      y = dl._quant_rows_int8(y)
    w = q.astype(np.float64) * np.repeat(scales(s).astype(np.float64), q.shape[1] // s.shape[1], 1)
    y = (y.astype(np.float64) @ w.T).astype(np.float32)
  return y


def bf16(s):
  """Block scales as XNNPACK's FC computes with them (export.litert.xnnpack_block_scales)."""
  from export.litert import xnnpack_block_scales
  return xnnpack_block_scales(s)


# Shapes: a decode GEMV in 16-row tiles; two FCs in one partition; rows not a multiple of
# the tiles; a prefill GEMM; K not a SIMD size (the scalar kernels); blocks of 64.
@pytest.mark.parametrize("kernel", ["auto", "avx2", "scalar"])
@pytest.mark.parametrize("activations", ["fp32", "int8"])
@pytest.mark.parametrize("N,dims,block", [
    (1, [768, 2000], 32),
    (1, [256, 512, 384], 32),
    (5, [256, 300], 32),
    (64, [384, 256], 32),
    (3, [96, 64], 32),
    (2, [256, 160], 64),
])
def test_blockwise_fc_computes_with_the_fp16_scales(kernel, activations, N, dims, block):
  rng = np.random.default_rng(N + dims[-1] + block)
  model, grids = block_chain(rng, N, dims, block)
  x = rng.standard_normal((1, N, dims[0])).astype(np.float32)
  d = dl.load(num_threads=2, fully_connected=True, kernel=kernel, activations=activations)
  ours = run(model, x, d)[0]
  s = dl.stats(d)
  assert s["claimed"] == len(grids) and s["refused"] == 0, s
  ref = block_reference(x[0], grids, activations)
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  # Equal up to fp32 summation order (two int8 FCs: also the rare hidden activation that
  # lands on the other side of an int8 rounding boundary).
  assert err <= (1e-5 if len(grids) == 1 else 1e-3) * scale, (err, scale)
  # The scales XNNPACK computes with (rounded to bf16) would be measurably further off.
  assert np.abs(block_reference(x[0], grids, activations, bf16) - ref).max() > 10 * err


def test_blockwise_fc_xnnpack_rounds_the_scales_to_bf16():
  """Why the option matters for fp16 block scales: the default interpreter (XNNPACK) equals
  the reference with bf16-rounded scales, ours the one with the stored fp16 scales."""
  rng = np.random.default_rng(7)
  model, grids = block_chain(rng, 1, [768, 512], 32)
  x = rng.standard_normal((1, 1, 768)).astype(np.float32)
  exact = block_reference(x[0], grids, "int8")
  rounded = block_reference(x[0], grids, "int8", bf16)
  scale = np.abs(exact).max()
  d = dl.load(num_threads=2, fully_connected=True)
  ours, xnn = run(model, x, d)[0], run(model, x)[0]
  assert np.abs(ours - exact).max() <= 1e-5 * scale
  assert np.abs(xnn - rounded).max() <= 1e-5 * scale
  assert np.abs(xnn - exact).max() > 1e-4 * scale


@pytest.mark.parametrize("kernel", ["auto", "avx2", "scalar"])
def test_blockwise_fc_reads_every_finite_fp16_scale_exactly(kernel):
  """All 63,488 finite fp16 values (zeros, subnormals, the largest) as block scales of one
  weight of ones, read back through one-hot inputs: y[n, m] = s[m, n] bit for bit."""
  bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
  finite = bits.view(np.float16)[np.isfinite(bits.view(np.float16))]
  K, block = 128, 32
  s = finite.reshape(-1, K // block)                      # [15872, 4]: 16-row tiles fit
  M = s.shape[0]
  g = tb.GraphBuilder()
  x = g.tensor("x", [1, K // block, K])
  w, _, _ = tb.int4_blockwise(g, "w", None, M, K, block, q=np.ones((M, K), np.int8), scales=s)
  y = tb.fully_connected(g, x, w, [1, K // block, M], "y")
  g.inputs, g.outputs = [x], [y]
  onehot = np.zeros((1, K // block, K), np.float32)
  for n in range(K // block):
    onehot[0, n, n * block] = 1
  d = dl.load(num_threads=2, fully_connected=True, kernel=kernel, activations="fp32")
  got = run(g.build(), onehot, d)[0]
  assert dl.stats(d)["claimed"] == 1
  np.testing.assert_array_equal(got, s.astype(np.float32).T)


def _refused_block_fc(change):
  """A one-FC block-wise model with `change(graph, weight tensor index)` applied."""
  g = tb.GraphBuilder()
  x = g.tensor("x", [1, 2, 256])
  w, _, _ = tb.int4_blockwise(g, "w", np.random.default_rng(3), 128, 256, 32)
  change(g, w)
  y = tb.fully_connected(g, x, w, [1, 2, 128], "y")
  g.inputs, g.outputs = [x], [y]
  return g.build()


def _set_details(**kw):
  def change(g, w):
    for k, v in kw.items():
      setattr(g.tensors[w].quantization.details, k, v)
  return change


def _f32_scales(g, w):
  s = g.tensors[g.tensors[w].quantization.details.scales]
  s.type = schema.TensorType.FLOAT32
  g.buffers[s.buffer].data = np.ones(s.shape, np.float32).view(np.uint8).reshape(-1)


@pytest.mark.parametrize("change,needle", [
    (_set_details(zeroPoints=0), "with zero points"),
    (_set_details(blockSize=48), "block size 48 must be even and divide K = 256"),
    (_set_details(blockSize=64), "block scales must be a constant float16 [128,4], got type 10 shape [128,8]"),
    (_set_details(scales=0), "block scales must be a constant float16"),   # the input x
    (_f32_scales, "block scales must be a constant float16 [128,8], got type 1"),
])
def test_blockwise_fc_refused_with_reason(change, needle):
  """Block-wise weights the kernels cannot read as the file says are not claimed, and the
  message says why (the node is left to LiteRT, which is not run here: some of these files
  make LiteRT's own block-wise kernels read out of bounds)."""
  d = dl.load(num_threads=2, fully_connected=True)
  Interpreter(model_content=_refused_block_fc(change), experimental_delegates=[d])
  s = dl.stats(d)
  assert s["claimed"] == 0 and s["refused"] == 1 and needle in s["messages"], s
