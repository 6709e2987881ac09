"""model.attention_impl: validated, and 'auto' is XLA's attention off GPU (the cuDNN path is
checked against XLA on the device: bench/attention_check.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mobilemoe_jax import config as config_lib
from mobilemoe_jax.model import Transformer


def _logits(impl):
  cfg = tiny.get_config().model
  cfg.attention_impl = impl
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  segments = jnp.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4])   # two documents; padding
  positions = jnp.array([list(range(10)) + list(range(6)), list(range(12)) + [0] * 4])
  return np.asarray(model(tokens, positions=positions, segment_ids=segments)[0])


def test_auto_is_xla_attention_off_gpu():
  assert jax.default_backend() != 'gpu'
  np.testing.assert_array_equal(_logits('auto'), _logits('xla'))


def test_unknown_attention_impl_is_refused():
  cfg = tiny.get_config().model
  cfg.attention_impl = 'flash'
  with pytest.raises(config_lib.ConfigError, match='model.attention_impl.*flash'):
    config_lib.validate(cfg)


# ------------------------------------------------- cuDNN attention's mask modes (on CPU)


def _fake_cudnn(monkeypatch, calls):
  """jax.nn.dot_product_attention's cuDNN path as XLA attention (runs on CPU); records at
  run time which call ran and, when traced, whether cuDNN would compute the bias gradient."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  xla = jax.nn.dot_product_attention

  def fake(q, k, v, mask=None, is_causal=False, implementation=None, local_window_size=None):
    assert is_causal and implementation == 'cudnn'
    kind = 'causal' if mask is None else (
        'bias' if cudnn.should_export_dbias(None, None, None) else 'bias_nograd')
    jax.debug.callback(lambda: calls.append(kind))     # at run time, not when traced
    if mask is None:   # what the flags alone mean: causal (and windowed) over the whole row
      t = q.shape[1]
      i = jnp.arange(t)
      mask = (i[None, :] <= i[:, None])
      if local_window_size is not None:
        mask &= (i[:, None] - i[None, :]) <= local_window_size[0]
      mask = mask[None, None]
    return xla(q, k, v, mask=mask)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', fake)


def _xla_attention(q, k, v, mask):
  """Grouped-query softmax attention, written out (the reference)."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, 2), jnp.repeat(v, g, 2)
  s = jnp.einsum('bthd,bshd->bhts', q, k) / q.shape[-1] ** 0.5
  s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, -1)
  p = jnp.where(jnp.isnan(p), 0.0, p)
  return jnp.einsum('bhts,bshd->bthd', p, v)


@pytest.mark.parametrize('window', [0, 6])
def test_cudnn_attention_mask_modes(monkeypatch, window):
  """model.attention_mask with a fake cuDNN: 'auto' runs the flags-only call when every row
  is one document and the bias (no gradient) otherwise; 'bias_nograd' always the bias
  without its gradient; each equals XLA's masked attention on real tokens, and 'causal'
  equals it on single-document rows only."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  from mobilemoe_jax.model import layers
  calls = []
  _fake_cudnn(monkeypatch, calls)
  rng = np.random.default_rng(1)
  b, t = 3, 24
  packed = np.array([[1] * 10 + [2] * 14, [1] * 24, [1] * 5 + [2] * 5 + [3] * 6 + [0] * 8], np.int32)
  single = np.ones((b, t), np.int32)
  q = jnp.asarray(rng.normal(size=(b, t, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, 2, 8)), jnp.float32)
  for seg, want_auto in ((packed, 'bias_nograd'), (single, 'causal')):
    pos = np.zeros_like(seg)
    for r in range(b):
      for d in set(seg[r]) - {0}:
        pos[r, seg[r] == d] = np.arange((seg[r] == d).sum())
    mask = layers.attention_mask(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg),
                                 jnp.asarray(seg), window)
    want = np.asarray(_xla_attention(q, k, v, mask))
    real = (seg > 0)[..., None, None]
    for how, path in (('auto', want_auto), ('bias_nograd', 'bias_nograd'), ('causal', 'causal')):
      calls.clear()
      got = jax.jit(lambda q, k, v, mask, seg: layers.cudnn_attention(q, k, v, mask, seg, window, how))(
          q, k, v, mask, jnp.asarray(seg))
      got = np.asarray(jax.block_until_ready(got))
      assert calls == [path], (how, calls)
      if how == 'causal' and seg is packed:
        assert not np.allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-3)
        continue
      np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-5, atol=1e-5)
  assert cudnn.should_export_dbias(None, None, None), 'the hook is restored after the call'


def _fake_cudnn_packed(monkeypatch, calls):
  """cuDNN's packed-layout call (jax's fused_attention_stablehlo.dot_product_attention with
  seqlens and offsets) as XLA attention, from its documented contract: row b's segment j is
  tokens offsets[b, j] .. + q_seqlen[b, j] (-1: none), causal by token index within it,
  windowed to the last `sliding_window_length` tokens."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  def fake(q, k, v, q_seqlen=None, kv_seqlen=None, q_offsets=None, kv_offsets=None, *,
           scale, mask_type, sliding_window_length=None):
    assert mask_type == cudnn.MaskType.CAUSAL and q_offsets.shape[1] == q_seqlen.shape[1] + 1
    np.testing.assert_allclose(scale, q.shape[-1] ** -0.5)
    jax.debug.callback(lambda: calls.append('segments'))
    i = jnp.arange(q.shape[1])
    start, n = q_offsets[:, None, :-1], q_seqlen[:, None, :]                     # [B, 1, M]
    member = (n > 0) & (i[None, :, None] >= start) & (i[None, :, None] < start + n)  # [B, T, M]
    same = jnp.einsum('btm,bsm->bts', member.astype(jnp.int32), member.astype(jnp.int32)) > 0
    mask = same & (i[None, None, :] <= i[None, :, None])
    if sliding_window_length is not None:
      mask &= (i[None, :, None] - i[None, None, :]) < sliding_window_length
    nan_q = jnp.isnan(q).any((2, 3), keepdims=True)   # NaN scores: NaN out (the reference zeroes them)
    return jnp.where(nan_q, jnp.nan, _xla_attention(q, k, v, mask[:, None]))

  monkeypatch.setattr(cudnn, 'dot_product_attention', fake)


@pytest.mark.parametrize('window', [0, 6])
def test_cudnn_segments_mode(monkeypatch, window):
  """model.attention_mask 'segments' (cuDNN's packed layout, faked from its contract) equals
  XLA's masked attention on real tokens of packed rows; a row with more runs than
  attention_segments gives NaN, not a wrong result."""
  from mobilemoe_jax.model import layers
  calls = []
  _fake_cudnn_packed(monkeypatch, calls)
  rng = np.random.default_rng(2)
  seg = np.array([[1] * 10 + [2] * 14, [1] * 24, [1] * 5 + [2] * 5 + [3] * 6 + [0] * 8,
                  [0] * 3 + [1] * 9 + [2] * 12], np.int32)
  pos = np.zeros_like(seg)
  for r in range(len(seg)):
    for d in set(seg[r]) - {0}:
      pos[r, seg[r] == d] = np.arange((seg[r] == d).sum())
  b, t = seg.shape
  q = jnp.asarray(rng.normal(size=(b, t, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, 2, 8)), jnp.float32)
  mask = layers.attention_mask(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg),
                               jnp.asarray(seg), window)
  want = np.asarray(_xla_attention(q, k, v, mask))
  real = (seg > 0)[..., None, None]
  attend = jax.jit(lambda q, k, v, seg, m: layers.cudnn_attention(q, k, v, None, seg, window,
                                                                   'segments', m), static_argnums=4)
  got = np.asarray(attend(q, k, v, jnp.asarray(seg), 4))
  assert calls == ['segments']
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-5, atol=1e-5)
  got = np.asarray(attend(q, k, v, jnp.asarray(seg), 2))        # rows 2 and 3: 4 and 3 runs
  assert np.isnan(got[2:]).all() and np.isfinite(got[:2]).all()


def test_segment_runs():
  from mobilemoe_jax.model import layers
  seg = jnp.array([[1, 1, 1, 2, 2, 0], [1] * 6, [1, 2, 3, 3, 0, 0]])
  lengths, offsets, overflow = layers.segment_runs(seg, 3)
  np.testing.assert_array_equal(lengths, [[3, 2, 1], [6, -1, -1], [1, 1, 2]])
  np.testing.assert_array_equal(offsets, [[0, 3, 5, -1], [0, -1, -1, -1], [0, 1, 2, -1]])
  np.testing.assert_array_equal(overflow, [False, False, True])


def test_unknown_attention_mask_is_refused():
  cfg = tiny.get_config().model
  cfg.attention_mask = 'packed'
  with pytest.raises(config_lib.ConfigError, match='model.attention_mask.*packed'):
    config_lib.validate(cfg)


def test_step_config_picks_the_mask_on_the_host(monkeypatch):
  """trainer.step_config: with attention_mask 'auto' on cuDNN (faked here) and one process,
  a batch of one-document rows gets the flags-only step and a packed/padded batch the bias
  step; other modes, and XLA attention, keep the config as it is."""
  from mobilemoe_jax.model import layers
  from mobilemoe_jax.train import trainer
  from mobilemoe_jax.config import experiment
  config = experiment(tiny.get_config().model)
  config.model.attention_mask = 'auto'
  single = np.ones((2, 8), np.int32)
  packed = np.array([[1] * 5 + [2] * 3, [1] * 6 + [0] * 2], np.int32)
  assert trainer.step_config(config, single) is config          # CPU: XLA attention
  monkeypatch.setattr(layers, 'attention_kernel', lambda cfg: 'cudnn')
  assert trainer.step_config(config, single).model.attention_mask == 'causal'
  assert trainer.step_config(config, packed).model.attention_mask == 'bias_nograd'
  # With positions, in a model without a sliding window: rows packed as the data pipeline
  # packs them take cuDNN's packed layout, the most runs per row (padding runs count) rounded
  # up to a power of two.
  config.model.sliding_window = 0
  pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 0]], np.int32)
  step = trainer.step_config(config, packed, pos).model
  assert (step.attention_mask, step.attention_segments) == ('segments', 2)
  three = np.array([[1, 2, 2, 3, 3, 3, 3, 0]], np.int32)
  step = trainer.step_config(config, three, np.array([[0, 0, 1, 0, 1, 2, 3, 0]])).model
  assert (step.attention_mask, step.attention_segments) == ('segments', 4)
  # A document in two runs, or positions that do not step by one: the bias.
  split = np.array([[1, 1, 2, 2, 1, 1, 0, 0]], np.int32)
  assert trainer.step_config(config, split, np.array([[0, 1, 0, 1, 2, 3, 0, 0]])
                             ).model.attention_mask == 'bias_nograd'
  assert trainer.step_config(config, packed, pos * 2).model.attention_mask == 'bias_nograd'
  config.model.sliding_window = 4                 # with a window: the bias
  assert trainer.step_config(config, packed, pos).model.attention_mask == 'bias_nograd'
  assert trainer.step_config(config, single, np.tile(np.arange(8), (2, 1))
                             ).model.attention_mask == 'causal'
  assert config.model.attention_mask == 'auto'                    # the original is untouched
  config.model.attention_mask = 'bias_nograd'
  assert trainer.step_config(config, single) is config
