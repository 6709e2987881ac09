"""A hostile .tflite must never crash the host: the delegate against models an attacker made.

Targeted cases for each class of bug that was found (resizes after the claim, an output
that is a constant of the model, non-UTF-8 bytes in messages), then the two fuzzers in a
bounded run (export/delegate/README.md, "Hostile models", has the long commands):
- fuzz/options_fuzzer.cc (libFuzzer + ASan/UBSan) over the flexbuffer options parsers,
  with tests/delegate_regressions/options (inputs that crashed earlier parsers) replayed;
- fuzz/models.py's structure-aware mutants of one-op models under ASan/UBSan in child
  processes, and the models in tests/delegate_regressions/models replayed.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from export import delegate as dl
from export.delegate import contract
from export.delegate import tflite_builder as tb
from export.delegate.fuzz import models as model_fuzz
from tests.support.delegate import attn_opts, inputs, opts, weights

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DLG = os.path.dirname(dl.__file__)
_REGRESSIONS = os.path.join(_REPO, "tests", "delegate_regressions")
# Bounded for the normal suite (~60 s of fuzzing in all); raise them for a longer run.
OPTIONS_FUZZ_SECONDS = int(os.environ.get("MOBILEMOE_OPTIONS_FUZZ_SECONDS", "20"))
MODEL_MUTANTS = int(os.environ.get("MOBILEMOE_MODEL_MUTANTS", "500"))


def test_attention_resized_after_claim_is_rechecked():
  H, K, Dh, P = 4, 2, 16, 8
  o = attn_opts(H, K, Dh)
  d = dl.load(num_threads=1)
  it = Interpreter(model_content=tb.kv_attention_model(H, K, Dh, 1, P, o), experimental_delegates=[d])
  assert dl.stats(d)["claimed"] == 1
  q = it.get_input_details()[0]["index"]
  # q alone past the op's token limit (the other inputs still [.., 1, ..]): refused in Prepare.
  it.resize_tensor_input(q, [1, contract.ATTENTION.max_tokens + 1, H, Dh])
  with pytest.raises(RuntimeError, match="longer prefill chunks stay portable"):
    it.allocate_tensors()
  # q with more tokens than k_new / input_pos: refused too.
  it.resize_tensor_input(q, [1, 3, H, Dh])
  with pytest.raises(RuntimeError, match="k_new: expected float32 \\[1,3,2,16\\]"):
    it.allocate_tensors()
  # Every input resized consistently (3 tokens): runs, and matches the reference.
  feeds = inputs(np.random.default_rng(0), H, K, Dh, 3, P, 4)
  for det, x in zip(it.get_input_details(), feeds):
    it.resize_tensor_input(det["index"], x.shape)
  it.allocate_tensors()
  for det, x in zip(it.get_input_details(), feeds):
    it.set_tensor(det["index"], x)
  it.invoke()
  y = it.get_tensor(it.get_output_details()[0]["index"])
  np.testing.assert_allclose(y, dl.reference_kv_attention(*feeds, o), rtol=0, atol=1e-4)


def test_attention_positions_are_checked_at_invoke():
  H, K, Dh, T, P = 4, 2, 16, 2, 8
  it = Interpreter(model_content=tb.kv_attention_model(H, K, Dh, T, P, attn_opts(H, K, Dh)),
                   experimental_delegates=[dl.load(num_threads=1)])
  it.allocate_tensors()
  feeds = inputs(np.random.default_rng(0), H, K, Dh, T, P, 0)
  feeds[-1] = np.array([2**31 - 1, -2**31], np.int32)  # wraps if added in int32
  for det, x in zip(it.get_input_details(), feeds):
    it.set_tensor(det["index"], x)
  with pytest.raises(RuntimeError, match="input_pos must be contiguous"):
    it.invoke()


def test_moe_x_resized_to_another_width_fails_prepare():
  o = opts()
  model = tb.moe_block_model(weights(np.random.default_rng(0), o), o, [2, 256])
  it = Interpreter(model_content=model, experimental_delegates=[dl.load()])
  it.resize_tensor_input(it.get_input_details()[0]["index"], [2, 128])
  with pytest.raises(RuntimeError, match=r"x must be float32 \[\.\.\., d_model=256\], got \[2,128\]"):
    it.allocate_tensors()


def test_output_that_is_a_constant_is_refused():
  o = opts()
  g = tb.GraphBuilder()
  x = g.tensor("x", [2, 256])
  y = tb.add_moe_block(g, x, [2, 256], weights(np.random.default_rng(0), o), o)
  g.tensors[y].buffer = len(g.buffers)       # y's bytes live in the model file
  g.buffers.append(tb.schema.BufferT())
  g.buffers[-1].data = np.zeros(2 * 256 * 4, np.uint8)
  g.inputs, g.outputs = [x], [y]
  d = dl.load()
  with pytest.raises(RuntimeError):
    Interpreter(model_content=g.build(), experimental_delegates=[d]).allocate_tensors()
  assert "output is not writable runtime memory" in dl.stats(d)["messages"]


def test_non_utf8_option_bytes_reach_messages_escaped():
  o = opts(act="silX")
  blob = tb.moe_options_bytes(o).replace(b"silX", b"sil\xff")
  g = tb.GraphBuilder()
  x = g.tensor("x", [1, 256])
  tb.add_moe_block(g, x, [1, 256], weights(np.random.default_rng(0), o), o)
  g.ops[-1].customOptions = list(blob)
  g.inputs, g.outputs = [x], [len(g.tensors) - 1]
  d = dl.load()
  with pytest.raises(RuntimeError):
    Interpreter(model_content=g.build(), experimental_delegates=[d]).allocate_tensors()
  assert "unsupported act 'sil\\xff' (only silu)" in dl.stats(d)["messages"]
  assert dl._text(b"bad \xff byte") == "bad \ufffd byte"  # and Python never fails on one


def _have_libfuzzer():
  """clang++ and its libFuzzer runtime (Debian: clang, libclang-rt-<version>-dev)."""
  if not shutil.which("clang++"):
    return False
  res = subprocess.run(["clang++", "-print-resource-dir"], capture_output=True, text=True).stdout
  return os.path.exists(os.path.join(res.strip(), "lib", "linux",
                                     f"libclang_rt.fuzzer-{os.uname().machine}.a"))


def test_options_parser_fuzzer(require, tmp_path):
  require(_have_libfuzzer(), "clang++ with libFuzzer (clang, libclang-rt-<version>-dev)")
  r = subprocess.run(["make", "-C", _DLG, "fuzz/options_fuzzer"], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr
  fuzzer = os.path.join(_DLG, "fuzz", "options_fuzzer")
  regressions = os.path.join(_REGRESSIONS, "options")
  # The inputs that crashed earlier parsers, one by one, then a bounded coverage-guided run
  # from the seeds (valid options of both ops) and those inputs.
  files = sorted(os.path.join(regressions, f) for f in os.listdir(regressions))
  r = subprocess.run([fuzzer, *files], capture_output=True, text=True, errors="replace")
  assert r.returncode == 0, r.stderr[-3000:]
  # ASan's shadow and quarantine count toward libFuzzer's RSS limit (2 GB by default), which a
  # loaded machine crossed with a 24 MB live heap: the limit here is the machine's, not ours.
  r = subprocess.run([fuzzer, f"-max_total_time={OPTIONS_FUZZ_SECONDS}", "-print_final_stats=1",
                      "-rss_limit_mb=8192",
                      str(tmp_path), os.path.join(_DLG, "fuzz", "seeds"), regressions],
                     capture_output=True, text=True, errors="replace", cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  runs = int(r.stderr.split("stat::number_of_executed_units:")[1].split()[0])
  assert runs > 10000, r.stderr[-2000:]


def _require_asan(require):
  require(model_fuzz._sanitizer_env_ok(), "g++ with AddressSanitizer (libasan)")


def test_model_mutants_do_not_crash_the_delegate(require):
  _require_asan(require)
  counts = model_fuzz.fuzz(MODEL_MUTANTS, seed=int(os.environ.get("MOBILEMOE_MODEL_SEED", "0")),
                           save=None)
  assert counts["mutants"] == MODEL_MUTANTS, counts
  assert counts["delegate_crashes"] == 0 and counts.get("wrote_constant", 0) == 0, counts
  # the mutants reach every stage: refused at the claim, and claimed and invoked
  assert counts.get("refused", 0) > 0 and counts.get("invoked", 0) > 0, counts


def test_regression_models_replayed(require):
  _require_asan(require)
  folder = os.path.join(_REGRESSIONS, "models")
  counts = model_fuzz.fuzz(0, 0, save=None, replay=folder)
  assert counts["mutants"] == len(os.listdir(folder)), counts
  assert counts["delegate_crashes"] == 0 and counts.get("wrote_constant", 0) == 0, counts
