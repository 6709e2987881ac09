"""The MobileKvAttention op's PyTorch reference (export/attention_op.py) against the portable
attention path of export.torch_model, and the names that decide whether a file needs the
delegate. The exported op and the delegate running it: tests/test_export_litert.py."""
import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('litert_torch')

from export import attention_op, moe_op, runner
from export import torch_model as tm

P = 24   # cache slots


def attention(h, kv, window, kv_int8=False, dh=8, d=32, seed=0):
  cfg = {'d_model': d, 'n_heads': h, 'n_kv_heads': kv, 'head_dim': dh,
         'quant': {'kv_cache': 'int8' if kv_int8 else None}}
  torch.manual_seed(seed)
  return tm.Attention(cfg, window).eval()


def inputs(att, t, pos0, seed=1):
  """x [1, T, D], positions, cos/sin, and a cache whose every slot holds finite values
  (slots >= pos0 too: they must be ignored)."""
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(1, t, att.q.in_features, generator=g)
  pos = torch.arange(pos0, pos0 + t, dtype=torch.int32)
  cos, sin = tm.rope_tables(att.dh, P + 16, 10_000.0)
  cache = (torch.randn(1, att.kv, P, att.dh, generator=g) * 2,
           torch.randn(1, att.kv, att.dh, P, generator=g))
  return x, pos, cos[pos], sin[pos], cache


@pytest.mark.parametrize('h,kv', [(12, 4), (20, 4), (4, 4)])
@pytest.mark.parametrize('window', [0, 5])
@pytest.mark.parametrize('t', [1, 3, 12])
def test_op_reference_equals_portable_attention(h, kv, window, t):
  """Attention with lowering 'delegate' (the op computes y) == the portable path, for
  positions from 0 to the cache's end; the returned rows are the same tensors."""
  att = attention(h, kv, window)
  for pos0 in (0, 1, 6, 13, P - t):
    x, pos, cos, sin, cache = inputs(att, t, pos0)
    with torch.no_grad():
      att.lowering = 'portable'
      want, want_kv = att(x, pos, cos, sin, cache)
      att.lowering = 'delegate'
      got, got_kv = att(x, pos, cos, sin, cache)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-6, rtol=0)
    for a, b in zip(got_kv, want_kv):
      np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_op_with_int8_cache_and_without_the_lowering_conditions():
  """int8 KV cache: the op reads the qdq'd new rows (what the layer returns). Without a
  cache the portable path runs (the op is not called); with one, any number of tokens
  (decode and prefill chunks) calls it."""
  att = attention(8, 2, 0, kv_int8=True)
  x, pos, cos, sin, cache = inputs(att, 3, 10)
  with torch.no_grad():
    att.lowering = 'portable'
    want = att(x, pos, cos, sin, cache)[0]
    att.lowering = 'delegate'
    np.testing.assert_allclose(att(x, pos, cos, sin, cache)[0].numpy(), want.numpy(),
                               atol=2e-6, rtol=0)
  calls = []
  real = attention_op.kv_attention
  attention_op.kv_attention = lambda *a: calls.append(a) or real(*a)
  try:
    with torch.no_grad():
      att(x, pos, cos, sin)                                   # no cache
      assert not calls
      for t in (1, 20):                                       # decode, a prefill chunk
        x, pos, cos, sin, cache = inputs(att, t, 0)
        att(x, pos, cos, sin, cache)
      assert len(calls) == 2
  finally:
    attention_op.kv_attention = real


def test_op_reference_equals_the_delegates_numpy_reference():
  """The two readings of the contract agree (export/delegate's fp64 numpy reference, once
  it has one)."""
  from export import delegate as dl
  ref = getattr(dl, 'reference_kv_attention', None)
  if ref is None:
    pytest.skip('export/delegate has no reference_kv_attention')
  rng = np.random.default_rng(0)
  h, kv, dh, t = 6, 2, 8, 3
  for window, pos0 in ((0, 0), (0, 9), (4, 9), (4, P - t)):
    opts = attention_op.options(h, kv, dh, window)
    args = [rng.standard_normal(s).astype(np.float32) for s in
            ((1, t, h, dh), (1, t, kv, dh), (1, t, kv, dh), (1, kv, P, dh), (1, kv, dh, P))]
    pos = np.arange(pos0, pos0 + t, dtype=np.int32)
    got = attention_op.kv_attention(*map(torch.from_numpy, args), torch.from_numpy(pos),
                                    json.dumps(opts)).numpy()
    np.testing.assert_allclose(got, ref(*args, pos, opts), atol=1e-5, rtol=0)


def test_options_and_names():
  assert attention_op.options(12, 4, 64, 512) == {
      'num_heads': 12, 'num_kv_heads': 4, 'head_dim': 64, 'window': 512, 'scale': 0.125}
  # runner keeps the delegate's op names as strings (it does not import the exporter).
  assert runner.DELEGATE_OPS == (moe_op.OP_NAME, attention_op.OP_NAME)
  from configs import tiny
  model = tm.MobileMoE(tm.config_dict(tiny.get_config('dense').model))
  with pytest.raises(ValueError, match="unknown attention lowering 'fast'"):
    model.set_attention_lowering('fast')
  model.set_attention_lowering('delegate')
  assert {b.attn.lowering for b in model.blocks} == {'delegate'}


def test_op_follows_the_delegate_contract():
  # The torch op's tensor arguments are the contract's input slots, in order, and its
  # options are the contract's (all required).
  from export.delegate import contract
  schema = torch.ops.mobilemoe.kv_attention.default._schema
  params = [a.name for a in schema.arguments]
  assert tuple(params[:-1]) == contract.ATTENTION.input_names and params[-1] == 'options'
  assert attention_op.OP_NAME == contract.ATTENTION.name
  assert set(attention_op.options(8, 2, 16, 0)) == {o.key for o in contract.ATTENTION.options}
