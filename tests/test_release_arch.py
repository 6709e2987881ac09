"""The released MobileMoE's architecture in our model: an independent numpy forward written
from the notes' math (shared/notes/mobilemoe_release.md §2) on weights generated in the
release's tensor layout (§3) must give our JAX logits, through convert/layout.py's mapping.

The reference knows nothing of our model: adjacent-pair RoPE on the release's q/k rows,
Llama 3 frequency scaling (Hugging Face's formula), weightless QK-norm after RoPE, sigmoid
scores with a selection-only expert bias, normalised weights x routed_scale on the expert
outputs, an ungated shared expert, the tied head. float64 numpy vs our float32.
"""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.config import model_config
from mobilemoe_jax.convert import layout
from mobilemoe_jax.model import Transformer, init_cache
from tests.support.release import release_like, release_tensors, rms, llama3_inv_freq, rope_adjacent, silu, reference_logits


# ---------------------------------------------------------------------------------------

def our_model(cfg, tensors):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  layout.into_model(model, layout.to_ours(tensors, cfg))
  return model


@nnx.jit
def _forward(model, tokens, positions):
  return model(tokens, positions=positions)[0]


@nnx.jit
def _decode(model, tokens, cache):
  logits, _, cache = model(tokens, cache=cache)
  return logits, cache


def our_logits(model, tokens, positions):
  logits = _forward(model, jnp.asarray(tokens)[None], jnp.asarray(positions)[None])
  return np.asarray(logits[0], np.float64)


TOKENS = np.array([5, 17, 90, 3, 3, 64, 41, 0, 12, 77, 8, 29])
# RoPE sees relative distances only, so the positions are spread out (90 apart): distances
# up to ~1000 turn the pairs Llama 3 scaling slows by tenths of a radian (a wrong scaling or
# pairing moves the logits), while fp32 angles (pos * freq) stay well inside the tolerance
# (at ~6000 their rounding alone costs ~3e-4 in logits).
POSITIONS = 90 * np.arange(len(TOKENS))

VARIANTS = {
    'released': {},
    'nope_layer_and_moe_every_2': {'n_layers': 4, 'nope_layers': (1,), 'moe.every': 2},
    'llama3_smooth_band_top2': {'rope_scaling.high_freq_factor': 4.0, 'moe.top_k': 2,
                                'rope_scaling.factor': 8.0},
    'first_dense_untied_no_qk_norm': {'moe.first_dense': 1, 'tie_embeddings': False,
                                      'qk_norm': False, 'moe.top_k': 4},
}


@pytest.mark.parametrize('name', list(VARIANTS))
def test_logits_equal_the_numpy_reference(name):
  cfg = release_like(**VARIANTS[name])
  tensors = release_tensors(cfg)
  ours = our_logits(our_model(cfg, tensors), TOKENS, POSITIONS)
  ref = reference_logits(tensors, cfg, TOKENS, POSITIONS)
  assert np.abs(ref).max() > 1                        # not a degenerate all-small output
  assert np.abs(ours - ref).max() <= 1e-4


def test_the_reference_comparison_can_fail():
  """Each release-specific piece moves the logits far beyond the 1e-4 tolerance, so the
  agreement above is evidence for every one of them."""
  cfg = release_like()
  tensors = release_tensors(cfg)
  ref = reference_logits(tensors, cfg, TOKENS, POSITIONS)

  def diff(cfg, params):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    layout.into_model(model, params)
    return np.abs(our_logits(model, TOKENS, POSITIONS) - ref).max()

  ours = layout.to_ours(tensors, cfg)
  no_bias = {k: v * 0 if k[-1] == 'expert_bias' else v for k, v in ours.items()}
  assert diff(cfg, no_bias) > 1e-2                        # bias ignored in the selection
  assert diff(cfg, {**ours, **_unpermuted_qk(tensors, cfg)}) > 1e-2   # q/k rows not permuted
  for field, value in (('qk_norm', False), ('rope_scaling.kind', 'none'),
                       ('moe.routed_scale', 1.0), ('moe.score_func', 'softmax')):
    assert diff(release_like(**{field: value}), ours) > 1e-2, field


def _unpermuted_qk(t, cfg):
  """q/k mapped without the RoPE row permutation: the mistake the permutation prevents."""
  d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  out = {}
  for i in range(cfg.n_layers):
    a = f'model.layers.{i}.self_attn.'
    out[('blocks', i, 'attn', 'q')] = t[a + 'q_proj.weight'].T.reshape(d, h, dh)
    out[('blocks', i, 'attn', 'k')] = t[a + 'k_proj.weight'].T.reshape(d, kv, dh)
  return out


def test_expert_bias_changes_the_selection_in_the_test_data():
  cfg = release_like()
  t = release_tensors(cfg)
  h = t['model.embed_tokens.weight'][TOKENS]
  f = 'model.layers.0.feed_forward.'
  s = 1 / (1 + np.exp(-(h @ t[f + 'router.weight'].T)))
  k = cfg.moe.top_k
  plain = np.sort(np.argsort(-s, -1)[:, :k], -1)
  biased = np.sort(np.argsort(-(s + t[f + 'expert_bias']), -1)[:, :k], -1)
  assert (plain != biased).any()


def test_kv_cache_decode_equals_full_forward():
  cfg = release_like(n_layers=4, nope_layers=(2,), **{'moe.every': 2})
  model = our_model(cfg, release_tensors(cfg))
  x = jnp.asarray(TOKENS)[None]
  full = _forward(model, x, jnp.arange(len(TOKENS))[None])
  first, cache = _decode(model, x[:, :5], init_cache(cfg, 1, 16, jnp.float32))
  steps = [first]
  for i in range(5, len(TOKENS)):
    out, cache = _decode(model, x[:, i:i + 1], cache)
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)


# ---------------------------------------------------------------------------------------
# The pieces on their own.

def test_llama3_scaling_divides_pairs_18_to_31_for_the_release():
  from mobilemoe_jax.model.layers import rope_frequencies
  scaling = dict(kind='llama3', factor=16.0, original_max_len=8192, low_freq_factor=1.0,
                 high_freq_factor=1.0)
  plain = np.asarray(rope_frequencies(64, 500_000.0, None))
  scaled = np.asarray(rope_frequencies(64, 500_000.0, scaling))
  assert np.isfinite(scaled).all()
  divided = np.flatnonzero(~np.isclose(scaled, plain, rtol=1e-6))
  np.testing.assert_array_equal(divided, np.arange(18, 32))
  np.testing.assert_allclose(scaled[18:], plain[18:] / 16, rtol=1e-6)
  np.testing.assert_array_equal(scaled[:18], plain[:18])
  # kind 'none' is the unscaled table
  np.testing.assert_array_equal(rope_frequencies(64, 5e5, dict(scaling, kind='none')), plain)


def test_llama3_smooth_band_matches_the_reference_formula():
  from mobilemoe_jax.model.layers import rope_frequencies
  s = dict(kind='llama3', factor=8.0, original_max_len=8192, low_freq_factor=1.0,
           high_freq_factor=4.0)
  ours = np.asarray(rope_frequencies(64, 500_000.0, s))
  ref = llama3_inv_freq(64, 500_000.0, s)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  plain = 1.0 / 500_000.0 ** (np.arange(0, 64, 2) / 64)
  between = (ref < plain * 0.999) & (ref > plain / 8 * 1.001)
  assert between.any()                            # the band is not empty for these factors


def test_qk_norm_is_a_weightless_rms_per_head():
  from mobilemoe_jax.model.layers import rms_normalize
  x = np.random.default_rng(0).standard_normal((2, 3, 4, 16)).astype(np.float32) * 3
  y = np.asarray(rms_normalize(jnp.asarray(x), 1e-5))
  np.testing.assert_allclose(np.mean(y * y, -1), 1.0, rtol=1e-4)
  np.testing.assert_allclose(y, x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5), rtol=1e-5)


def test_nope_layer_ignores_positions_and_has_no_qk_norm():
  # Spreading the positions apart changes every relative distance: a RoPE layer sees it, a
  # NoPE layer (attention without positions) does not.
  near, far = np.arange(len(TOKENS)), 7 * np.arange(len(TOKENS))
  nope = release_like(n_layers=1, nope_layers=(0,))
  model = our_model(nope, release_tensors(nope))
  assert not model.blocks[0].attn.use_rope and model.blocks[0].attn.qk_norm_eps is None
  np.testing.assert_allclose(our_logits(model, TOKENS, near), our_logits(model, TOKENS, far),
                             atol=1e-5)
  rope = release_like(n_layers=1)
  model = our_model(rope, release_tensors(rope))
  assert model.blocks[0].attn.use_rope and model.blocks[0].attn.qk_norm_eps == 1e-5
  assert np.abs(our_logits(model, TOKENS, near) - our_logits(model, TOKENS, far)).max() > 1e-3


@pytest.mark.parametrize('every, first_dense, moe_layers', [
    (1, 0, [0, 1, 2, 3, 4, 5]), (2, 0, [1, 3, 5]), (3, 0, [2, 5]), (2, 2, [3, 5]),
    (1, 1, [1, 2, 3, 4, 5])])
def test_moe_every(every, first_dense, moe_layers):
  cfg = release_like(n_layers=6, **{'moe.every': every, 'moe.first_dense': first_dense})
  assert [i for i in range(6) if config_lib.is_moe_layer(cfg, i)] == moe_layers
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  from mobilemoe_jax.moe.layer import MoE
  assert [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)] == moe_layers
  dense = [b.ffn.gate.shape for b in model.blocks if not isinstance(b.ffn, MoE)]
  assert all(s == (cfg.d_model, cfg.d_ff) for s in dense)


def test_layout_round_trip_and_rope_rows():
  cfg = release_like(n_layers=4, **{'moe.every': 2, 'tie_embeddings': False})
  t = release_tensors(cfg, seed=3)
  back = layout.to_release(layout.to_ours(t, cfg), cfg)
  assert set(back) == set(t)
  for k in t:
    np.testing.assert_array_equal(back[k], t[k], err_msg=k)
  rows = layout.rope_rows(2, 8)
  np.testing.assert_array_equal(rows, [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15])
  np.testing.assert_array_equal(rows[layout.rope_rows_back(2, 8)], np.arange(16))
  # and through a model: into_model then from_model gives the same tensors
  model = our_model(cfg, t)
  again = layout.to_release(layout.from_model(model), cfg)
  for k in t:
    np.testing.assert_array_equal(again[k], t[k], err_msg=k)


def test_tensor_shapes_follow_the_notes():
  """The notes' §3.1 table for S, in float names (qweight [out, in/2] is weight [out, in])."""
  from configs import mobilemoe_s
  cfg = mobilemoe_s.get_config().model
  s = layout.tensor_shapes(cfg)
  assert len(s) == 443 - 1 - 9 * 20           # the 443 QAT tensors less their 181 scales
  p = 'model.layers.7.'
  assert s['model.embed_tokens.weight'] == (128_256, 768)
  assert s[p + 'self_attn.q_proj.weight'] == (768, 768)
  assert s[p + 'self_attn.k_proj.weight'] == (256, 768)
  assert s[p + 'self_attn.o_proj.weight'] == (768, 768)
  assert s[p + 'feed_forward.router.weight'] == (60, 768)
  assert s[p + 'feed_forward.expert_bias'] == (60,)
  assert s[p + 'feed_forward.experts.gate_up_proj'] == (60, 768, 768)
  assert s[p + 'feed_forward.experts.down_proj'] == (60, 384, 768)
  assert s[p + 'feed_forward.shared_expert.gate_proj.weight'] == (1536, 768)
  assert s[p + 'feed_forward.shared_expert.down_proj.weight'] == (768, 1536)


def test_bad_tensors_are_named():
  cfg = release_like()
  t = release_tensors(cfg)
  t.pop('model.layers.1.feed_forward.expert_bias')
  t['model.layers.0.self_attn.q_proj.weight'] = t['model.layers.0.self_attn.q_proj.weight'][:-1]
  t['model.layers.0.feed_forward.gate_proj.weight'] = np.zeros((48, 64), np.float32)
  with pytest.raises(ValueError) as e:
    layout.to_ours(t, cfg, source='snap/model.safetensors')
  msg = str(e.value)
  assert 'snap/model.safetensors' in msg and 'model.layers.1.feed_forward.expert_bias' in msg
  assert 'model.layers.0.self_attn.q_proj.weight: (63, 64) (expected (64, 64))' in msg
  assert 'unexpected' in msg and 'model.layers.0.feed_forward.gate_proj.weight' in msg


@pytest.mark.parametrize('kw', [{}, {'n_layers': 4, 'moe.every': 2, 'tie_embeddings': False},
                                {'moe.expert_bias': False, 'moe.first_dense': 1}])
def test_accounting_equals_the_parameter_tree(kw):
  from mobilemoe_jax.scaling import accounting
  cfg = release_like(**kw)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  from mobilemoe_jax.moe.layer import ExpertBias
  state = nnx.state(model, nnx.Any(nnx.Param, ExpertBias))
  tree = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state))
  assert accounting.count(cfg).total_params == tree
  # and the release layout holds the same numbers
  assert sum(math.prod(s) for s in layout.tensor_shapes(cfg).values()) == tree


def test_released_s_forward_traces_at_full_size():
  """MobileMoE-S itself (1.26B parameters) through the forward pass, abstractly (shapes only,
  nothing materialised): every layer MoE, QK-norm, Llama 3 RoPE at head_dim 64."""
  import jax
  from configs import mobilemoe_s
  cfg = mobilemoe_s.get_config().model
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)

  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)[:2]

  logits, stats = jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, 16), jnp.int32))
  assert logits.shape == (1, 16, 128_256)
  assert stats['tokens_per_expert'].shape == (20, 60)       # 20 MoE layers of 60 experts
