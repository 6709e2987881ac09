"""MobileMoE LiteRT delegate: build, load, and the numpy reference of its op.

The C++ sources in this folder implement the `MobileMoeBlock` and `MobileKvAttention`
custom ops (see README.md; contract.py holds their slots and options). `library_path()`
compiles them on first use, so a fresh clone needs only g++.
"""

from __future__ import annotations

import ctypes
import fcntl
import glob
import os
import subprocess
import threading

import numpy as np

from export.delegate import contract

_DIR = os.path.dirname(os.path.abspath(__file__))
# What the .so is built from (the Makefile's SRCS and HDRS): a newer one triggers a rebuild.
_SOURCES = ("Makefile", "delegate.cc", "abi.h", "flexbuf.h", *sorted(
    os.path.relpath(f, _DIR) for d in ("ops", "kernels")
    for f in glob.glob(os.path.join(_DIR, d, "*.[hc]*"))))
_LIB = {"release": "libmobilemoe_delegate.so", "asan": "libmobilemoe_delegate_asan.so"}
_build_lock = threading.Lock()


# ----------------------------------------------------------------------------
# INT4 packing (same convention as TFLite INT4: low nibble = even index).

def pack_int4(q: np.ndarray) -> np.ndarray:
  """int values in [-8, 7], shape [..., K] (K even) -> uint8 [..., K/2]."""
  q = np.asarray(q)
  if q.shape[-1] % 2:
    raise ValueError(f"last dim must be even, got {q.shape}")
  if q.min(initial=0) < -8 or q.max(initial=0) > 7:
    raise ValueError("int4 values must be in [-8, 7]")
  nib = (q.astype(np.int16) & 0xF).astype(np.uint8)
  return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int | None = None) -> np.ndarray:
  """uint8 [..., K/2] -> int8 [..., K] (optionally checks K == n)."""
  packed = np.asarray(packed, dtype=np.uint8)
  lo = (packed & 0xF).astype(np.int8)
  hi = (packed >> 4).astype(np.int8)
  q = np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], -1)
  q = np.where(q >= 8, q - 16, q).astype(np.int8)
  if n is not None and q.shape[-1] != n:
    raise ValueError(f"unpacked length {q.shape[-1]} != {n}")
  return q


def _group(group_size: int, k: int) -> int:
  """The op's group_size for an input length k: 0 means channel-wise (one group of k)."""
  return group_size or k


def quantize_int4(w: np.ndarray, group_size: int):
  """Symmetric group-wise INT4: w [..., K] -> (packed uint8 [..., K/2], scales [..., K/G]);
  group_size 0: channel-wise, scales [..., 1]."""
  w = np.asarray(w, np.float32)
  g = w.reshape(*w.shape[:-1], -1, _group(group_size, w.shape[-1]))
  s = np.abs(g).max(-1) / 7.0
  s = np.where(s == 0, 1.0, s).astype(np.float32)
  q = np.clip(np.rint(g / s[..., None]), -8, 7).astype(np.int8)
  return pack_int4(q.reshape(w.shape)), s


def dequantize_int4(packed, scales, group_size):
  """Inverse of quantize_int4: W[o, i] = q[o, i] * s[o, i // G] (float32; G = K when
  group_size is 0, channel-wise)."""
  q = unpack_int4(packed).astype(np.float32)
  return q * np.repeat(scales, _group(group_size, q.shape[-1]), axis=-1)


# ----------------------------------------------------------------------------
# Reference math of the op.

WEIGHT_NAMES = contract.MOE.input_names[1:]  # every input slot but x


def _quant_rows_int8(x):
  """Per-row int8 as the delegate's int8 activation mode does: XNNPACK's asymmetric
  grid (grid.quantize_act_int8_asym, the one implementation), dequantised to float32
  the way QAT's grid.fake_quant_act(x, 'int8_dynamic') does."""
  from mobilemoe_jax.quant import grid
  return grid.fake_quant_act(np.asarray(x, np.float32), "int8_dynamic").astype(np.float32)


def route(x, router_w, router_bias, options):
  """x [T, D] -> (chosen [T, k] int, weights [T, k], selection margin [T])."""
  logits = x.astype(np.float64) @ router_w.astype(np.float64).T
  if options.get("score_func", "softmax") == "softmax":
    e = np.exp(logits - logits.max(-1, keepdims=True))
    scores = e / e.sum(-1, keepdims=True)
  else:
    scores = 1.0 / (1.0 + np.exp(-logits))
  k = options["top_k"]
  sel = scores + (0.0 if router_bias is None else router_bias.astype(np.float64))
  # Stable sort of -sel: ties keep the lower index first.
  order = np.argsort(-sel, axis=-1, kind="stable")
  chosen = order[:, :k]
  sorted_sel = np.take_along_axis(sel, order, -1)
  margin = (sorted_sel[:, k - 1] - sorted_sel[:, k] if k < sel.shape[-1]
            else np.full(len(x), np.inf))
  w = np.take_along_axis(scores, chosen, -1)
  if options.get("norm_topk_prob", False):
    w = w / w.sum(-1, keepdims=True)
  return chosen, w * options.get("routed_scale", 1.0), margin


def reference_moe(x, weights: dict, options: dict, activations: str = "fp32"):
  """Numpy reference of MobileMoeBlock. x [..., D] -> y [..., D] (float32).

  weights: dict with the names in WEIGHT_NAMES (shared ones optional).
  options["group_size"] 0 means channel-wise weights (one scale per row).
  activations="int8" mimics the delegate's per-row dynamic int8 rounding of
  the expert inputs (x and the SwiGLU hidden), so int8 mode can be compared
  with a tight tolerance too.
  options["expert_group_axis"] 'out': the routed experts are [E, in, out] with groups
  along out (W^T[i, o] = q[i, o] * s[i, o // G]).
  """
  G = options["group_size"]
  D = options["d_model"]
  shape = np.shape(x)
  x = np.asarray(x, np.float32).reshape(-1, D)
  act = _quant_rows_int8 if activations == "int8" else (lambda a: np.asarray(a, np.float32))
  out = options.get("expert_group_axis", "in") == "out"

  def ffn(xin, gu_q, gu_s, dn_q, dn_s, in_out=False):
    gu_w, dn_w = dequantize_int4(gu_q, gu_s, G), dequantize_int4(dn_q, dn_s, G)
    if in_out:   # [in, out] -> [out, in]
      gu_w, dn_w = gu_w.T, dn_w.T
    f = gu_w.shape[0] // 2
    gu = act(xin).astype(np.float64) @ gu_w.astype(np.float64).T
    g, u = gu[:, :f], gu[:, f:]
    h = g / (1.0 + np.exp(-g)) * u
    return act(h).astype(np.float64) @ dn_w.astype(np.float64).T

  chosen, w, _ = route(x, weights["router_w"], weights.get("router_bias"), options)
  y = np.zeros(x.shape, np.float64)
  for e in np.unique(chosen):
    t, j = np.nonzero(chosen == e)
    y[t] += w[t, j, None] * ffn(x[t], weights["gate_up_q"][e], weights["gate_up_s"][e],
                                weights["down_q"][e], weights["down_s"][e], out)
  if options.get("d_shared", 0):
    y += ffn(x, weights["shared_gate_up_q"], weights["shared_gate_up_s"],
             weights["shared_down_q"], weights["shared_down_s"])
  return y.astype(np.float32).reshape(shape)


def reference_kv_attention(q, k_new, v_new, k_cache, v_cache, pos, options: dict):
  """The MobileKvAttention op in numpy (fp64): q [1,T,H,Dh], k_new / v_new [1,T,K,Dh],
  k_cache [1,K,P,Dh], v_cache [1,K,Dh,P], pos [T] -> y [1,T,H*Dh]. Token t (position
  p_t) sees cache slots s < pos[0] with p_t - s < window (0: no window) and the new
  tokens j with 0 <= p_t - pos[j] < window; query head h reads kv head h // (H/K)."""
  H, K, W = options["num_heads"], options["num_kv_heads"], options["window"]
  T, Dh, P = q.shape[1], q.shape[3], k_cache.shape[2]
  rep, y = H // K, np.zeros((1, T, H * Dh))
  for t in range(T):
    p = int(pos[t])
    d_past = p - np.arange(min(int(pos[0]), P))
    d_new = p - np.asarray(pos[:T])
    see_past = d_past < W if W else np.ones(len(d_past), bool)
    see_new = (d_new >= 0) & ((d_new < W) if W else True)
    for h in range(H):
      g = h // rep
      keys = np.concatenate([k_cache[0, g, :len(d_past)][see_past], k_new[0, :, g][see_new]])
      vals = np.concatenate([v_cache[0, g, :, :len(d_past)].T[see_past], v_new[0, :, g][see_new]])
      s = keys.astype(np.float64) @ q[0, t, h] * options["scale"]
      w = np.exp(s - s.max())
      y[0, t, h * Dh:(h + 1) * Dh] = (w / w.sum()) @ vals
  return y


def random_moe_weights(rng, num_experts, d_model, d_expert, d_shared=0, group_size=32,
                       router_scale=1.0, expert_group_axis="in"):
  """Random INT4 weights with the op's layouts (for tests and benchmarks); group_size 0:
  channel-wise scales [..., rows, 1]; expert_group_axis 'out': routed experts [E, in, out]."""
  E, D, F, Fs, G = num_experts, d_model, d_expert, d_shared, group_size

  def q4(shape_lead, rows, k):
    q = rng.integers(-8, 8, size=(*shape_lead, rows, k), dtype=np.int8)
    s = (rng.random((*shape_lead, rows, k // _group(G, k))) * 0.5 + 0.5) / np.sqrt(k * 10)
    return pack_int4(q), s.astype(np.float32)

  w = {"router_w": (rng.standard_normal((E, D)) * router_scale / np.sqrt(D)).astype(np.float32),
       "router_bias": (rng.standard_normal(E) * 0.01).astype(np.float32)}
  if expert_group_axis == "out":
    w["gate_up_q"], w["gate_up_s"] = q4((E,), D, 2 * F)
    w["down_q"], w["down_s"] = q4((E,), F, D)
  else:
    w["gate_up_q"], w["gate_up_s"] = q4((E,), 2 * F, D)
    w["down_q"], w["down_s"] = q4((E,), D, F)
  if Fs:
    w["shared_gate_up_q"], w["shared_gate_up_s"] = q4((), 2 * Fs, D)
    w["shared_down_q"], w["shared_down_s"] = q4((), D, Fs)
  return w


# ----------------------------------------------------------------------------
# Building and loading the shared library.

def _stale(lib: str) -> bool:
  if not os.path.exists(lib):
    return True
  t = os.path.getmtime(lib)
  return any(os.path.getmtime(os.path.join(_DIR, s)) > t for s in _SOURCES)


def library_path(variant: str = "release") -> str:
  """Path of the delegate .so, (re)built with make/g++ if missing or stale.

  variant: "release" or "asan" (AddressSanitizer + UBSan build; load it only
  in a process started with LD_PRELOAD=$(g++ -print-file-name=libasan.so)).
  """
  lib = os.path.join(_DIR, _LIB[variant])
  # One build at a time, across threads and processes (tests, benchmark children).
  with _build_lock, open(os.path.join(_DIR, ".build.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if _stale(lib):
      r = subprocess.run(["make", "-C", _DIR, _LIB[variant]], capture_output=True, text=True,
                         errors="replace")
      if r.returncode != 0:
        raise RuntimeError(f"building {lib} failed:\n{r.stdout}\n{r.stderr}")
  return lib


def load(num_threads: int | None = None, activations: str = "int8", kernel: str = "auto",
         variant: str | None = None, verbose: bool = False, fully_connected: bool = False,
         profile: bool = False):
  """Returns ai_edge_litert.interpreter.load_delegate(...) for this delegate.

  num_threads: None -> the interpreter's thread count. activations: "int8"
  (dynamic per-row, VNNI) or "fp32". kernel: "auto" (the best SIMD kernels the
  CPU has, AMX tiles included), "avx512" (AVX-512 VNNI without AMX), "avx2" (at most
  AVX2 on x86: tests that path on AVX-512 CPUs) or "scalar" (portable C++).
  variant: "release" or "asan"; None reads $MOBILEMOE_DELEGATE_VARIANT so the
  sanitizer run can reuse the ordinary tests unchanged.
  fully_connected: also claim INT4 FULLY_CONNECTED nodes, channel-wise or block-wise (fp16
  block scales, kept exact), with no bias and no fused activation: a decode step's GEMVs
  then share the delegate's thread pool (README.md).
  profile: time every claimed op and the gaps between partitions (read with profile()).
  """
  from ai_edge_litert.interpreter import load_delegate
  variant = variant or os.environ.get("MOBILEMOE_DELEGATE_VARIANT", "release")
  opts = {"activations": activations, "kernel": kernel, "verbose": int(verbose),
          "fully_connected": int(fully_connected), "profile": int(profile)}
  if num_threads is not None:
    opts["num_threads"] = num_threads
  return load_delegate(library_path(variant), opts)


def _text(b: bytes | None) -> str:
  """A C string from the delegate: messages quote bytes of the model, which may not be UTF-8."""
  return (b or b"").decode("utf-8", errors="replace")


def stats(delegate) -> dict:
  """Counters kept by a loaded delegate: nodes claimed/refused, invokes, messages."""
  lib = ctypes.CDLL(delegate._library._name)
  ptr = ctypes.c_void_p(delegate._get_native_delegate_pointer())
  for name in ("mobilemoe_delegate_claimed", "mobilemoe_delegate_refused",
               "mobilemoe_delegate_invokes"):
    getattr(lib, name).argtypes = [ctypes.c_void_p]
  lib.mobilemoe_delegate_messages.argtypes = [ctypes.c_void_p]
  lib.mobilemoe_delegate_messages.restype = ctypes.c_char_p
  lib.mobilemoe_kernel_isa.restype = ctypes.c_char_p
  lib.mobilemoe_delegate_isa.argtypes = [ctypes.c_void_p]
  lib.mobilemoe_delegate_isa.restype = ctypes.c_char_p
  return {"claimed": lib.mobilemoe_delegate_claimed(ptr),
          "refused": lib.mobilemoe_delegate_refused(ptr),
          "invokes": lib.mobilemoe_delegate_invokes(ptr),
          "messages": _text(lib.mobilemoe_delegate_messages(ptr)),
          "isa": _text(lib.mobilemoe_delegate_isa(ptr)),        # what this delegate runs
          "cpu_isa": _text(lib.mobilemoe_kernel_isa()),         # the best this CPU has
          "sanitized": bool(lib.mobilemoe_sanitized())}


def profile(delegate) -> dict:
  """A delegate loaded with profile=True: {label: (count, total microseconds)}. Labels are
  "<op> [output shape]" for a claimed op's Eval, "outside, <op> -> <op>" for the time
  between the last op of our previous partition and the first of the next (the
  interpreter's other ops in between, or the app between two invokes), and
  "idle (gap > 1 ms)" for longer gaps (the app between invokes)."""
  lib = ctypes.CDLL(delegate._library._name)
  lib.mobilemoe_delegate_profile.argtypes = [ctypes.c_void_p]
  lib.mobilemoe_delegate_profile.restype = ctypes.c_char_p
  text = _text(lib.mobilemoe_delegate_profile(ctypes.c_void_p(delegate._get_native_delegate_pointer())))
  out = {}
  for line in text.splitlines():
    label, count, us = line.split("\t")
    out[label] = (int(count), float(us))
  return out
