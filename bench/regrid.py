"""What re-gridding the released experts costs: the release groups each expert's INT4 weights
in 32s along the OUTPUT axis ([E, in, out]); LiteRT's block-wise INT4 groups along the input,
so the portable lowering (and the delegate with --quant int4_channel) re-quantizes them
(export/moe_op.py, max-abs rule); the delegate's MobileMoeBlock holds them exactly with
expert_group_axis 'out' (export/README.md).

On released-S-shaped experts (configs/mobilemoe_s.py: 60 experts, d_model 768, d_expert 384;
random normal weights quantized on the release grid and dequantized = exactly what a released
file holds) this compares against those exact values:
  (a) input_g32  re-gridded to input-axis groups of 32 (the portable lowering's int4_g32)
  (b) channel    channel-wise (one scale per output row; --quant int4_channel)
the relative RMS and max error of the weights, and of one MoE block's routed output (sigmoid
routing with expert bias, top-4, weights normalised x 2.5) on random inputs. The release's own
quantization error (float -> release grid) is beside them for scale.

  python bench/regrid.py        # -> bench/results/regrid.json
"""
import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import runinfo  # noqa: E402
from configs import mobilemoe_s  # noqa: E402
from mobilemoe_jax.quant import grid  # noqa: E402

WEIGHT_STD = 0.02   # a trained LM's linear weights are of this order; every error is relative


def release_values(w):
  """[E, in, out] float -> its exact released values: INT4 groups of 32 along `out`."""
  return grid.fake_quant(w, 'int4_g32', in_axis=-1, rule='release')


def regrid(w, scheme):
  """Released values [E, in, out] -> the exporter's grid: groups along `in` (the [out, in]
  FC layout's input axis), the max-abs rule ai-edge-quantizer and moe_op use."""
  return np.swapaxes(grid.fake_quant(np.swapaxes(w, -1, -2), scheme, in_axis=-1), -1, -2)


def errors(got, want):
  d = got.astype(np.float64) - want
  return {"rel_rms": float(np.sqrt((d ** 2).mean() / (want ** 2).mean())),
          "max_abs": float(np.abs(d).max()), "max_abs_rel_to_max_exact": float(np.abs(d).max() / np.abs(want).max())}


def moe_routed(x, gate_up, down, router, bias, m):
  """The released routed experts on x [N, D]: sigmoid scores, top-k chosen with the bias,
  weights = chosen scores normalised x routed_scale; SwiGLU experts (gate first)."""
  scores = 1 / (1 + np.exp(-(x @ router.T)))
  top = np.argsort(-(scores + bias), axis=-1)[:, :m.top_k]
  w = np.take_along_axis(scores, top, -1)
  w = w / w.sum(-1, keepdims=True) * m.routed_scale
  y = np.zeros_like(x)
  F = down.shape[1]
  for n in range(x.shape[0]):
    for e, we in zip(top[n], w[n]):
      gu = x[n] @ gate_up[e]
      h = gu[:F] / (1 + np.exp(-gu[:F])) * gu[F:]
      y[n] += we * (h @ down[e])
  return y


def markdown_table(res: dict) -> str:
  """export/README.md's table: each grid's weight and routed-output errors against the exact
  released values, and the release's own quantization error for scale."""
  def w(r, key, fmt):
    return " / ".join(fmt.format(r[k][key]) for k in ("gate_up", "down"))
  out = [f"| experts on | weight rel. RMS error (gate_up / down) | max abs error (weights ~{res['weight_std']} std) "
         f"| routed MoE output rel. RMS / max abs ({res['tokens']} random tokens) |", "|---|---|---|---|"]
  for name, label in (("input_g32", "(a) input-axis groups of 32 (default, `int4_g32`)"),
                      ("channel", "(b) channel-wise (`int4_channel`)")):
    r, y = res[name]["weights"], res[name]["moe_routed_output"]
    out.append(f"| {label} | {w(r, 'rel_rms', '{:.1%}')} | {w(r, 'max_abs', '{:.2g}')} "
               f"| {y['rel_rms']:.1%} / {y['max_abs']:.2g} |")
  r = res["release_quantization"]
  out.append(f"| for scale: the release's own INT4 error (float -> release grid) | {w(r, 'rel_rms', '{:.1%}')} "
             f"| {w(r, 'max_abs', '{:.2g}')} | |")
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=256)
  ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "regrid.json"))
  ap.add_argument("--table", action="store_true", help="print the README table of --out")
  a = ap.parse_args(argv)
  if a.table:
    return print(markdown_table(runinfo.read_results(a.out)))
  m = mobilemoe_s.get_config().model
  E, D, F = m.moe.n_experts, m.d_model, m.moe.d_expert
  rng = np.random.default_rng(0)
  float_w = {"gate_up": rng.normal(0, WEIGHT_STD, (E, D, 2 * F)).astype(np.float32),
             "down": rng.normal(0, WEIGHT_STD, (E, F, D)).astype(np.float32)}
  exact = {k: release_values(v).astype(np.float64) for k, v in float_w.items()}
  res = dict(runinfo.run_record("bench/regrid.py", gpu=False),
             shapes={k: list(v.shape) for k, v in exact.items()}, weight_std=WEIGHT_STD, tokens=a.tokens,
             release_quantization={k: errors(exact[k], float_w[k].astype(np.float64)) for k in exact})
  router = rng.normal(0, WEIGHT_STD, (E, D))
  bias = rng.normal(0, 0.05, E)
  x = rng.normal(0, 1, (a.tokens, D))   # a normed hidden state: unit RMS
  y_exact = moe_routed(x, exact["gate_up"], exact["down"], router, bias, m.moe)
  for name, scheme in (("input_g32", "int4_g32"), ("channel", "int4_channel")):
    got = {k: regrid(v.astype(np.float32), scheme) for k, v in exact.items()}
    y = moe_routed(x, got["gate_up"], got["down"], router, bias, m.moe)
    res[name] = {"weights": {k: errors(got[k], exact[k]) for k in exact},
                 "moe_routed_output": errors(y, y_exact)}
    print(name, json.dumps(res[name]), flush=True)
  runinfo.write_results(a.out, res)
  print(markdown_table(res))
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
