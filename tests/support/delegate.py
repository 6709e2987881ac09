"""Shared helpers for the delegate tests."""

import math
import os
import shutil

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from export import delegate as dl
from export.delegate import tflite_builder as tb


def opts(E=8, k=2, D=256, F=128, Fs=0, G=32, **kw):
  o = dict(num_experts=E, top_k=k, d_model=D, d_expert=F, d_shared=Fs, group_size=G,
           score_func="softmax", norm_topk_prob=True, routed_scale=1.0, act="silu")
  o.update(kw)
  return o


def weights(rng, o, router_scale=3.0):
  return dl.random_moe_weights(rng, o["num_experts"], o["d_model"], o["d_expert"],
                               o["d_shared"], o["group_size"], router_scale=router_scale,
                               expert_group_axis=o.get("expert_group_axis", "in"))


def tokens(rng, w, o, T, min_margin=2e-5):
  """Random x [T, D] whose top-k choice is not within rounding of a tie."""
  for _ in range(100):
    x = rng.standard_normal((T, o["d_model"])).astype(np.float32)
    _, _, margin = dl.route(x, w["router_w"], w.get("router_bias"), o)
    if margin.min() > min_margin:
      return x
  raise AssertionError("could not draw well-separated routing")


def run(model: bytes, inputs, delegate, num_threads=2, resize=None):
  """Runs a one-input model; returns (outputs list, interpreter)."""
  it = Interpreter(model_content=model, experimental_delegates=[delegate],
                   num_threads=num_threads)
  if resize is not None:
    it.resize_tensor_input(it.get_input_details()[0]["index"], resize)
  it.allocate_tensors()
  it.set_tensor(it.get_input_details()[0]["index"], inputs)
  it.invoke()
  return [it.get_tensor(d["index"]) for d in it.get_output_details()], it


def assert_close(y, ref, rel):
  """max |y - ref| <= rel * max |ref| (a scale-aware tolerance)."""
  err = float(np.abs(y - ref).max())
  scale = float(np.abs(ref).max())
  assert err <= rel * scale + 1e-6, f"max err {err:.3g} vs scale {scale:.3g} (rel {rel})"


def assert_rel_l2(y, ref, rel):
  """||y - ref|| <= rel * ||ref||: for int8 activations, where a rare rounding
  flip moves single elements but not the whole."""
  err = float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))
  assert err <= rel, f"relative L2 error {err:.3g} > {rel}"


def graph_with_builtins(rng, o, chain: bool, weight_tiles=(0, 0)):
  """x -> FC -> h -> MoE -> (+h) -> MoE -> (+) -> y, or MoE -> MoE directly: (model,
  reference function). weight_tiles: the two MoE nodes' (tflite_builder.add_moe_block)."""
  D = o["d_model"]
  g = tb.GraphBuilder()
  x = g.tensor("x", [4, D])
  w_in = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
  h = tb.fully_connected(g, x, g.const("w_in", w_in), [4, D], "h")
  w1, w2 = weights(rng, o), weights(rng, o)
  m1 = tb.add_moe_block(g, h, [4, D], w1, o, name="moe1", weight_tiles=weight_tiles[0])
  r1 = m1 if chain else tb.add(g, h, m1, [4, D], "r1")
  m2 = tb.add_moe_block(g, r1, [4, D], w2, o, name="moe2", weight_tiles=weight_tiles[1])
  y = tb.add(g, r1, m2, [4, D], "y")
  g.inputs, g.outputs = [x], [y]

  def reference(xv):
    hv = xv @ w_in.T
    m1v = dl.reference_moe(hv, w1, o)
    r1v = m1v if chain else hv + m1v
    return r1v + dl.reference_moe(r1v, w2, o)

  return g.build(), reference


def copy_sources(dst):
  """The delegate's C++ source tree (no build outputs, no Python) into dst."""
  shutil.copytree(os.path.dirname(dl.__file__), dst, dirs_exist_ok=True,
                  ignore=shutil.ignore_patterns("*.so", "*.so.*", "*.o", "*.py", "__pycache__",
                                                ".build.lock", "bench_block", "*_fuzzer"))


def attn_opts(H, K, Dh, window=0):
  return dict(num_heads=H, num_kv_heads=K, head_dim=Dh, window=window, scale=1 / math.sqrt(Dh))


def inputs(rng, H, K, Dh, T, P, pos0):
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  # Stale values beyond the filled slots: the op must never read them.
  k_cache, v_cache = f(1, K, P, Dh), f(1, K, Dh, P)
  k_cache[:, :, pos0:] = 1e4
  v_cache[..., pos0:] = np.nan
  return [f(1, T, H, Dh), f(1, T, K, Dh), f(1, T, K, Dh), k_cache, v_cache,
          np.arange(pos0, pos0 + T, dtype=np.int32)]
