"""The delegate's MobileKvAttention op (attention over the filled KV-cache slots, decode
steps and prefill chunks) against its numpy reference, on hand-made one-op models."""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from export import delegate as dl
from export.delegate import contract
from export.delegate import tflite_builder as tb
from tests.support.delegate import assert_close, attn_opts, inputs


def run(model, feeds, delegate, num_threads=2):
  it = Interpreter(model_content=model, experimental_delegates=[delegate], num_threads=num_threads)
  it.allocate_tensors()
  for d, x in zip(it.get_input_details(), feeds):
    it.set_tensor(d["index"], x)
  it.invoke()
  return it.get_tensor(it.get_output_details()[0]["index"])


@pytest.mark.parametrize("H,K,Dh,T,P,pos0,window", [
    (12, 4, 64, 1, 64, 33, 0),      # MobileMoE-S decode shape, short context
    (20, 4, 64, 1, 1024, 700, 512),  # MobileLLM-Pro heads, windowed layer past the window
    (20, 4, 64, 1, 1024, 1000, 0),   # long context: the pool runs it
    (4, 4, 16, 3, 32, 5, 4),        # several new tokens, a window inside them
    (6, 2, 8, 2, 16, 0, 0),         # empty cache: only the new tokens
    (6, 2, 8, 1, 16, 16, 3),        # cache full, window of 3
    (12, 4, 64, 128, 1024, 0, 0),   # MobileMoE-S prefill-128 into an empty cache
    (20, 4, 64, 96, 256, 100, 64),  # a prefill chunk after earlier ones, window inside it
])
def test_kv_attention_matches_reference(H, K, Dh, T, P, pos0, window):
  o = attn_opts(H, K, Dh, window)
  feeds = inputs(np.random.default_rng(pos0 + H), H, K, Dh, T, P, pos0)
  d = dl.load(num_threads=2)
  y = run(tb.kv_attention_model(H, K, Dh, T, P, o), feeds, d)
  assert dl.stats(d)["claimed"] == 1
  ref = dl.reference_kv_attention(*feeds, o)
  assert np.isfinite(y).all()
  assert_close(y, ref, 1e-5)


def test_kv_attention_reads_no_stale_slot_after_reuse():
  # Same interpreter, the context grows step by step (what the runner does): every
  # step equals the reference, with a different number of filled slots each time.
  H, K, Dh, P = 8, 2, 32, 40
  o = attn_opts(H, K, Dh, window=16)
  it = Interpreter(model_content=tb.kv_attention_model(H, K, Dh, 1, P, o),
                   experimental_delegates=[dl.load(num_threads=2)], num_threads=2)
  it.allocate_tensors()
  rng = np.random.default_rng(0)
  for pos0 in (0, 1, 15, 16, 17, 39):
    feeds = inputs(rng, H, K, Dh, 1, P, pos0)
    for det, x in zip(it.get_input_details(), feeds):
      it.set_tensor(det["index"], x)
    it.invoke()
    y = it.get_tensor(it.get_output_details()[0]["index"])
    assert_close(y, dl.reference_kv_attention(*feeds, o), 1e-5)


@pytest.mark.parametrize("change,needle", [
    (dict(H=6, K=4), "multiple of num_kv_heads"),
    (dict(T=contract.ATTENTION.max_tokens + 1), f"the op runs 1..{contract.ATTENTION.max_tokens}"),
    (dict(pos_type=np.float32), "input_pos must be int32"),
    (dict(window=-1), "window"),
])
def test_kv_attention_refused_with_reason(change, needle):
  c = dict(H=8, K=2, Dh=16, T=1, P=8, window=0, pos_type=np.int32)
  c.update(change)
  o = attn_opts(c["H"], c["K"], c["Dh"], c["window"])
  model = tb.kv_attention_model(c["H"], c["K"], c["Dh"], c["T"], c["P"], o, pos_type=c["pos_type"])
  d = dl.load(num_threads=1)
  with pytest.raises(RuntimeError):   # unclaimed: an unresolved custom op
    it = Interpreter(model_content=model, experimental_delegates=[d])
    it.allocate_tensors()
  s = dl.stats(d)
  assert s["claimed"] == 0 and s["refused"] == 1
  assert "MobileKvAttention" in s["messages"] and needle in s["messages"], s["messages"]


@pytest.mark.parametrize("kernel", ["avx2", "scalar"])
def test_kv_attention_matches_reference_other_kernels(kernel):
  # The AVX2 and portable DotRows (the default case above runs the best the CPU has).
  H, K, Dh, T, P, pos0, window = 20, 4, 64, 2, 256, 200, 64
  o = attn_opts(H, K, Dh, window)
  feeds = inputs(np.random.default_rng(7), H, K, Dh, T, P, pos0)
  y = run(tb.kv_attention_model(H, K, Dh, T, P, o), feeds, dl.load(num_threads=2, kernel=kernel))
  assert_close(y, dl.reference_kv_attention(*feeds, o), 1e-5)
