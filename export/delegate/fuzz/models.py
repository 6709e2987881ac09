"""Structure-aware fuzzing of the delegate with hostile one-op models, under ASan + UBSan.

Each mutant is a valid one-op model (MobileMoeBlock, MobileKvAttention, or an INT4
FULLY_CONNECTED, channel-wise or block-wise, with the delegate's `fully_connected` option)
with 1-3 mutations an attacker could make to the file: option bytes and values, tensor
shapes, types, buffers (truncated, removed, added to the output), the node's input/output
indices, a RESHAPE in front of the node, quantization parameters, and resizes of the inputs
after the claim.
Every mutant is built into an interpreter with the ASan build of the delegate and invoked;
errors are expected (refused nodes, failed invokes), a crash or sanitizer report is not.

Mutants run in batches in child processes (the sanitizer runtime is preloaded there). A
child that dies is classified by its report: frames in the delegate's library make it a
delegate crash (its model is saved to --save for a regression test, and the run fails);
otherwise the LiteRT runtime itself fell over on the file (counted apart, not ours).

  python -m export.delegate.fuzz.models --mutants 10000 --seed 0 --save /tmp/crashes
  python -m export.delegate.fuzz.models --replay tests/delegate_regressions/models
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))

# ---------------------------------------------------------------------------------------
# Base models and mutations (numpy + the flatbuffers schema only).

_EXTREMES = (-1, 0, 1, 2, 3, 7, 16, 63, 64, 65, 127, 128, 1 << 16, (1 << 24) + 1, (1 << 31) - 1,
             -(1 << 31), (1 << 40))
_TYPES = ("FLOAT32", "FLOAT16", "INT32", "UINT8", "INT64", "BOOL", "INT8", "INT4")


def _moe_base(rng):
  from export import delegate as dl
  from export.delegate import tflite_builder as tb
  shared = rng.random() < 0.5
  G = int(rng.choice([0, 32]))
  o = dict(num_experts=4, top_k=2, d_model=128, d_expert=128, d_shared=128 if shared else 0,
           group_size=G, score_func="softmax", norm_topk_prob=True, routed_scale=1.0,
           act="silu")
  # routed experts [E, in, out] (the released layout) in some of the block-32 bases
  axis = "out" if G and rng.random() < 0.5 else "in"
  o["expert_group_axis"] = axis
  w = dl.random_moe_weights(rng, 4, 128, 128, o["d_shared"], G, expert_group_axis=axis)
  T = int(rng.integers(1, 5))
  g = tb.GraphBuilder()
  x = g.tensor("x", [T, 128])
  y = tb.add_moe_block(g, x, [T, 128], w, o, weight_tiles=int(rng.choice([0, 16])))
  g.inputs, g.outputs = [x], [y]
  return g, o


def _attention_base(rng):
  from export.delegate import tflite_builder as tb
  H, K, Dh, T, P = 4, 2, 16, int(rng.integers(1, 4)), 8
  o = dict(num_heads=H, num_kv_heads=K, head_dim=Dh, window=int(rng.choice([0, 4])),
           scale=0.25)
  g = tb.GraphBuilder()
  shapes = [("q", [1, T, H, Dh]), ("k_new", [1, T, K, Dh]), ("v_new", [1, T, K, Dh]),
            ("k_cache", [1, K, P, Dh]), ("v_cache", [1, K, Dh, P])]
  ins = [g.tensor(n, s) for n, s in shapes] + [g.tensor("input_pos", [T], np.int32)]
  y = g.tensor("y", [1, T, H * Dh])
  g.custom_op(tb.ATTENTION_OP_NAME, ins, [y], tb.moe_options_bytes(o))
  g.inputs, g.outputs = ins, [y]
  return g, o


def _fc_base(rng):
  from export.delegate import tflite_builder as tb
  g = tb.GraphBuilder()
  N = int(rng.integers(1, 4))
  x = g.tensor("x", [1, N, 128])
  w, _ = tb.int4_channelwise(g, "w", rng, 48, 128)
  y = tb.fully_connected(g, x, w, [1, N, 48], "y")
  g.inputs, g.outputs = [x], [y]
  return g, None


def _fc_block_base(rng):
  from export.delegate import tflite_builder as tb
  g = tb.GraphBuilder()
  N = int(rng.integers(1, 4))
  x = g.tensor("x", [1, N, 128])
  w, _, _ = tb.int4_blockwise(g, "w", rng, 48, 128, int(rng.choice([32, 64])))
  y = tb.fully_connected(g, x, w, [1, N, 48], "y")
  g.inputs, g.outputs = [x], [y]
  return g, None


BASES = {"moe": _moe_base, "attention": _attention_base, "fc": _fc_base,
         "fc_block": _fc_block_base}
FC_BASES = ("fc", "fc_block")


def _mutate_options(rng, g, options):
  from flatbuffers import flexbuffers
  op = g.ops[-1]
  if options is None or not op.customOptions:
    return "options: none (builtin)"
  how = rng.integers(5)
  if how in (0, 4):  # raw bytes (ours, or a blob of the parser's corpus): flip, cut, extend
    b = bytearray(op.customOptions)
    if how == 4:
      files = sorted(glob.glob(os.path.join(_HERE, "seeds", "*.bin")) +
                     glob.glob(os.path.join(_REPO, "tests", "delegate_regressions", "options", "*")))
      b = bytearray(open(files[int(rng.integers(len(files)))], "rb").read())
    for _ in range(int(rng.integers(1, 4))):
      b[int(rng.integers(len(b)))] = int(rng.integers(256))
    if rng.random() < 0.3:
      b = b[:int(rng.integers(len(b)))] if rng.random() < 0.5 else b + bytes(
          rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
    op.customOptions = list(b)
    return "options: bytes"
  o = dict(options)
  key = str(rng.choice(sorted(o)))
  if how == 1:
    o[key] = _EXTREMES[int(rng.integers(len(_EXTREMES)))]
  elif how == 2:
    o[key] = [float("nan"), float("inf"), -1e39, 1e300, "x" * int(rng.integers(0, 300)),
              True, b"\xff\xfe", "\xff"][int(rng.integers(8))]
  else:
    del o[key]
  try:
    op.customOptions = list(flexbuffers.Dumps(o))
  except Exception:  # a value flexbuffers cannot encode: leave the options as they were
    return "options: unencodable"
  return f"options: {key}"


def _mutate_shape(rng, g):
  t = g.tensors[int(rng.integers(len(g.tensors)))]
  shape = list(t.shape)
  how = rng.integers(3)
  if how == 0 and shape:
    i = int(rng.integers(len(shape)))
    shape[i] = [0, 1, 2, shape[i] + 1, shape[i] * 2, max(shape[i] - 1, 0), 65, 1 << 20,
                (1 << 31) - 1, -1, -7][int(rng.integers(11))]
  elif how == 1:
    shape.insert(int(rng.integers(len(shape) + 1)), int(rng.choice([1, 2, 3])))
  elif shape:
    shape.pop(int(rng.integers(len(shape))))
  t.shape = shape
  return f"shape: {t.name} -> {shape}"


def _mutate_type(rng, g):
  from ai_edge_litert import schema_py_generated as schema
  t = g.tensors[int(rng.integers(len(g.tensors)))]
  name = _TYPES[int(rng.integers(len(_TYPES)))]
  t.type = getattr(schema.TensorType, name)
  return f"type: {t.name} -> {name}"


def _mutate_buffer(rng, g):
  from ai_edge_litert import schema_py_generated as schema
  t = g.tensors[int(rng.integers(len(g.tensors)))]
  how = rng.integers(3)
  if how == 0 and t.buffer:  # truncate or extend a constant's bytes
    b = g.buffers[t.buffer]
    n = len(b.data)
    b.data = b.data[:int(rng.integers(n + 1))] if rng.random() < 0.5 else np.concatenate(
        [b.data, np.zeros(int(rng.integers(1, 64)), np.uint8)])
    return f"buffer: {t.name} resized"
  if how == 1 and t.buffer:  # no longer a constant
    t.buffer = 0
    return f"buffer: {t.name} made non-constant"
  # a runtime tensor (e.g. the output) gets constant data, of its size or another
  b = schema.BufferT()
  size = 4 * int(np.prod(t.shape)) if t.shape and min(t.shape) >= 0 else 4
  b.data = np.zeros(int(rng.choice([size, size, 4, 4096])), np.uint8)
  g.buffers.append(b)
  t.buffer = len(g.buffers) - 1
  return f"buffer: {t.name} made constant"


def _mutate_indices(rng, g):
  op = g.ops[-1]
  ins, outs = list(op.inputs), list(op.outputs)
  if not ins or not outs:
    return "indices: skipped"
  n = len(g.tensors)
  how = rng.integers(5)
  i = int(rng.integers(len(ins)))
  if how == 0:
    ins[i] = int(rng.choice([-1, n, n + 100, -5]))
  elif how == 1:
    j = int(rng.integers(len(ins)))
    ins[i], ins[j] = ins[j], ins[i]
  elif how == 2:
    outs[0] = int(rng.choice([t for t in ins if t >= 0] or [0]))  # output onto an input
  elif how == 3:
    ins[i] = outs[0]
  else:
    ins = ins[:int(rng.integers(len(ins) + 1))] if rng.random() < 0.5 else ins + [-1] * int(
        rng.integers(1, 4))
  op.inputs, op.outputs = ins, outs
  return f"indices: {how}"


def _mutate_reshape(rng, g):
  """A RESHAPE in front of the node's first input: a new graph input reshaped to it (the
  declared shape may differ from what the RESHAPE makes at run time)."""
  from ai_edge_litert import schema_py_generated as schema
  op = g.ops[-1]
  x = op.inputs[0] if len(op.inputs) else -1
  if x < 0 or x >= len(g.tensors):
    return "reshape: skipped"
  shape = list(g.tensors[x].shape)
  numel = int(np.prod(shape)) if shape else 1
  src = g.tensor("reshape_src", [max(numel, 1)])
  new = [max(numel, 1)] if rng.random() < 0.3 else shape
  if rng.random() < 0.5 and new:
    new = list(new)
    new[-1] = int(rng.choice([1, 2, 3, 64, max(new[-1] // 2, 1)]))
  target = g.const("reshape_shape", np.asarray(new, np.int32))
  out = g.tensor("reshaped", shape)
  ro = schema.ReshapeOptionsT()
  ro.newShape = new
  g.op(schema.BuiltinOperator.RESHAPE, [src, target], [out], schema.BuiltinOptions.ReshapeOptions,
       ro)
  g.ops.insert(0, g.ops.pop())  # runs before our node
  op.inputs = [out] + list(op.inputs[1:])
  g.inputs = [src if t == x else t for t in g.inputs]
  return f"reshape: -> {new}"


def _mutate_quant(rng, g):
  from ai_edge_litert import schema_py_generated as schema
  for t in g.tensors:
    q = t.quantization
    if q is not None and q.detailsType == schema.QuantizationDetails.BlockwiseQuantization:
      how, n = rng.integers(4), len(g.tensors)
      if how == 0:    # the scales: another tensor (x, the output, the weight), or none
        q.details.scales = int(rng.choice([-1, 0, n - 1, n, 1 << 30]))
      elif how == 1:
        q.details.blockSize = int(rng.choice([0, 1, 3, 16, 48, 128, 256, -32]))
      elif how == 2:
        q.details.zeroPoints = int(rng.choice([0, 1, n]))
      else:
        q.quantizedDimension = int(rng.choice([1, -1]))
      return "quantization (block-wise)"
    if q is not None and q.scale is not None and len(q.scale):
      how = rng.integers(3)
      if how == 0:
        q.scale = list(q.scale)[:int(rng.integers(len(q.scale)))]
      elif how == 1:
        q.zeroPoint = [int(rng.integers(-3, 3)) for _ in q.zeroPoint]
      else:
        q.quantizedDimension = int(rng.choice([1, 2, -1]))
      return "quantization"
  return "quantization: none"


MUTATIONS = (_mutate_options, _mutate_shape, _mutate_type, _mutate_buffer, _mutate_indices,
             _mutate_reshape, _mutate_quant)


def make_mutant(seed: int):
  """(model bytes, base name, resize plan or None, [what was mutated]) for one seed."""
  rng = np.random.default_rng(seed)
  base = list(BASES)[seed % len(BASES)]
  g, options = BASES[base](rng)
  what = []
  for _ in range(int(rng.integers(1, 4))):
    m = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    what.append(m(rng, g, options) if m is _mutate_options else m(rng, g))
  # After the claim, the app may resize its inputs (more tokens, other lengths).
  resize = None
  if rng.random() < 0.5 and g.inputs:
    i = int(rng.integers(len(g.inputs)))
    t = g.inputs[i]
    shape = list(g.tensors[t].shape) if 0 <= t < len(g.tensors) else [1]
    if shape and rng.random() < 0.8:  # one dim changed (more tokens, another cache length)
      shape[int(rng.integers(len(shape)))] = int(rng.choice([0, 1, 2, 3, 5, 64, 65, 128, 200]))
    else:
      shape = [int(d) for d in rng.choice([0, 1, 2, 3, 65, 128], size=int(rng.integers(1, 5)))]
    resize = [i, shape]
  try:
    model = g.build()
  except Exception as e:  # the schema refuses it (e.g. a negative index in a uint field)
    return None, base, None, what + [f"unbuildable: {type(e).__name__}"]
  return model, base, resize, what


# ---------------------------------------------------------------------------------------
# Running mutants (the child) and classifying their fate (the parent).

def run_model(model: bytes, fully_connected: bool, resize=None, on_claim=None) -> str:
  """Builds and invokes one model with the delegate: 'invoked', 'refused' (an error from
  the interpreter or the delegate), 'wrote_constant' (the model's bytes changed during
  invoke: the interpreter maps constants from them, so an op wrote into one; with no node
  claimed by the delegate that op was LiteRT's own: 'runtime_wrote_constant'), or the
  Python exception's type for anything else. on_claim(n): called with the number of nodes
  the delegate claimed, before anything runs."""
  return _invoke(model, fully_connected, resize, on_claim=on_claim)


def _invoke(model: bytes, fully_connected: bool, resize, delegate=True, on_claim=None) -> str:
  from ai_edge_litert.interpreter import Interpreter
  from export import delegate as dl
  try:
    d = [dl.load(num_threads=2, fully_connected=fully_connected)] if delegate else None
    it = Interpreter(model_content=model, experimental_delegates=d, num_threads=1)
    claimed = dl.stats(d[0])["claimed"] if d else 0
    if on_claim and d:
      on_claim(claimed)
    if resize is not None:
      det = it.get_input_details()
      it.resize_tensor_input(det[resize[0] % len(det)]["index"], resize[1], strict=False)
    it.allocate_tensors()
    rng = np.random.default_rng(0)
    for det in it.get_input_details():
      shape, dtype = det["shape"], det["dtype"]
      if np.issubdtype(dtype, np.integer):
        v = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)  # contiguous positions
      else:
        v = rng.standard_normal(shape).astype(dtype)
      it.set_tensor(det["index"], v)  # may write a constant input: the file said so
    before = zlib.crc32(model)
    it.invoke()
    if zlib.crc32(model) != before:
      return "wrote_constant" if claimed else "runtime_wrote_constant"
    for det in it.get_output_details():
      it.get_tensor(det["index"])
    return "invoked"
  except (RuntimeError, ValueError) as e:
    return "refused"
  except Exception as e:  # noqa: BLE001 (any Python-level error is an orderly outcome)
    return type(e).__name__


def _child(args):
  """Runs seeds [start, stop) (or the files of --replay); writes progress to --state."""
  if args.plain:  # one model without the delegate: does LiteRT alone crash on it?
    spec = json.load(open(args.plain))
    print(_invoke(open(spec["model"], "rb").read(), False, spec["resize"], delegate=False))
    return
  counts, flagged = {}, []
  items = (sorted(glob.glob(os.path.join(args.replay, "*.tflite"))) if args.replay
           else range(args.start, args.stop))
  for item in items:
    if args.replay:
      model, base, resize = open(item, "rb").read(), "replay", None
    else:
      model, base, resize, _ = make_mutant(item)
    def progress(**extra):  # which mutant is running, should it kill us
      with open(args.state, "w") as f:
        f.write(json.dumps({"item": item, "counts": counts, "flagged": flagged, **extra}))
    progress()
    if model is None:
      outcome = "unbuildable"
    else:
      outcome = run_model(model, fully_connected=base in FC_BASES + ("replay",), resize=resize,
                          on_claim=lambda n: progress(claimed=n))
    counts[outcome] = counts.get(outcome, 0) + 1
    if outcome == "wrote_constant":
      flagged.append(item)
  with open(args.state, "w") as f:
    f.write(json.dumps({"done": counts, "flagged": flagged}))


def _gcc_lib(name):
  try:
    out = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True,
                         text=True).stdout.strip()
  except OSError:
    return None
  return out if os.path.isabs(out) and os.path.exists(out) else None


def _sanitizer_env_ok() -> bool:
  return _gcc_lib("libasan.so") is not None


def _sanitizer_env():
  lib = _gcc_lib
  asan = lib("libasan.so")
  if asan is None:
    raise RuntimeError("libasan not found (g++ with AddressSanitizer is needed)")
  preload = " ".join(p for p in (asan, lib("libstdc++.so")) if p)
  return dict(os.environ, LD_PRELOAD=preload, MOBILEMOE_DELEGATE_VARIANT="asan",
              PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
              # handle_abort: a std::terminate (an exception out of a C callback) gets a stack
              ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:handle_abort=1:"
                           "allocator_may_return_null=1",
              UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")


def _ours(report: str) -> bool:
  """Whether a native crash report's stack (or a UBSan report) is in the delegate's code."""
  return any(("mobilemoe_delegate" in line or "export/delegate/" in line) and
             (line.lstrip().startswith("#") or "runtime error:" in line)
             for line in report.splitlines())


def _save(folder, item, kind: str, replay):
  """Keeps the model of a failing mutant (a seed, or a replayed file) for a regression test."""
  if not folder:
    return
  os.makedirs(folder, exist_ok=True)
  model = open(item, "rb").read() if replay else make_mutant(item)[0]
  name = os.path.basename(item) if replay else f"{kind}_seed{item}.tflite"
  with open(os.path.join(folder, name), "wb") as f:
    f.write(model)


def _crashes_without_delegate(model: bytes, resize, env, tmp: str) -> bool:
  path, spec = os.path.join(tmp, "plain.tflite"), os.path.join(tmp, "plain.json")
  with open(path, "wb") as f:
    f.write(model)
  with open(spec, "w") as f:
    json.dump({"model": path, "resize": resize}, f)
  r = subprocess.run([sys.executable, "-m", "export.delegate.fuzz.models", "--child",
                      "--plain", spec], env=env, capture_output=True, text=True,
                     errors="replace", cwd=_REPO)
  return r.returncode < 0 or "ERROR: AddressSanitizer" in r.stderr


def fuzz(mutants: int, seed: int, save: str | None, batch: int = 250, replay: str | None = None,
         log=print) -> dict:
  """Runs the mutants (or replays the files in `replay`); returns the outcome counts, with
  'delegate_crashes' (must be 0), 'wrote_constant' (must be 0) and 'runtime_crashes' (in
  LiteRT's own code, e.g. XNNPACK's, with no delegate frame: not ours)."""
  from export import delegate as dl
  dl.library_path("asan")
  env = _sanitizer_env()
  total = {"delegate_crashes": 0, "runtime_crashes": 0, "mutants": 0}
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    state = os.path.join(tmp, "state.json")
    start, stop = seed, seed + (0 if replay else mutants)
    while replay or start < stop:
      cmd = [sys.executable, "-m", "export.delegate.fuzz.models", "--child", "--state", state]
      cmd += ["--replay", replay] if replay else ["--start", str(start), "--stop",
                                                 str(min(stop, start + batch))]
      if os.path.exists(state):
        os.remove(state)
      r = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace",
                         cwd=_REPO)
      st = json.load(open(state)) if os.path.exists(state) else {}
      report = r.stdout + r.stderr
      sanitizer = "ERROR: AddressSanitizer" in report or "runtime error:" in report
      counts = st.get("done", st.get("counts", {}))
      for k, v in counts.items():  # the mutants that ran before any crash
        total[k] = total.get(k, 0) + v
      total["mutants"] += sum(counts.values())
      for item in st.get("flagged", []):  # models that got a constant written into
        _save(save, item, "wrote_constant", replay)
      if r.returncode == 0 and "done" in st and not sanitizer:
        if replay:
          break
        start = min(stop, start + batch)
        continue
      if r.returncode > 0 and not sanitizer and "Sanitizer" not in report:
        raise RuntimeError(f"the fuzzing child failed (a bug of the harness):\n{report[-3000:]}")
      # The child died on st["item"]: whose crash was it? Frames in the delegate: ours.
      # Otherwise ours too, unless LiteRT alone (no delegate) crashes on the same model, or
      # the delegate claimed no node of it: then it only read the model in its checks
      # (instrumented: a bad read has a delegate frame), and LiteRT's kernels ran the rest.
      # (LiteRT's out-of-bounds reads on hostile block-wise FCs segfault or not with the
      # memory layout, so some do not repeat in a process of their own.)
      item = st.get("item", start)
      model, _, resize, _ = (open(item, "rb").read(), None, None, None) if replay else \
          make_mutant(item)
      kind = "delegate_crashes"
      if not _ours(report) and (st.get("claimed") == 0 or
                                _crashes_without_delegate(model, resize, env, tmp)):
        kind = "runtime_crashes"
      total[kind] += 1
      total["mutants"] += 1
      log(f"{kind[:-2]} on {item}: rc {r.returncode}\n{report[-3000:]}")
      _save(save, item, kind[:-2], replay)
      if replay:
        break  # a replay crash: report it (the files are few; rerun after fixing)
      start = item + 1
      # the batch's remaining items rerun from the next one
  total["seconds"] = round(time.time() - t0, 1)
  return total


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mutants", type=int, default=200)
  p.add_argument("--seed", type=int, default=0, help="first mutant's seed")
  p.add_argument("--save", help="folder for the models that crashed")
  p.add_argument("--replay", help="run the .tflite files of this folder instead")
  p.add_argument("--batch", type=int, default=250, help="mutants per child process")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--state", help=argparse.SUPPRESS)
  p.add_argument("--plain", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return _child(args)
  counts = fuzz(args.mutants, args.seed, args.save, args.batch, args.replay)
  print(json.dumps(counts))
  sys.exit(1 if counts["delegate_crashes"] or counts.get("wrote_constant") else 0)


if __name__ == "__main__":
  main()
