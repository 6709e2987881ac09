"""The decoder: causality, packing isolation, KV-cache decoding, generate, parameter counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import mobilellm_pro, mobilemoe_l, mobilemoe_m, mobilemoe_s, tiny
from configs.prerelease import mobilemoe_s as prerelease_s
from mobilemoe_jax.model import Transformer, generate, init_cache
from mobilemoe_jax.moe.layer import ExpertBias
from mobilemoe_jax.scaling import accounting


def small(kind='moe', **kw):
  cfg = tiny.get_config(kind).model
  cfg.update(dict(n_layers=3, sliding_window=5, global_every=2, **kw))
  return cfg


@pytest.fixture(scope='module', params=['moe', 'dense'])
def model(request):
  return Transformer(small(request.param), rngs=nnx.Rngs(0))


@nnx.jit
def run(model, x, positions=None, segment_ids=None):
  return model(x, positions=positions, segment_ids=segment_ids)[:2]


@nnx.jit
def run_cached(model, x, cache):
  logits, _, cache = model(x, cache=cache)
  return logits, cache


def tokens(b=2, t=16, seed=1, vocab=2048):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def test_causality(model):
  x = tokens()
  logits, _ = run(model, x)
  for t in (3, 9):
    changed = x.at[:, t + 1].set((x[:, t + 1] + 7) % 2048)
    logits2, _ = run(model, changed)
    np.testing.assert_array_equal(logits[:, :t + 1], logits2[:, :t + 1])
    assert not np.allclose(logits[:, t + 1:], logits2[:, t + 1:])


def test_packed_documents_do_not_see_each_other(model):
  # row = [doc A (6 tokens) | doc B (10 tokens)]; editing A must not move B's logits
  x = tokens()
  seg = jnp.array([[1] * 6 + [2] * 10] * 2)
  pos = jnp.array([list(range(6)) + list(range(10))] * 2)
  logits, _ = run(model, x, pos, seg)
  edited = x.at[:, 2].set((x[:, 2] + 11) % 2048)
  logits2, _ = run(model, edited, pos, seg)
  np.testing.assert_array_equal(logits[:, 6:], logits2[:, 6:])
  # and doc B alone, at positions 0.., gives the same logits as inside the packed row
  alone, _ = run(model, x[:, 6:])
  np.testing.assert_allclose(alone, logits[:, 6:], atol=1e-5)


@pytest.mark.parametrize('split', [1, 7, 15])
def test_kv_cache_decode_equals_full_forward(model, split):
  x = tokens()
  full, _ = run(model, x)
  cache = init_cache(model.cfg, 2, 20, jnp.float32)
  first, cache = run_cached(model, x[:, :split], cache)
  steps = [first]
  for t in range(split, 16):                       # one token at a time past the window
    out, cache = run_cached(model, x[:, t:t + 1], cache)
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)


def test_generate_greedy_matches_full_forward(model):
  prompt = tokens(t=5)
  out = generate(model, prompt, 6)
  # teacher-forced check on the whole sequence: each new token is the argmax of the
  # full (cache-free) forward at the position before it
  logits, _ = run(model, jnp.concatenate([prompt, out], 1))
  np.testing.assert_array_equal(out, jnp.argmax(logits[:, 4:-1], -1))


def test_generate_with_ragged_prompts(model):
  prompt = tokens(t=6)
  lengths = jnp.array([6, 3])
  out = generate(model, prompt.at[1, 3:].set(0), 4, lengths=lengths)
  alone = generate(model, prompt[1:, :3], 4)
  np.testing.assert_array_equal(out[1:], alone)


def test_sampling_is_seeded_and_in_vocab(model):
  prompt = tokens(t=4)
  a = generate(model, prompt, 5, temperature=1.0, top_k=20, seed=3)
  b = generate(model, prompt, 5, temperature=1.0, top_k=20, seed=3)
  np.testing.assert_array_equal(a, b)
  assert ((np.asarray(a) >= 0) & (np.asarray(a) < 2048)).all()


def test_moe_stats_come_out(model):
  _, stats = run(model, tokens())
  if model.cfg.moe.n_experts:
    tpe = np.asarray(stats['tokens_per_expert'])
    assert tpe.shape == (2, 8)                    # 2 MoE layers (first is dense) x 8 experts
    np.testing.assert_allclose(tpe.sum(-1), 2 * 16 * 2)    # every token routed to k=2
    assert float(stats['aux_loss']) > 0 and float(stats['z_loss']) > 0
  else:
    assert float(stats['aux_loss']) == 0


PRESETS = {'mobilellm_pro': mobilellm_pro.get_config(), 'mobilemoe_s': mobilemoe_s.get_config(),
           'mobilemoe_m': mobilemoe_m.get_config(), 'mobilemoe_l': mobilemoe_l.get_config(),
           'tiny': tiny.get_config('moe'), 'tiny_dense': tiny.get_config('dense'),
           'prerelease_s': prerelease_s.get_config()}


@pytest.mark.parametrize('name', list(PRESETS))
def test_param_count_equals_parameter_tree(name):
  cfg = PRESETS[name].model
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Any(nnx.Param, ExpertBias))   # the bias is a real tensor
  tree_total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  counts = accounting.count(cfg)
  assert counts.total_params == tree_total
  # active = total minus the routed experts a token does not pick, checked on the tree
  routed = sum(int(np.prod(v.get_value().shape)) for path, v in nnx.to_flat_state(params)
               if path[-1] in ('gate', 'up', 'down') and 'shared' not in path and len(v.get_value().shape) == 3)
  m = cfg.moe
  inactive = routed * (m.n_experts - m.top_k) // m.n_experts if m.n_experts else 0
  assert counts.active_params == tree_total - inactive


def test_mobilellm_pro_is_1_08b():
  total = accounting.count(PRESETS['mobilellm_pro'].model).total_params
  assert abs(total / 1.08e9 - 1) < 0.01


def test_rms_norm_keeps_only_its_input_for_the_backward_pass(capsys):
  """rms_norm is rematerialised: autodiff would keep two fp32 copies of x ([.., D] each)."""
  from jax.ad_checkpoint import print_saved_residuals
  from mobilemoe_jax.model.layers import rms_norm
  x, scale = jnp.ones((4, 8, 64), jnp.bfloat16), jnp.ones((64,), jnp.float32)
  for s in (scale, None):
    print_saved_residuals(lambda x: rms_norm(x, s, 1e-5).astype(jnp.float32).sum(), x)
    saved = capsys.readouterr().out.splitlines()
    assert saved and not any(line.startswith('f32[4,8,64]') for line in saved), saved


def test_rope_gradient_is_the_inverse_rotation():
  """rope's hand-written VJP (the rotation by minus the angle) equals autodiff of the
  rotation, also with positions restarting per packed document."""
  from mobilemoe_jax.model import layers
  keys = jax.random.split(jax.random.key(3), 2)
  x = jax.random.normal(keys[0], (2, 12, 3, 16), jnp.bfloat16)
  g = jax.random.normal(keys[1], x.shape, jnp.float32)
  positions = jnp.array([list(range(12)), [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]])
  freq = layers.rope_frequencies(16, 10_000.0)
  loss = lambda f: lambda x: jnp.sum(f(x, positions, freq).astype(jnp.float32) * g)
  np.testing.assert_array_equal(layers.rope(x, positions, freq), layers._rotate(x, positions, freq))
  got, want = jax.grad(loss(layers.rope))(x), jax.grad(loss(layers._rotate))(x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=1e-2, atol=1e-2)
  assert np.abs(np.asarray(got, np.float32)).max() > 0.1


def test_embed_fp32_gradient():
  """transformer.embed on a bf16 table: the rows of table[tokens]; the gradient is the
  scatter-add done in fp32 then rounded once (repeated tokens add up without bf16 rounding
  per add), closer to the exact sum than autodiff of table[tokens], which adds in bf16."""
  from mobilemoe_jax.model import transformer
  k = jax.random.split(jax.random.key(0), 3)
  table = jax.random.normal(k[0], (11, 8)).astype(jnp.bfloat16)
  tokens = jax.random.randint(k[1], (3, 40), 0, 4)          # 120 lookups of 4 rows
  g = jax.random.normal(k[2], (3, 40, 8)).astype(jnp.bfloat16)
  want = np.zeros((11, 8), np.float64)
  np.add.at(want, np.asarray(tokens), np.asarray(g.astype(jnp.float32), np.float64))
  out = {}
  for name, f in (('embed', transformer.embed), ('autodiff', lambda t, i: t[i])):
    y, vjp = jax.vjp(lambda t: f(t, tokens), table)
    np.testing.assert_array_equal(y, table[tokens])
    assert vjp(g)[0].dtype == jnp.bfloat16
    out[name] = np.asarray(vjp(g)[0].astype(jnp.float32), np.float64)
  np.testing.assert_array_equal(
      out['embed'], want.astype(np.float32).astype(jnp.bfloat16).astype(np.float64))
  assert np.abs(out['embed'] - want).max() < np.abs(out['autodiff'] - want).max()
  assert not np.any(out['embed'][4:])
