"""On-device benchmark: the MoE block through our delegate vs the portable
lowerings, on this CPU, LiteRT with 2 threads. Writes bench/results/ondevice.json.

  python bench/ondevice.py                 # everything (exports the whole models once)
  python bench/ondevice.py --quick         # smaller run without whole models, a smoke test
  python bench/ondevice.py --whole_only    # just the whole models, merged into --out with the
                                           # released_s_* keys (block rows left as they were)
  python bench/ondevice.py --blocks_only [--baseline_lib old.so]   # just the block rows
  python bench/ondevice.py --decode_profile [--baseline_lib old.so]  # per-op decode profile
  python bench/ondevice.py --block32_stacks  # also the block-32 FFN stacks (both models)
  python bench/ondevice.py --moe_model a.tflite --dense_model b.tflite   # your own files
  python bench/ondevice.py --whole_only --experts block32   # whole MobileMoE-S, block-32 experts
  python bench/ondevice.py --whole_only --attention portable  # attention as builtin ops (both)
  python bench/ondevice.py --litertlm=demo --tokenizer=data/tokenizer/spm.model
                                           # LiteRT-LM's runtime vs our runner, same model

Rows (MobileMoE-S's MoE layer as configs/mobilemoe_s.py has it, random weights):
  (a) delegate      MobileMoeBlock run by export/delegate (int8 activations),
                    experts INT4 block-32 with fp32 group scales (the exporter's default)
  (a') delegate_cw  the same op with channel-wise experts (group_size 0: one fp32 scale
                    per output row, like the dense FCs' INT4 channel-wise)
  (a'') delegate_cwt  channel-wise experts in 16-row tiles (weight_tiles=16, what the
                    exporter writes when the shapes allow: one sequential stream per tile);
                    delegate_cwt_avx512 the same with the delegate's kernel=avx512 (its int8
                    GEMMs of 4+ tokens without the AMX tiles, on CPUs that have them)
  (b) all-experts   the portable lowering: every expert as INT4 FULLY_CONNECTED
                    (gate/up of all experts fused in one FC, down in one FC),
                    hidden masked by the top-k routing weights (XNNPACK, qc4w)
  (c) upstream moe  litert-torch's `moe` custom op (XNNPACK MoE kernel; GELU,
                    int8 channel-wise experts), shared expert as INT4 FCs
  limit             active INT4 bytes per token / measured DRAM read bandwidth
Decode uses a stack of L blocks with different weights (x + MoE(x) each), so the
weights (> L3) stream from DRAM as on a phone; each step feeds a new random token.
Whole models: MobileMoE-S (configs/mobilemoe_s.py, MoE blocks lowered to MobileMoeBlock
for the delegate) and MobileLLM-Pro (configs/mobilellm_pro.py), random weights, exported
by export/ (litert-torch + ai-edge-quantizer) with prefill_128 / prefill_512 / decode
signatures and a 1024-slot external KV cache, every weight INT4 channel-wise (XNNPACK's
fastest INT4 path; MobileMoE-S's experts inside the op too, as `export --quant
int4_channel --moe delegate` writes them; --experts block32: block-32 experts instead, the
op's other format, cached as a separate file). Both models' signatures (decode and
prefill) run attention as the delegate's MobileKvAttention op (export --attention delegate:
it reads the cache slots that hold tokens, not all 1024, and the causal new tokens;
--attention portable: builtin ops over the whole cache, XNNPACK's BATCH_MATMULs). Prefill returns
the last prompt token's logits only (export --prefill-logits last, what a phone app
samples from): the final norm + lm_head over the vocabulary run for one row, not for
all T. The files are
cached in runs/ondevice_models/ (first export ~4 + ~5 min, ~15 GB RAM for Pro).
Models are built in one child process and timed in another; the models of one
comparison are timed in the same window with alternating invokes, so on a
shared machine they see the same background load. Peak RSS: each model alone.
Ratios: COMPARISONS (block and FFN-stack rows, candidate vs baseline at each T) and, for
the whole models, each model's fastest decode arrangement next to the same arrangement on
both sides, with each arrangement's peak RSS (whole_ratios).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ai_edge_litert import schema_py_generated as schema  # noqa: E402
from export import delegate as dl  # noqa: E402
from export.delegate import tflite_builder as tb  # noqa: E402
from export.runner import needs_delegate  # noqa: E402
from bench import runinfo  # noqa: E402
from mobilemoe_jax.scaling import accounting  # noqa: E402

S = schema.BuiltinOperator
O = schema.BuiltinOptions

from configs import mobilellm_pro, mobilemoe_s  # noqa: E402

S_MODEL = mobilemoe_s.get_config().model      # the block and stack shapes follow the presets
PRO_MODEL = mobilellm_pro.get_config().model
# MobileMoE-S's MoE layer as the delegate op's options (experts INT4 block-32 by default).
BLOCK = dict(num_experts=S_MODEL.moe.n_experts, top_k=S_MODEL.moe.top_k, d_model=S_MODEL.d_model,
             d_expert=S_MODEL.moe.d_expert, d_shared=S_MODEL.moe.n_shared * S_MODEL.moe.d_shared,
             group_size=32, score_func=S_MODEL.moe.score_func,
             norm_topk_prob=S_MODEL.moe.norm_topk_prob, routed_scale=S_MODEL.moe.routed_scale,
             act="silu")
THREADS = 2


# ----------------------------------------------------------------------------
# Graph pieces built with builtin ops.

def _i32(g, name, values):
  return g.const(name, np.asarray(values, np.int32))


def _op(g, code, ins, out_shape, name, opt_type=0, opt=None, dtype=np.float32):
  y = g.tensor(name, out_shape, dtype)
  g.op(code, ins, [y], opt_type, opt)
  return y


def _int4_block32(g, name, rng, rows, cols):
  """Random INT4 weight [rows, cols], block-32 fp16 scales (as ai-edge-quantizer
  writes them): the same scheme MobileMoE's export uses for every FC."""
  q = rng.integers(-8, 8, size=(rows, cols), dtype=np.int8)
  s = ((rng.random((rows, cols // 32)) * 0.5 + 0.5) / np.sqrt(cols * 10)).astype(np.float16)
  st = g.const(f"{name}_scales", s)
  bq = schema.BlockwiseQuantizationT()
  bq.scales, bq.zeroPoints, bq.blockSize = st, -1, 32
  qp = schema.QuantizationParametersT()
  qp.detailsType, qp.details, qp.quantizedDimension = (
      schema.QuantizationDetails.BlockwiseQuantization, bq, 0)
  t = g.tensor(name, [rows, cols], tensor_type=schema.TensorType.INT4, data=dl.pack_int4(q),
               quantization=qp)
  return t, q.astype(np.float32) * np.repeat(s.astype(np.float32), 32, axis=1)


def _fc(g, x, w, out_shape, name):
  return tb.fully_connected(g, x, w, out_shape, name)


def _swiglu_shared(g, x, T, rng, Fs, D, name, weight=None):
  """SwiGLU as two INT4 FCs (shared expert, dense FFN): down(silu(gate x) * up x).
  weight: the INT4 weight maker (default channel-wise)."""
  weight = weight or tb.int4_channelwise
  wgu, _ = weight(g, f"{name}/gu", rng, 2 * Fs, D)
  wd, _ = weight(g, f"{name}/d", rng, D, Fs)
  gu = _fc(g, x, wgu, [T, 2 * Fs], f"{name}/gu_out")
  gs, us = g.tensor(f"{name}/g", [T, Fs]), g.tensor(f"{name}/u", [T, Fs])
  so = schema.SplitOptionsT()
  so.numSplits = 2
  g.op(S.SPLIT, [_i32(g, f"{name}/axis", 1), gu], [gs, us], O.SplitOptions, so)
  h = _silu_mul(g, gs, us, [T, Fs], name)
  return _fc(g, h, wd, [T, D], f"{name}/out")


def _silu_mul(g, gate, up, shape, name):
  sig = _op(g, S.LOGISTIC, [gate], shape, f"{name}/sig")
  sg = _op(g, S.MUL, [gate, sig], shape, f"{name}/silu", O.MulOptions, schema.MulOptionsT())
  return _op(g, S.MUL, [sg, up], shape, f"{name}/h", O.MulOptions, schema.MulOptionsT())


def _router(g, x, T, rng, o, name):
  """softmax router + top-k: returns (scores [T,E], top values [T,k], top idx [T,k])."""
  E, D, k = o["num_experts"], o["d_model"], o["top_k"]
  wr = g.const(f"{name}/router", (rng.standard_normal((E, D)) / np.sqrt(D)).astype(np.float32))
  logits = _fc(g, x, wr, [T, E], f"{name}/logits")
  sm = schema.SoftmaxOptionsT()
  sm.beta = 1.0
  scores = _op(g, S.SOFTMAX, [logits], [T, E], f"{name}/scores", O.SoftmaxOptions, sm)
  topv, topi = g.tensor(f"{name}/topv", [T, k]), g.tensor(f"{name}/topi", [T, k], np.int32)
  g.op(S.TOPK_V2, [scores, _i32(g, f"{name}/k", k)], [topv, topi], O.TopKV2Options,
       schema.TopKV2OptionsT())
  return scores, topv, topi


def _reduce(g, code, x, shape, name):
  ro = schema.ReducerOptionsT()
  ro.keepDims = True
  return _op(g, code, [x, _i32(g, f"{name}/axes", [1])], shape, name, O.ReducerOptions, ro)


def _reshape(g, x, shape, name, dtype=np.float32, token_axis=0):
  """Reshape whose token axis is -1, so one model serves every T after
  resize_tensor_input."""
  spec = list(shape)
  spec[token_axis] = -1
  ro = schema.ReshapeOptionsT()
  ro.newShape = spec
  return _op(g, S.RESHAPE, [x, _i32(g, f"{name}/shape", spec)], shape, name,
             O.ReshapeOptions, ro, dtype)


def add_allexperts_block(g, x, T, rng, o, name):
  """(b): all experts computed with INT4 FCs, hidden masked by top-k weights."""
  E, D, F, Fs, k = o["num_experts"], o["d_model"], o["d_expert"], o["d_shared"], o["top_k"]
  scores, topv, _ = _router(g, x, T, rng, o, name)
  kth = _reduce(g, S.REDUCE_MIN, topv, [T, 1], f"{name}/kth")
  mask = _op(g, S.GREATER_EQUAL, [scores, kth], [T, E], f"{name}/mask", dtype=np.bool_)
  co = schema.CastOptionsT()
  co.inDataType, co.outDataType = schema.TensorType.BOOL, schema.TensorType.FLOAT32
  maskf = _op(g, S.CAST, [mask], [T, E], f"{name}/maskf", O.CastOptions, co)
  sw = _op(g, S.MUL, [scores, maskf], [T, E], f"{name}/sw", O.MulOptions, schema.MulOptionsT())
  den = _reduce(g, S.SUM, sw, [T, 1], f"{name}/den")
  rw = _op(g, S.DIV, [sw, den], [T, E], f"{name}/rw", O.DivOptions, schema.DivOptionsT())
  # rows: gate of every expert (E*F), then up of every expert (E*F)
  wgu, _ = tb.int4_channelwise(g, f"{name}/gu_all", rng, 2 * E * F, D)
  wd, _ = tb.int4_channelwise(g, f"{name}/d_all", rng, D, E * F)
  gu = _fc(g, x, wgu, [T, 2 * E * F], f"{name}/gu")
  gs, us = g.tensor(f"{name}/g", [T, E * F]), g.tensor(f"{name}/u", [T, E * F])
  so = schema.SplitOptionsT()
  so.numSplits = 2
  g.op(S.SPLIT, [_i32(g, f"{name}/axis", 1), gu], [gs, us], O.SplitOptions, so)
  h = _silu_mul(g, gs, us, [T, E * F], name)
  h3 = _reshape(g, h, [T, E, F], f"{name}/h3")
  rw3 = _reshape(g, rw, [T, E, 1], f"{name}/rw3")
  hw = _op(g, S.MUL, [h3, rw3], [T, E, F], f"{name}/hw", O.MulOptions, schema.MulOptionsT())
  hw2 = _reshape(g, hw, [T, E * F], f"{name}/hw2")
  y = _fc(g, hw2, wd, [T, D], f"{name}/routed")
  if Fs:
    y = tb.add(g, y, _swiglu_shared(g, x, T, rng, Fs, D, f"{name}/shared"), [T, D], f"{name}/y")
  return y


def add_upstream_moe_block(g, x, T, rng, o, name):
  """(c): litert-torch's `moe` custom op (int8 channel-wise experts, gelu_tanh)."""
  from flatbuffers import flexbuffers
  E, D, H, Fs, k = o["num_experts"], o["d_model"], o["d_expert"], o["d_shared"], o["top_k"]
  _, topv, topi = _router(g, x, T, rng, o, name)
  den = _reduce(g, S.SUM, topv, [T, 1], f"{name}/den")
  topw = _op(g, S.DIV, [topv, den], [T, k], f"{name}/topw", O.DivOptions, schema.DivOptionsT())

  def int8_ohwi(wname, out_c, in_c):  # [out, E, 1, in] + scales [out, E, 1, 1]
    w = g.const(f"{name}/{wname}", rng.integers(-127, 128, size=(out_c, E, 1, in_c), dtype=np.int8))
    s = g.const(f"{name}/{wname}_s", (np.full((out_c, E, 1, 1), 1.0 / (127 * np.sqrt(in_c)))).astype(np.float32))
    return w, s

  gw, gs = int8_ohwi("gate", H, D)
  uw, us = int8_ohwi("up", H, D)
  lw, ls = int8_ohwi("down", D, H)
  pes = g.const(f"{name}/per_expert_scale", np.ones((1, 1, 1, E), np.float32))
  src = _reshape(g, x, [1, T, D], f"{name}/src", token_axis=1)
  w3 = _reshape(g, topw, [1, T, k], f"{name}/w3", token_axis=1)
  i3 = _reshape(g, topi, [1, T, k], f"{name}/i3", np.int32, token_axis=1)
  y3 = g.tensor(f"{name}/moe_out", [1, T, D])
  opts = flexbuffers.Dumps({"num_experts": E, "num_active_experts": k, "model_dim": D,
                            "hidden_dim": H, "activation": "gelu_tanh", "weight_type": "int8",
                            "renormalized_top_weights": True})
  g.custom_op("moe", [src, w3, i3, gw, gs, uw, us, lw, ls, pes], [y3], bytes(opts))
  y = _reshape(g, y3, [T, D], f"{name}/routed")
  if Fs:
    y = tb.add(g, y, _swiglu_shared(g, x, T, rng, Fs, D, f"{name}/shared"), [T, D], f"{name}/y")
  return y


def add_delegate_block(g, x, T, rng, o, name, weight_tiles=0):
  """(a): one MobileMoeBlock node."""
  w = dl.random_moe_weights(rng, o["num_experts"], o["d_model"], o["d_expert"],
                            o["d_shared"], o["group_size"])
  return tb.add_moe_block(g, x, [T, o["d_model"]], w, o, name=name, weight_tiles=weight_tiles)


def add_delegate_block_cw(g, x, T, rng, o, name):
  """(a'): one MobileMoeBlock node with channel-wise experts (group_size 0)."""
  return add_delegate_block(g, x, T, rng, dict(o, group_size=0), name)


def add_delegate_block_cwt(g, x, T, rng, o, name):
  """(a''): channel-wise experts stored in 16-row tiles (weight_tiles=16)."""
  return add_delegate_block(g, x, T, rng, dict(o, group_size=0), name, weight_tiles=16)


BUILDERS = {"delegate": add_delegate_block, "delegate_cw": add_delegate_block_cw,
            "delegate_cwt": add_delegate_block_cwt,
            # (a'') run with the delegate's kernels capped at AVX-512 VNNI (no AMX tiles)
            "delegate_cwt_avx512": add_delegate_block_cwt,
            "all_experts": add_allexperts_block, "upstream_moe": add_upstream_moe_block,
            # (a) run by another build of the delegate (--baseline_lib): before/after
            "delegate_base": add_delegate_block}
# Models whose MobileMoeBlock nodes need the delegate loaded.
DELEGATE_METHODS = ("delegate", "delegate_cw", "delegate_cwt", "delegate_cwt_avx512", "moe_s_ffn",
                    "moe_s_ffn_cw", "moe_s_ffn_cwt")
BASELINE_ENV = "MOBILEMOE_BASELINE_LIB"

# FFN-only proxies of the whole models (attention, embeddings, lm_head left
# out: they are the same kind of work in both models). MobileMoE-S: its first_dense
# dense layers (none in the released S) + MoE layers through the delegate; MobileLLM-Pro:
# its dense SwiGLU layers as INT4 FCs, channel-wise (XNNPACK's fastest INT4)
# and block-32 (the scheme MobileMoE's export and experts use).
def _s_ffn(moe_kind):
  """MobileMoE-S's FFN layers: the first dense ones, then MoE blocks of `moe_kind`."""
  n_dense = S_MODEL.moe.first_dense
  return dict(d_model=S_MODEL.d_model, layers=[("dense", S_MODEL.d_ff)] * n_dense
              + [(moe_kind, None)] * (S_MODEL.n_layers - n_dense))


STACKS = {
    "moe_s_ffn": _s_ffn("moe"),
    "moe_s_ffn_cw": _s_ffn("moe_cw"),
    "moe_s_ffn_cwt": _s_ffn("delegate_cwt"),
    "pro_ffn": dict(d_model=PRO_MODEL.d_model, layers=[("dense", PRO_MODEL.d_ff)] * PRO_MODEL.n_layers),
    "pro_ffn_b32": dict(d_model=PRO_MODEL.d_model,
                        layers=[("dense_b32", PRO_MODEL.d_ff)] * PRO_MODEL.n_layers),
}
# Candidates side by side: (candidate, baseline) -> baseline time / candidate time at each T
# timed (> 1: the candidate is faster). Pairs whose rows a run did not time are left out.
COMPARISONS = (
    ("delegate", "upstream_moe"),      # our op vs XNNPACK's MoE kernel
    ("delegate", "all_experts"),       # vs the portable all-experts lowering
    ("delegate_cw", "delegate"),       # channel-wise vs block-32 experts
    ("delegate_cwt", "delegate_cw"),   # 16-row tiles vs rows
    ("delegate_cwt", "delegate_cwt_avx512"),   # AMX tiles vs AVX-512 VNNI alone
    ("delegate", "delegate_base"),     # this build vs --baseline_lib
    ("moe_s_ffn_cwt", "pro_ffn"),      # FFN stacks, MobileMoE-S vs MobileLLM-Pro
    ("moe_s_ffn_cw", "pro_ffn"),
    ("moe_s_ffn", "pro_ffn_b32"),      # both block-32 (--block32_stacks)
)
# The bandwidth limit of the block rows: bytes one token reads / the measured DRAM rate.
LIMITED = {"delegate": 32, "delegate_cw": 0, "delegate_cwt": 0}   # method: expert group size


def stack_model(method, L, o, seed=0):
  """x [1, D] -> L residual blocks -> y (resize the input for prefill)."""
  rng = np.random.default_rng(seed)
  g = tb.GraphBuilder()
  if method in STACKS:
    D = STACKS[method]["d_model"]
    layers = STACKS[method]["layers"]
  else:
    D, layers = o["d_model"], [(method, None)] * L
  x = g.tensor("x", [1, D])
  h = x
  for i, (kind, d_ff) in enumerate(layers):
    if kind == "dense":
      m = _swiglu_shared(g, h, 1, rng, d_ff, D, f"l{i}")
    elif kind == "dense_b32":
      m = _swiglu_shared(g, h, 1, rng, d_ff, D, f"l{i}", weight=_int4_block32)
    elif kind == "moe":
      m = add_delegate_block(g, h, 1, rng, o, f"l{i}")
    elif kind == "moe_cw":
      m = add_delegate_block_cw(g, h, 1, rng, o, f"l{i}")
    else:
      m = BUILDERS[kind](g, h, 1, rng, o, f"l{i}")
    h = tb.add(g, h, m, [1, D], f"l{i}/res")
  g.inputs, g.outputs = [x], [h]
  return g.build(), D, len(layers)


# ----------------------------------------------------------------------------
# Measurement (each configuration in a child process).

def peak_rss_mb():
  """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over
  from the parent across fork/exec, so every child would report the parent's."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return None


def build(method, L, path):
  """Child process 1: writes the model, so the timing child maps it from disk
  and its peak RSS is the runtime's, not the builder's."""
  model, D, layers = stack_model(method, L, dict(BLOCK))
  with open(path, "wb") as f:
    f.write(model)
  print(json.dumps({"D": D, "layers": layers, "model_mb": len(model) / 2**20}))


def _load(method, path, T, D):
  from ai_edge_litert.interpreter import Interpreter
  kernel = "avx512" if method.endswith("_avx512") else "auto"
  d = dl.load(num_threads=THREADS, kernel=kernel) if method in DELEGATE_METHODS else None
  if method == "delegate_base":
    from ai_edge_litert.interpreter import load_delegate
    d = load_delegate(os.environ[BASELINE_ENV], {"num_threads": THREADS})
  it = Interpreter(model_path=path, experimental_delegates=[d] if d else [],
                   num_threads=THREADS)
  idx = it.get_input_details()[0]["index"]
  it.resize_tensor_input(idx, [T, D])
  it.allocate_tensors()
  if d is not None:
    s = dl.stats(d)
    assert s["claimed"] > 0 and s["refused"] == 0, s
  return it, idx, d


def race(methods, paths, Ds, Ts, budget_s):
  """Child process: times several models in one window, alternating invokes
  (A B C A B C ...), so all see the same background load on a shared box."""
  rng = np.random.default_rng(1)
  out = []
  for T in Ts:
    its = [_load(m, p, T, D) for m, p, D in zip(methods, paths, Ds)]
    # 64 different decode tokens: routing changes every step, as in generation
    xs = [[rng.standard_normal((T, D)).astype(np.float32) for _ in range(64 if T == 1 else 2)]
          for D in Ds]
    for (it, idx, _), x in zip(its, xs):  # warm-up
      for i in range(2 if T == 1 else 1):
        it.set_tensor(idx, x[i % len(x)])
        it.invoke()
    times = [[] for _ in methods]
    t_end = time.perf_counter() + budget_s * len(methods)
    r = 0
    while r < 3 or (time.perf_counter() < t_end and r < 2000):
      for k in range(len(methods)):
        j = (k + r) % len(methods)  # rotate who goes first
        it, idx, _ = its[j]
        it.set_tensor(idx, xs[j][r % len(xs[j])])
        t0 = time.perf_counter()
        it.invoke()
        times[j].append(time.perf_counter() - t0)
      r += 1
    for m, t in zip(methods, times):
      t = np.array(t) * 1e3
      out.append({"method": m, "T": T, "n": len(t), "median_ms": float(np.median(t)),
                  "p10_ms": float(np.percentile(t, 10))})
    del its
  print(json.dumps({"runs": out}))


def rss(method, path, D, Ts):
  """Child process: peak RSS of loading one model and running each T once."""
  for T in Ts:
    it, idx, _ = _load(method, path, T, D)
    it.set_tensor(idx, np.zeros((T, D), np.float32))
    it.invoke()
  print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def run_child(*args):
  cmd = [sys.executable, os.path.abspath(__file__), *map(str, args)]
  r = subprocess.run(cmd, capture_output=True, text=True)
  lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
  if r.returncode != 0 or not lines:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{(r.stderr or r.stdout)[-2000:]}")
  return json.loads(lines[-1])


def measure(methods, L, Ts, budget_s, tmp):
  """Builds each model, records its peak RSS alone, then times them together."""
  built = {}
  for m in methods:
    path = os.path.join(tmp, f"{m}.tflite")
    built[m] = dict(run_child("--build", m, L, path), path=path)
    built[m].update(run_child("--rss", m, path, built[m]["D"], ",".join(map(str, Ts))))
  r = run_child("--race", ",".join(methods), ",".join(built[m]["path"] for m in methods),
                ",".join(str(built[m]["D"]) for m in methods), ",".join(map(str, Ts)), budget_s)
  rows = []
  for run in r["runs"]:
    b = built[run["method"]]
    per = b["layers"] if run["method"] in BUILDERS else 1  # blocks: per block
    rows.append({"method": run["method"], "T": run["T"], "n": run["n"],
                 "median_ms": run["median_ms"] / per, "p10_ms": run["p10_ms"] / per,
                 "per": "block" if run["method"] in BUILDERS else "ffn stack",
                 "model_mb": b["model_mb"], "peak_rss_mb": b["peak_rss_mb"]})
  for m in methods:
    os.remove(built[m]["path"])
  return rows


# ----------------------------------------------------------------------------
# DRAM bandwidth: a small C reader (2 threads), compiled on the fly.

_BW_SRC = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef struct { const uint64_t* p; size_t n; uint64_t s; } Arg;
static void* rd(void* a_) {
  Arg* a = (Arg*)a_; uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (size_t i = 0; i + 4 <= a->n; i += 4) { s0 += a->p[i]; s1 += a->p[i+1]; s2 += a->p[i+2]; s3 += a->p[i+3]; }
  a->s = s0 + s1 + s2 + s3; return 0;
}
static double now() { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
/* best GB/s over reps of reading `bytes` with `threads` threads */
double read_bw(size_t bytes, int threads, int reps) {
  uint64_t* buf = (uint64_t*)aligned_alloc(64, bytes); memset(buf, 1, bytes);
  size_t n = bytes / 8 / threads; double best = 0; pthread_t th[64]; Arg a[64];
  for (int r = 0; r < reps; ++r) {
    double t0 = now();
    for (int t = 0; t < threads; ++t) { a[t].p = buf + t * n; a[t].n = n; pthread_create(&th[t], 0, rd, &a[t]); }
    for (int t = 0; t < threads; ++t) pthread_join(th[t], 0);
    double gbs = bytes / (now() - t0) / 1e9; if (gbs > best) best = gbs;
  }
  free(buf); return best;
}
"""


def dram_read_bandwidth(threads=THREADS, gib=1.0):
  d = tempfile.mkdtemp()
  src, lib = os.path.join(d, "bw.c"), os.path.join(d, "bw.so")
  with open(src, "w") as f:
    f.write(_BW_SRC)
  subprocess.run(["gcc", "-O3", "-march=native", "-shared", "-fPIC", src, "-o", lib, "-pthread"],
                 check=True)
  fn = ctypes.CDLL(lib).read_bw
  fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
  return fn(int(gib * 2**30), threads, 5)


def active_bytes_per_token(o):
  """INT4 weight + fp32 scale bytes one token reads in one MoE block (+ fp32 router);
  group_size 0 (channel-wise): one scale per row."""
  D, F, Fs, k, G, E = (o[n] for n in ("d_model", "d_expert", "d_shared", "top_k",
                                      "group_size", "num_experts"))
  # bytes of an [rows, K] INT4 matrix with its scales
  mat = lambda rows, K: rows * (K / 2 + 4 * (K // G if G else 1))
  return k * (mat(2 * F, D) + mat(D, F)) + mat(2 * Fs, D) + mat(D, Fs) + E * D * 4


# ----------------------------------------------------------------------------
# Whole models (optional: paths to exported .tflite files).

# The two whole models, exported once and cached (keyed by everything that shapes them).
WHOLE = {
    "moe": dict(config="configs/mobilemoe_s.py", quant="int4_channel", moe="delegate",
                prefill_logits="last"),
    "dense": dict(config="configs/mobilellm_pro.py", quant="int4_channel", moe="portable",
                  prefill_logits="last"),
}
# Experts inside the MobileMoeBlock ops: channel-wise (group 0) like every other weight of
# these files, as the exporter writes int4_channel; --experts block32: block-32 experts.
WHOLE_MOE_CW = dict(WHOLE["moe"], expert_group_size=0)
WHOLE_PREFILL = (128, 512)
DEFAULT_OUT = os.path.join(REPO, "bench", "results", "ondevice.json")
WHOLE_KV_LEN = 1024
DECODE_PROMPT, DECODE_STEPS = 32, 128   # decode: 128 tokens after a 32-token prompt
DECODE_ROUNDS = 6   # at least this many rounds of DECODE_STEPS per arrangement
WHOLE_DIR = os.path.join(REPO, "runs", "ondevice_models")
# A change to these files re-exports the cached models.
EXPORTER_FILES = ("export/torch_model.py", "export/litert.py", "export/moe_op.py",
                  "export/attention_op.py", "export/flatbuf.py")


def files_version(files):
  import hashlib
  h = hashlib.sha256()
  for f in files:
    with open(os.path.join(REPO, f), "rb") as fh:
      h.update(fh.read())
  return h.hexdigest()[:16]


def whole_spec(file):
  """Everything that shapes a cached whole model (its .json must match). file: 'moe',
  'moe_cw' or 'dense', with '_pa' appended for the portable attention (else both
  models' attention is the delegate's MobileKvAttention: --attention delegate)."""
  name = file[:-3] if file.endswith("_pa") else file
  base = WHOLE_MOE_CW if name == "moe_cw" else WHOLE[name]
  return dict(base, attention="portable" if file.endswith("_pa") else "delegate",
              prefill=list(WHOLE_PREFILL), kv_len=WHOLE_KV_LEN,
              exporter=files_version(EXPORTER_FILES),
              preset=files_version(["configs/mobilemoe_s.py", "configs/mobilellm_pro.py"]))


def export_whole(name, path):
  """Child process: random-weight model of WHOLE[name] -> .tflite through export/
  (the same litert.export the CLI uses), plus path + '.json' with what was built."""
  import torch
  from export import checkpoint, litert, torch_model
  spec = whole_spec(name)   # read before the export: the code it runs
  t0 = time.time()
  cfg = torch_model.config_dict(checkpoint.load_config(os.path.join(REPO, spec["config"])).model)
  torch.manual_seed(0)
  model = torch_model.MobileMoE(cfg).eval()   # torch's default init: random weights
  params = sum(p.numel() for p in model.parameters())
  if spec["moe"] == "delegate":
    # Pack the experts for the MobileMoeBlock op now and drop their fp32 copies (~5 GB
    # for MobileMoE-S; with them the conversion ran out of memory on a 24 GB box). The
    # op only reads its packed buffers; export's own set_moe_lowering call is then a no-op.
    model.set_moe_lowering("delegate", group_size=spec.get("expert_group_size", 32))
    for b in model.blocks:
      if isinstance(b.ffn, torch_model.MoE):
        b.ffn.gate_up = b.ffn.down = b.ffn.shared = None
    model.set_moe_lowering = lambda *args, **kw: model
    ops = [b.ffn.op for b in model.blocks if isinstance(b.ffn, torch_model.MoE)]
    spec_tiles = sorted({op.options["weight_tiles"] for op in ops})
  rep = litert.export(model, path + ".tmp", quant=spec["quant"], moe=spec["moe"],
                      attention=spec["attention"],
                      prefill_lens=WHOLE_PREFILL, kv_len=WHOLE_KV_LEN,
                      prefill_logits=spec["prefill_logits"], log=lambda m: print(m, file=sys.stderr, flush=True))
  os.replace(path + ".tmp", path)
  meta = dict(spec, export_s=time.time() - t0,
              file_bytes=rep["file_bytes"], params=params,
              signatures=rep["signatures"], file_prefill_logits=rep["prefill_logits"],
              peak_rss_mb=peak_rss_mb(),
              expert_weight_tiles=spec_tiles if spec["moe"] == "delegate" else None)
  with open(path + ".json", "w") as f:
    json.dump(meta, f, indent=1)
  print(json.dumps(meta))


def whole_models(experts="channel", attention="delegate"):
  """{name: (path, meta)}, exporting what is missing or stale (one child per model, so
  the ~15 GB the Pro conversion needs is returned before anything is timed).
  experts="channel": the MobileMoE-S file with channel-wise experts (moe_cw.tflite).
  attention="portable": both models' attention as builtin ops (files *_pa.tflite)."""
  os.makedirs(WHOLE_DIR, exist_ok=True)
  out = {}
  for name in WHOLE:
    file = "moe_cw" if (name == "moe" and experts == "channel") else name
    file += "_pa" if attention == "portable" else ""
    spec = whole_spec(file)
    path = os.path.join(WHOLE_DIR, f"{file}.tflite")
    meta = None
    if os.path.exists(path) and os.path.exists(path + ".json"):
      with open(path + ".json") as f:
        meta = json.load(f)
      if any(meta.get(k) != v for k, v in spec.items()):
        meta = None
    if meta is None:
      print(f"exporting the whole {file} model ({spec['config']}) to {path} ...", flush=True)
      meta = dict(run_child("--export", file, path), cached=False)
    else:
      meta["cached"] = True
    out[name] = (path, meta)
  return out


def whole_model_race(moe_path, dense_path, budget_s):
  """Child process: exported MobileMoE-S and dense models (export/runner.py
  signatures) timed in one window, alternating. Prefill P tokens from an empty
  cache (chunked by the model's prefill signatures) up to the logits after the last
  token (all a 'last' file returns); decode = the median step of 128 tokens generated after
  a 32-token prompt (context 32..159); decode_long = of 128 tokens at context 896..1023.
  Decode runs in two arrangements per model: `<name>` (one interpreter, XNNPACK with
  THREADS threads, the delegate for the custom ops) and `<name>_fc` (LiteRTLM's
  decode_delegate: XNNPACK on 1 thread, every INT4 FC on the delegate's pool too)."""
  from export.runner import LiteRTLM
  delegate = lambda **kw: dl.load(num_threads=THREADS, **kw)
  lms = {}
  for name, path in (("moe", moe_path), ("dense", dense_path)):
    d = delegate() if needs_delegate(path) else None
    lms[name] = LiteRTLM(path, num_threads=THREADS, delegate=d)
    dec = delegate(fully_connected=True)
    lms[f"{name}_fc"] = LiteRTLM(path, num_threads=THREADS, delegate=delegate(), decode_delegate=dec)
    for x in (d, dec):
      if x is not None:
        s = dl.stats(x)
        assert s["claimed"] > 0 and s["refused"] == 0, s
  # The plain variant beside the favourable one: S's prefill with the delegate's AMX tiles
  # left out (its int8 GEMMs of 4+ tokens use them where the CPU has them).
  prefill_names = ["moe", "dense"]
  if dl.stats(delegate())["cpu_isa"] == "avx512-amx":
    lms["moe_avx512"] = LiteRTLM(moe_path, num_threads=THREADS, delegate=delegate(kernel="avx512"))
    prefill_names.insert(1, "moe_avx512")
  rng = np.random.default_rng(0)
  out = {}
  for P in (128, 512):   # prefill runs on the first interpreter: the same in both arrangements
    if any(P > lm.kv_len for lm in lms.values()):
      continue
    times = {n: [] for n in prefill_names}
    t_end = time.perf_counter() + budget_s
    while min(map(len, times.values())) < 3 or time.perf_counter() < t_end:
      for n in times:
        lm = lms[n]
        lm.reset()
        ids = rng.integers(0, 1000, P)
        t0 = time.perf_counter()
        lm.prefill_last(ids)
        times[n].append(time.perf_counter() - t0)
    for n, t in times.items():
      out[f"{n}_prefill{P}_ms"] = float(np.median(t) * 1e3)
  # Decode: 128 tokens generated after a prompt (steps at context 32..159, the usual
  # short-context number), and 128 more at the end of the cache (context 896..1023):
  # attention that reads only the filled slots costs more as the context grows.
  # Each round runs every arrangement once, back to back; the per-round medians pair the
  # models within seconds of each other (whole_model_rows: the spread of the ratio).
  decoders = {n: lm for n, lm in lms.items() if n != "moe_avx512"}   # decode: GEMVs, no AMX
  for key, prompt in (("decode", DECODE_PROMPT), ("decode_long", WHOLE_KV_LEN - DECODE_STEPS)):
    times = {n: [] for n in decoders}
    rounds = {n: [] for n in decoders}
    t_end = time.perf_counter() + budget_s
    while min(map(len, rounds.values())) < DECODE_ROUNDS or time.perf_counter() < t_end:
      for n, lm in decoders.items():
        lm.reset()
        lm.prefill_last(rng.integers(0, 1000, prompt))
        t = []
        for _ in range(DECODE_STEPS):
          t0 = time.perf_counter()
          lm.decode(int(rng.integers(0, 1000)))
          t.append(time.perf_counter() - t0)
        times[n] += t
        rounds[n].append(float(np.median(t) * 1e3))
    for n, t in times.items():
      out[f"{n}_{key}_ms"] = float(np.median(t) * 1e3)
      out[f"{n}_{key}_rounds_ms"] = rounds[n]
  print(json.dumps(out))


def decode_profile(path, libs, rounds, steps=32):
  """Development mode (--decode_profile): one whole model's decode in the decode_delegate
  arrangement (the fastest for both models), once per build of the delegate in `libs`
  ({name: .so path}), rounds alternating between the builds. Per build: the median step of
  each round, and per step the time of every claimed op and between our partitions (the
  delegate's `profile` option, export.delegate.profile), as the median over rounds and in the
  fastest round (on a shared box the quiet rounds show the profile without the load)."""
  from ai_edge_litert.interpreter import load_delegate
  from export.runner import LiteRTLM
  lms, decs = {}, {}
  for name, lib in libs.items():
    opts = {"num_threads": str(THREADS)}
    decs[name] = load_delegate(lib, dict(opts, fully_connected="1", profile="1"))
    lms[name] = LiteRTLM(path, num_threads=THREADS, delegate=load_delegate(lib, opts),
                         decode_delegate=decs[name])
  rng = np.random.default_rng(0)
  step_ms = {n: [] for n in libs}
  ops = {n: [] for n in libs}
  for r in range(rounds):
    for k in range(len(libs)):
      n = list(libs)[(k + r) % len(libs)]   # rotate who goes first
      lm = lms[n]
      lm.reset()
      lm.prefill_last(rng.integers(0, 1000, DECODE_PROMPT))
      before = dl.profile(decs[n])
      t = []
      for _ in range(steps):
        t0 = time.perf_counter()
        lm.decode(int(rng.integers(0, 1000)))
        t.append(time.perf_counter() - t0)
      step_ms[n].append(float(np.median(t) * 1e3))
      ops[n].append({k: (us - before.get(k, (0, 0.0))[1]) / steps
                     for k, (_, us) in dl.profile(decs[n]).items() if "idle" not in k})
  out = {}
  for n in libs:
    best = int(np.argmin(step_ms[n]))
    labels = sorted(ops[n][best], key=lambda k: -ops[n][best][k])
    out[n] = {"lib": libs[n], "step_ms": float(np.median(step_ms[n])), "step_ms_rounds": step_ms[n],
              "ops_us_per_step_median": {k: float(np.median([o.get(k, 0.0) for o in ops[n]]))
                                         for k in labels},
              "ops_us_per_step_fastest_round": {k: ops[n][best][k] for k in labels}}
  return out


def whole_rss(path, fc="plain"):
  """Child process: peak RSS of one whole model loaded, prefilling 128 and decoding;
  fc="fc": with LiteRTLM's decode_delegate (a second interpreter for decode)."""
  from export.runner import LiteRTLM
  dec = dl.load(num_threads=THREADS, fully_connected=True) if fc == "fc" else None
  lm = LiteRTLM(path, num_threads=THREADS, decode_delegate=dec,
                delegate=dl.load(num_threads=THREADS) if needs_delegate(path) else None)
  lm.prefill_last(np.arange(128) % 1000)
  lm.decode(1)
  print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


ARRANGEMENTS = {"moe": "MobileMoE-S, one interpreter (XNNPACK + the delegate's MoE ops)",
                "moe_avx512": "MobileMoE-S, one interpreter, the delegate without AMX "
                              "(kernel=avx512; prefill only, on CPUs with AMX)",
                "moe_fc": "MobileMoE-S, decode_delegate (every INT4 FC on the delegate)",
                "dense": "MobileLLM-Pro, one interpreter (XNNPACK)",
                "dense_fc": "MobileLLM-Pro, decode_delegate (every INT4 FC on the delegate)"}


def whole_arrangements(raw):
  """{arrangement: {decode_ms, decode_rounds_ms, decode_long_ms, ..., prefill128_ms (one
  interpreter only: prefill runs there in both), peak_rss_mb}} from the timing child's keys
  (`<arrangement>_<what>`)."""
  out = {name: {} for name in ARRANGEMENTS}
  for k, v in raw.items():
    owners = [n for n in ARRANGEMENTS if k.startswith(n + "_")]
    if owners:   # "moe_fc_decode_ms" is moe_fc's, not moe's
      n = max(owners, key=len)
      out[n][k[len(n) + 1:]] = v
  return out


def whole_ratios(arr):
  """Dense time / MobileMoE-S time. Decode: each model in its fastest arrangement (with the
  spread over rounds, which pair the models seconds apart) next to the ratio of the same
  arrangement on both sides; prefill runs in one arrangement."""
  out = {}
  for key in ("decode", "decode_long"):
    if f"{key}_ms" not in arr["moe"]:
      continue
    t = lambda n: arr[n][f"{key}_ms"]
    best = {m: min((m, m + "_fc"), key=t) for m in ("moe", "dense")}
    pairs = [d / m for d, m in zip(arr[best["dense"]][f"{key}_rounds_ms"],
                                   arr[best["moe"]][f"{key}_rounds_ms"])]
    out[key] = {"fastest": t(best["dense"]) / t(best["moe"]), "fastest_arrangements": best,
                "fastest_rounds_min_median_max": [min(pairs), float(np.median(pairs)), max(pairs)],
                "same_arrangement": {"one_interpreter": t("dense") / t("moe"),
                                     "decode_delegate": t("dense_fc") / t("moe_fc")}}
  for P in WHOLE_PREFILL:
    if f"prefill{P}_ms" in arr["moe"]:
      out[f"prefill{P}"] = arr["dense"][f"prefill{P}_ms"] / arr["moe"][f"prefill{P}_ms"]
      if f"prefill{P}_ms" in arr["moe_avx512"]:   # the same without AMX
        out[f"prefill{P}_without_amx"] = (arr["dense"][f"prefill{P}_ms"]
                                          / arr["moe_avx512"][f"prefill{P}_ms"])
  return out


def whole_model_rows(moe_path, dense_path, budget_s=20):
  """An exported MobileMoE model against a dense one: every arrangement's times and peak
  RSS, and the ratios (whole_ratios)."""
  raw = run_child("--whole", moe_path, dense_path, budget_s)
  for name, path in (("moe", moe_path), ("dense", dense_path)):
    raw[f"{name}_peak_rss_mb"] = run_child("--whole_rss", path, "plain")["peak_rss_mb"]
    raw[f"{name}_fc_peak_rss_mb"] = run_child("--whole_rss", path, "fc")["peak_rss_mb"]
  arr = whole_arrangements(raw)
  return {"arrangements": arr, "ratios": whole_ratios(arr)}


def released_s_summary(whole, bw):
  """The released MobileMoE-S against MobileLLM-Pro in the keys the on-device targets name:
  decode and prefill-128 speedups (each model's fastest arrangement; the same-arrangement
  ratios beside them) and S's decode against its DRAM-bandwidth limit (weight + KV bytes one
  step reads / the measured read rate; fraction = limit time / measured time, 1 = at the limit)."""
  cfg = S_MODEL
  r = whole["ratios"]
  # The files' weights are INT4 channel-wise: about one scale per row of d_model inputs.
  # KV: fp32 cache rows at the decode rows' mean context (DECODE_PROMPT + DECODE_STEPS / 2).
  weight_bytes = accounting.active_int4_bytes_per_token(cfg, group=cfg.d_model)
  kv_bytes = accounting.kv_cache_bytes(cfg, DECODE_PROMPT + DECODE_STEPS // 2, bytes_per_value=4)
  limit_ms = (weight_bytes + kv_bytes) / (bw * 1e9) * 1e3
  best = r["decode"]["fastest_arrangements"]["moe"]
  measured_ms = whole["arrangements"][best]["decode_ms"]
  return {"released_s_decode_speedup_vs_dense": r["decode"]["fastest"],
          "released_s_decode_speedup_vs_dense_same_arrangement": r["decode"]["same_arrangement"],
          "released_s_prefill128_speedup_vs_dense": r["prefill128"],
          "released_s_prefill128_speedup_vs_dense_without_amx": r.get("prefill128_without_amx"),
          "released_s_decode_fraction_of_bandwidth_limit": limit_ms / measured_ms,
          "released_s_decode_bandwidth_limit": {
              "weight_bytes_per_token": weight_bytes, "kv_bytes_per_token": kv_bytes,
              "dram_read_gbps": bw, "limit_ms": limit_ms, "measured_ms": measured_ms,
              "arrangement": best},
          "cpu_model": runinfo.cpu_model()}


def block_summary(rows, o, bw):
  """The block rows against their bandwidth limit, and the COMPARISONS' ratios."""
  ms = {(r["method"], r["T"]): r["median_ms"] for r in rows}
  limit = {}
  for m, group in LIMITED.items():
    b = active_bytes_per_token(dict(o, group_size=group))
    if (m, 1) in ms:
      lim_ms = b / (bw * 1e9) * 1e3
      limit[m] = {"active_bytes": b, "limit_ms": lim_ms, "fraction": lim_ms / ms[(m, 1)]}
  ratios = {}
  for cand, base in COMPARISONS:
    r = {str(T): ms[(base, T)] / ms[(cand, T)] for (m, T) in ms if m == cand and (base, T) in ms}
    if r:
      ratios[f"{cand}_vs_{base}"] = r
  return {"bandwidth_limit": limit, "ratios": ratios}


def whole_rows(a):
  """The whole-model measurement for the command line: given files, or the cached /
  freshly exported MobileMoE-S and MobileLLM-Pro."""
  if a.moe_model or a.dense_model:
    if not (a.moe_model and a.dense_model):
      raise SystemExit("--moe_model and --dense_model go together")
    models = {"moe": (a.moe_model, {"given": a.moe_model}),
              "dense": (a.dense_model, {"given": a.dense_model})}
  else:
    models = whole_models(a.experts, a.attention)
  t0 = time.time()
  w = whole_model_rows(models["moe"][0], models["dense"][0])
  w["models"] = {n: meta for n, (_, meta) in models.items()}
  w["timing_s"] = time.time() - t0
  print(json.dumps({k: v for k, v in w.items() if k != "models"}), flush=True)
  return w


# ----------------------------------------------------------------------------
# LiteRT-LM's runtime against our runner (export/runner.py) on the same model.

# Each workload: a model (preset + overrides, random weights, vocabulary = the tokenizer's)
# exported by export/ twice from the same weights, INT4 block-32, stock builtins only
# (LiteRT-LM takes no delegate or custom op, so the MoE is the portable all-experts
# lowering in both files): a .litertlm bundle for LiteRT-LM and a .tflite in the runner's
# signature convention. `python bench/ondevice.py --litertlm=WORKLOAD --tokenizer=SPM`.
LITERTLM_WORKLOADS = {
    "demo": dict(config="configs/tiny.py", overrides={},
                 what="the demo's model (configs/tiny.py: 4 layers, d 128, 8 experts top-2 "
                      "+ 1 shared), random weights"),
    "tiny": dict(config="configs/tiny.py:dense",
                 overrides=dict(n_layers=2, d_model=64, head_dim=16, d_ff=128),
                 what="2-layer dense model, d 64 (code-path check, not a speed claim)"),
}
LITERTLM_HEADLINE = "demo"      # the workload behind the top-level litertlm_* keys
LITERTLM_KV_LEN, LITERTLM_PREFILL = 256, 32
LITERTLM_STEPS, LITERTLM_ROUNDS = 64, 6   # decode steps per round; rounds per engine


def litertlm_export(workload, tokenizer, out_dir, log=print):
  """WORKLOAD's model -> (runner .tflite, .litertlm bundle, model config dict) in out_dir."""
  import flax.nnx as nnx
  from export import checkpoint, litert, litertlm, torch_model
  from mobilemoe_jax.data.tokenizer import load_tokenizer
  from mobilemoe_jax.model import Transformer
  w = LITERTLM_WORKLOADS[workload]
  cfg = checkpoint.load_config(w["config"]).model
  cfg.update(dict(w["overrides"], vocab_size=load_tokenizer(tokenizer).vocab_size,
                  max_seq_len=max(cfg.max_seq_len, LITERTLM_KV_LEN)))
  model = torch_model.from_flax(Transformer(cfg, rngs=nnx.Rngs(0)), cfg)
  kw = dict(quant="int4_g32", prefill_lens=(LITERTLM_PREFILL,), kv_len=LITERTLM_KV_LEN, log=log)
  runner_path = os.path.join(out_dir, f"{workload}.tflite")
  litert.export(model, runner_path, **kw)
  lm_path = os.path.join(out_dir, f"{workload}_litertlm.tflite")
  litert.export(model, lm_path, convention="litertlm", **kw)
  return runner_path, litertlm.bundle(lm_path, out_dir, tokenizer, LITERTLM_KV_LEN), model.cfg


def litertlm_race(runner_path, bundle, tokenizer, steps=LITERTLM_STEPS, rounds=LITERTLM_ROUNDS,
                  threads=THREADS):
  """Greedy decode after the same text prompt, rounds alternating between LiteRT-LM (its own
  decode tokens/s, from its benchmark info: it steps, samples and detokenizes) and our
  runner (the same number of steps timed around its decode + argmax), which one goes
  first swapping each round. Per-round figures, their medians, and whether the greedy
  texts agreed (the two files hold the same weights)."""
  from export.litertlm import Engine, timed_greedy_decode
  from export.runner import PROMPTS, LiteRTLM
  from mobilemoe_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(tokenizer)
  engine = Engine(bundle, threads)
  lm = LiteRTLM(runner_path, threads)
  prompt = PROMPTS[0]
  ids = [tok.bos_id] + tok.encode(prompt)
  theirs, ours, same = [], [], []

  def litertlm_round():
    text, speed = engine.generate(prompt, steps)
    theirs.append(speed["decode_tokens_per_s"])
    return text, speed["decode_tokens"] or steps

  def runner_round(n):
    out, seconds = timed_greedy_decode(lm, ids, n)
    ours.append(n / seconds)
    return tok.decode(out)

  try:
    for r in range(rounds):
      if r % 2:
        mine = runner_round(steps)
        text, n = litertlm_round()
      else:
        text, n = litertlm_round()
        mine = runner_round(n)
      same.append(mine == text)
  finally:
    engine.close()
  return {"litertlm_decode_tokens_per_s": float(np.median(theirs)),
          "runner_decode_tokens_per_s": float(np.median(ours)),
          "litertlm_rounds": theirs, "runner_rounds": ours,
          "runner_vs_litertlm": float(np.median(ours) / np.median(theirs)),
          "same_greedy_text_rounds": sum(same), "rounds": rounds, "decode_steps": steps,
          "prompt": prompt}


def litertlm_run(workload, tokenizer, out_dir, steps=LITERTLM_STEPS, rounds=LITERTLM_ROUNDS):
  """One workload exported and timed: its row for ondevice.json (model, files, threads, CPU)."""
  runner_path, bundle, cfg = litertlm_export(workload, tokenizer, out_dir,
                                             log=lambda m: print(m, file=sys.stderr, flush=True))
  row = litertlm_race(runner_path, bundle, tokenizer, steps, rounds)
  return dict(row, workload=workload, what=LITERTLM_WORKLOADS[workload]["what"],
              model=litertlm_model_summary(cfg),
              weights="int4_g32", kv_len=LITERTLM_KV_LEN, prefill_len=LITERTLM_PREFILL,
              threads=THREADS, cpu_model=runinfo.cpu_model(),
              file_bytes={"runner": os.path.getsize(runner_path), "litertlm": os.path.getsize(bundle)})


def litertlm_model_summary(cfg):
  """The fields of a model config (torch_model's dict) that shape its decode cost."""
  out = {k: cfg[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")}
  m = cfg["moe"]
  if m["n_experts"]:
    out["moe"] = {k: m[k] for k in ("n_experts", "top_k", "d_expert", "n_shared", "d_shared",
                                    "first_dense", "every")}
  return out


def keep_litertlm_rows(res, path):
  """A full run's results with the `--litertlm` rows of the file it replaces (another mode
  of this script, each with its own run record), so it does not drop them."""
  if os.path.exists(path):
    with open(path) as f:
      for row in json.load(f).get("litertlm_vs_runner", {}).values():
        res = merge_litertlm(res, {k: v for k, v in row.items() if k != "run"}, row["run"])
  return res


def merge_litertlm(res, row, record):
  """ondevice.json with the workload's row under litertlm_vs_runner (the run's record beside
  it), and, for the headline workload, the top-level keys: LiteRT-LM's decode tokens/s next
  to our runner's on the same model and threads, and the CPU."""
  res = dict(res)
  res["litertlm_vs_runner"] = dict(res.get("litertlm_vs_runner", {}),
                                   **{row["workload"]: dict(row, run=record)})
  if row["workload"] == LITERTLM_HEADLINE:
    res.update(litertlm_decode_tokens_per_s=row["litertlm_decode_tokens_per_s"],
               litertlm_runner_decode_tokens_per_s=row["runner_decode_tokens_per_s"],
               litertlm_workload=row["workload"], litertlm_threads=row["threads"],
               litertlm_cpu_model=row["cpu_model"])
  return res


def markdown_table(res) -> str:
  """The bench/README.md tables for a results dict: rows, whole models, ratios."""
  n_s, n_pro = len(STACKS["moe_s_ffn"]["layers"]), len(STACKS["pro_ffn"]["layers"])
  names = {"delegate_base": "(a0) MobileMoeBlock, baseline build (--baseline_lib), block-32",
           "delegate": "(a) MobileMoeBlock delegate, experts block-32",
           "delegate_cw": "(a') MobileMoeBlock delegate, experts channel-wise",
           "delegate_cwt": "(a'') MobileMoeBlock delegate, experts channel-wise, 16-row tiles",
           "delegate_cwt_avx512": "(a'') the same, kernel=avx512 (no AMX tiles)",
           "all_experts": "(b) all experts, INT4 FCs",
           "upstream_moe": "(c) upstream `moe` op (int8, gelu)",
           "moe_s_ffn": f"MobileMoE-S FFN stack ({n_s} layers, experts block-32)",
           "moe_s_ffn_cw": f"MobileMoE-S FFN stack ({n_s} layers, experts channel-wise)",
           "moe_s_ffn_cwt": f"MobileMoE-S FFN stack ({n_s} layers, experts channel-wise, tiles)",
           "pro_ffn": f"MobileLLM-Pro FFN stack ({n_pro} layers, INT4 channel-wise)",
           "pro_ffn_b32": f"MobileLLM-Pro FFN stack ({n_pro} layers, INT4 block-32)"}
  lines = ["| config | per | decode T=1 ms | prefill 128 ms | prefill 512 ms | peak RSS MB |",
           "|---|---|---|---|---|---|"]
  for m, label in names.items():
    rs = {r["T"]: r for r in res["rows"] if r["method"] == m}
    if not rs:
      continue
    cell = lambda T: (f"{rs[T]['median_ms']:.3g} (p10 {rs[T]['p10_ms']:.3g})" if T in rs else "-")
    any_r = next(iter(rs.values()))
    lines.append(f"| {label} | {any_r['per']} | {cell(1)} | {cell(128)} | {cell(512)} | "
                 f"{any_r['peak_rss_mb']:.0f} |")
  for m, lim in res["bandwidth_limit"].items():
    lines.append(f"| bandwidth limit of {m}: {lim['active_bytes'] / 1e6:.2f} MB / "
                 f"{res['dram_read_gbps']:.1f} GB/s | block | {lim['limit_ms']:.3g} "
                 f"({lim['fraction']:.2f} of it reached) | | | |")
  whole = res.get("whole")
  if whole:
    lines += ["", "| whole model, arrangement | decode ms (context 32..159) | decode ms (context "
              "896..1023) | prefill 128 ms | prefill 512 ms | peak RSS MB |",
              "|---|---|---|---|---|---|"]
    for n, label in ARRANGEMENTS.items():
      a = whole["arrangements"].get(n)
      if not a:   # not timed in this run (moe_avx512: a CPU without AMX, or an older file)
        continue
      cell = lambda k: f"{a[k]:.4g}" if k in a else "-"
      lines.append(f"| {label} | {cell('decode_ms')} | {cell('decode_long_ms')} | "
                   f"{cell('prefill128_ms')} | {cell('prefill512_ms')} | {cell('peak_rss_mb')} |")
  lines += ["", "| ratio (baseline time / candidate time) | value |", "|---|---|"]
  if whole:
    for key, label in (("decode", "decode, context 32..159"), ("decode_long", "decode, context 896..1023")):
      r = whole["ratios"].get(key)
      if r:
        lo, med, hi = r["fastest_rounds_min_median_max"]
        best = r["fastest_arrangements"]
        same = r["same_arrangement"]
        lines.append(f"| whole models, {label}: each model's fastest arrangement ({best['moe']} vs "
                     f"{best['dense']}) | {r['fastest']:.2f}x (rounds {lo:.2f}-{hi:.2f}) |")
        lines.append(f"| whole models, {label}: same arrangement, one interpreter / decode_delegate | "
                     f"{same['one_interpreter']:.2f}x / {same['decode_delegate']:.2f}x |")
    for P in WHOLE_PREFILL:
      if f"prefill{P}" in whole["ratios"]:
        lines.append(f"| whole models, prefill {P} | {whole['ratios'][f'prefill{P}']:.2f}x |")
      if f"prefill{P}_without_amx" in whole["ratios"]:
        lines.append(f"| whole models, prefill {P}, the delegate without AMX (kernel=avx512) | "
                     f"{whole['ratios'][f'prefill{P}_without_amx']:.2f}x |")
  for name, r in res["ratios"].items():
    lines.append(f"| {name} (T=" + " / ".join(r) + ") | " + " / ".join(f"{v:.2f}x" for v in r.values()) + " |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--table", action="store_true", help="print the README table of --out")
  ap.add_argument("--build", nargs=3, metavar=("METHOD", "L", "PATH"))
  ap.add_argument("--race", nargs=5, metavar=("METHODS", "PATHS", "DS", "TS", "BUDGET_S"))
  ap.add_argument("--rss", nargs=4, metavar=("METHOD", "PATH", "D", "TS"))
  ap.add_argument("--whole", nargs=3, metavar=("MOE_PATH", "DENSE_PATH", "BUDGET_S"))
  ap.add_argument("--whole_rss", nargs=2, metavar=("PATH", "plain|fc"))
  ap.add_argument("--export", nargs=2, metavar=("NAME", "PATH"))
  ap.add_argument("--whole_only", action="store_true", help="only the whole-model rows")
  ap.add_argument("--quick", action="store_true", help="fewer layers/iterations (smoke test)")
  ap.add_argument("--block32_stacks", action="store_true",
                  help="also time the FFN stacks with block-32 weights (MobileMoE-S experts, Pro FCs)")
  ap.add_argument("--blocks_only", action="store_true",
                  help="only the block rows (a0/a/a'/b/c), full size: no FFN stacks, no whole models")
  ap.add_argument("--experts", choices=("block32", "channel"), default="channel",
                  help="format of the whole MobileMoE-S model's experts (exported and cached "
                       "separately); the block and FFN-stack rows always show both")
  ap.add_argument("--attention", choices=("delegate", "portable"), default="delegate",
                  help="both whole models' attention (decode and prefill): the delegate's "
                       "MobileKvAttention (reads the filled cache slots and the causal new "
                       "tokens only) or builtin ops over the whole cache")
  ap.add_argument("--baseline_lib", help="another build of libmobilemoe_delegate.so: adds "
                  "row (a0), the block-32 block run by it, timed with the others (before/after); "
                  "with --decode_profile: profiled next to this build (it needs the profile option)")
  ap.add_argument("--decode_profile", action="store_true",
                  help="development: per-op decode profile of both whole models (decode_delegate "
                       "arrangement), this build of the delegate next to --baseline_lib if given; "
                       "printed, not stored")
  ap.add_argument("--rounds", type=int, default=12, help="--decode_profile: rounds per build")
  ap.add_argument("--moe_model")
  ap.add_argument("--dense_model")
  ap.add_argument("--out", default=DEFAULT_OUT)
  ap.add_argument("--litertlm", choices=sorted(LITERTLM_WORKLOADS),
                  help="only LiteRT-LM's runtime vs our runner on this workload (LITERTLM_WORKLOADS), "
                       "merged into --out")
  ap.add_argument("--tokenizer", default=os.path.join(REPO, "data", "tokenizer", "spm.model"),
                  help="SentencePiece .model for --litertlm (the bundle carries it; the model's "
                       "vocabulary is its size)")
  a = ap.parse_args(argv)
  if a.table:
    return print(markdown_table(runinfo.read_results(a.out)))
  if a.build:
    return build(a.build[0], int(a.build[1]), a.build[2])
  ints = lambda csv: [int(v) for v in csv.split(",")]
  if a.race:
    ms_, paths, Ds, Ts_, budget = a.race
    return race(ms_.split(","), paths.split(","), ints(Ds), ints(Ts_), float(budget))
  if a.rss:
    return rss(a.rss[0], a.rss[1], int(a.rss[2]), ints(a.rss[3]))
  if a.whole:
    return whole_model_race(a.whole[0], a.whole[1], float(a.whole[2]))
  if a.whole_rss:
    return whole_rss(*a.whole_rss)
  if a.export:
    return export_whole(*a.export)
  if a.litertlm:
    if not os.path.isfile(a.tokenizer):
      raise SystemExit(f"--tokenizer {a.tokenizer}: no such file (make data builds the demo's)")
    record = runinfo.run_record("bench/ondevice.py", gpu=False)
    with tempfile.TemporaryDirectory() as tmp:
      row = litertlm_run(a.litertlm, a.tokenizer, tmp)
    res = {}
    if os.path.exists(a.out):
      with open(a.out) as f:
        res = json.load(f)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      json.dump(merge_litertlm(res, row, record), f, indent=1)
    return print(json.dumps(row, indent=1))
  if a.decode_profile:
    libs = {"this": dl.library_path()}
    if a.baseline_lib:
      libs["baseline"] = os.path.abspath(a.baseline_lib)
    paths = ({"moe": a.moe_model, "dense": a.dense_model} if a.moe_model else
             {n: p for n, (p, _) in whole_models(a.experts, a.attention).items()})
    res = {n: decode_profile(p, libs, a.rounds) for n, p in paths.items() if p}
    return print(json.dumps(dict(res, loadavg_end=os.getloadavg()), indent=1))
  if a.whole_only:
    # Merged into --out: the whole-model record under "whole_only_run" and the released-S
    # keys at the top; the block rows of an earlier full run stay as they were.
    bw = dram_read_bandwidth()
    w = dict(runinfo.run_record("bench/ondevice.py", gpu=False), whole=whole_rows(a),
             experts=a.experts, attention=a.attention, threads=THREADS, dram_read_gbps=bw)
    w["loadavg_end"] = os.getloadavg()
    summary = released_s_summary(w["whole"], bw)
    res = {}
    if os.path.exists(a.out):
      with open(a.out) as f:
        res = json.load(f)
    res.update(summary, whole_only_run=w)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)
    return print(json.dumps(dict(w["whole"]["ratios"], **summary), indent=1))

  t_start = time.time()
  record = runinfo.run_record("bench/ondevice.py", gpu=False)   # its load average: at the start
  o = dict(BLOCK)
  L = 3 if a.quick else 8
  budget = 8 if a.quick else 20
  Ts = (1, 128) if a.quick else (1, 128, 512)
  bw = dram_read_bandwidth()
  print(f"DRAM read bandwidth ({THREADS} threads): {bw:.1f} GB/s", flush=True)
  rows = []
  tmp = tempfile.mkdtemp()
  groups = [("delegate", "delegate_cw", "delegate_cwt", "delegate_cwt_avx512", "all_experts",
             "upstream_moe")]
  if a.baseline_lib:
    os.environ[BASELINE_ENV] = os.path.abspath(a.baseline_lib)   # read by the children
    groups[0] = ("delegate_base",) + groups[0]
  if not (a.quick or a.blocks_only):
    # The block-32 stacks only on request: building and timing them kept a first run (which
    # also exports the whole models, ~4 min) over 15 minutes.
    groups.append(("moe_s_ffn_cw", "moe_s_ffn_cwt", "pro_ffn") +
                  (("moe_s_ffn", "pro_ffn_b32") if a.block32_stacks else ()))
  for group in groups:
    for r in measure(group, L, Ts, budget, tmp):
      rows.append(r)
      print(json.dumps(r), flush=True)

  # --quick skips the whole models unless files are given (the export takes minutes)
  whole = whole_rows(a) if (not (a.quick or a.blocks_only) or a.moe_model) else None
  if whole:
    whole.update(experts="given file" if a.moe_model else a.experts,
                 attention="given file" if a.moe_model else a.attention)
  res = dict(record, **{
      "threads": THREADS, "loadavg_end": os.getloadavg(),
      "block": o,
      "decode_stack_layers": L,
      "dram_read_gbps": bw,
      # block-32 experts (mobilemoe_jax.scaling.accounting.load_device reads it with the rows)
      "active_bytes_per_token_per_block": active_bytes_per_token(o),
      "rows": rows,
      **block_summary(rows, o, bw),
      "baseline_lib": a.baseline_lib,
      "whole": whole,
      **(released_s_summary(whole, bw) if whole and not a.moe_model else {}),
      "wall_s": time.time() - t_start,
  })
  res = keep_litertlm_rows(res, a.out)
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(res, f, indent=1)
  print(markdown_table(res))


if __name__ == "__main__":
  main()
