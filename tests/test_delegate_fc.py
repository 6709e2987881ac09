"""The delegate's `fully_connected` option: INT4 channel-wise FULLY_CONNECTED nodes run on
its kernels, with the same int8 dynamic-activation grid as XNNPACK's qd8 x qc4w kernels."""

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
