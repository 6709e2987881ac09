"""Fuzz-style checks of the MobileMoE delegate: random shapes, expert counts,
top-k, group sizes, token counts and routing patterns, against the reference.

$MOBILEMOE_FUZZ_CASES sets the number of cases (the sanitizer run uses fewer).
"""

import os

import numpy as np
import pytest

from export import delegate as dl
from export.delegate import tflite_builder as tb
from tests.support.delegate import assert_close, assert_rel_l2, opts, run, tokens, weights

N_CASES = int(os.environ.get("MOBILEMOE_FUZZ_CASES", "24"))
PATTERNS = ("random", "collapsed", "ties", "saturated", "zero_tokens")


def draw_case(seed):
  rng = np.random.default_rng(1000 + seed)
  G = int(rng.choice([8, 16, 32, 64, 128, 0]))  # 0: channel-wise
  simd = rng.random() < 0.5  # half the cases on SIMD-friendly shapes
  mult = lambda lo, hi: int(rng.integers(lo, hi + 1))
  if simd:
    D = 128 * mult(1, 3) if G <= 128 else G
    F = 128 * mult(1, 2)
  else:
    g = G or 2 * mult(1, 24)  # channel-wise: any even lengths
    D, F = g * mult(1, 6), g * mult(1, 4)
  E = mult(1, 24)
  o = opts(E=E, k=mult(1, min(E, 8)), D=D, F=F,
           Fs=(G or 32) * mult(0, 3) if rng.random() < 0.5 else 0,
           G=G, score_func=str(rng.choice(["softmax", "sigmoid"])),
           norm_topk_prob=bool(rng.random() < 0.5), routed_scale=float(rng.uniform(0.5, 3)))
  return rng, o, mult(1, 40), PATTERNS[seed % len(PATTERNS)]


@pytest.mark.parametrize("seed", range(N_CASES))
def test_fuzz_against_reference(seed):
  rng, o, T, pattern = draw_case(seed)
  w = weights(rng, o)
  E, D = o["num_experts"], o["d_model"]
  if pattern == "collapsed":  # every token prefers the same experts
    w["router_w"] = np.tile(w["router_w"][:1], (E, 1)) * np.linspace(1, 2, E, dtype=np.float32)[:, None]
    x = np.abs(rng.standard_normal((T, D))).astype(np.float32) + 0.1
    x *= np.sign(w["router_w"][0] + 1e-9)
  elif pattern == "ties":  # all scores equal: bias, then index decide
    w["router_w"][:] = 0
    w["router_bias"] = rng.permutation(E).astype(np.float32)
    x = rng.standard_normal((T, D)).astype(np.float32)
  elif pattern == "saturated":  # huge logits: softmax/sigmoid saturate
    w["router_w"] *= 8
    x = tokens(rng, w, o, T)
  elif pattern == "zero_tokens":  # all-zero rows (int8 scale 0) mixed in
    x = tokens(rng, w, o, T)
    x[::2] = 0
    if E > 1:  # zero tokens tie on the router: separate them by bias
      w["router_bias"] = rng.permutation(E).astype(np.float32)
  else:
    x = tokens(rng, w, o, T)
  _, _, margin = dl.route(x, w["router_w"], w["router_bias"], o)
  if pattern in ("random", "saturated"):
    assert margin.min() > 0
  model = tb.moe_block_model(w, o, [T, D])
  ref = dl.reference_moe(x, w, o)
  kernel = ("auto", "avx2")[seed % 2]  # the best SIMD kernels, or AVX2 forced
  (y,), _ = run(model, x, dl.load(activations="fp32", kernel=kernel))
  assert_close(y, ref, 1e-5)
  (y8,), _ = run(model, x, dl.load(activations="int8", kernel=kernel))
  assert_rel_l2(y8, dl.reference_moe(x, w, o, activations="int8"), 2e-3)
