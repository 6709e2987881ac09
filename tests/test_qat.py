"""Fake quantization: forward on the exporter's grid, straight-through gradients, extraction."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilemoe_jax.quant import grid, qat


def weight(shape=(3, 64, 16), seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * 0.1


@pytest.mark.parametrize('scheme', ['int4_g32', 'int4_channel', 'int8_channel'])
def test_forward_equals_dequantized_integers(scheme):
  w = weight()
  fq = jax.jit(lambda w: qat.fake_quant(w, scheme))(w)
  q, s = qat.extract(w, scheme)
  np.testing.assert_array_equal(fq, grid.dequantize(np.asarray(q), np.asarray(s), -2))
  # ... and the same integers the exporter computes with numpy
  q_np, s_np = grid.quantize(np.asarray(w), scheme, -2)
  np.testing.assert_array_equal(q, q_np)
  np.testing.assert_array_equal(s, s_np)


def test_extracted_int4_in_range_and_round_trip_exact():
  w = weight((64, 32)) * 30
  q, s = qat.extract(w, 'int4_g32')
  q, s = np.asarray(q), np.asarray(s)
  assert q.min() >= -8 and q.max() <= 7 and q.dtype == np.int8
  assert (s > 0).all() and np.isfinite(s).all()
  q2, s2 = grid.quantize(grid.dequantize(q, s, -2), 'int4_g32', -2)
  np.testing.assert_array_equal(q2, q)   # dequantized weights re-quantize to themselves


def test_ste_passes_inside_and_blocks_outside_clip_range():
  w = weight((32, 4))
  scale = qat.init_scale(w, 'int4_g32') * 0.25      # a small scale: many weights clip
  g = jax.grad(lambda w: jnp.sum(qat.fake_quant(w, 'int4_g32', scale) * 3.0))(w)
  x = np.asarray(w) / np.asarray(qat.round_scale(scale, 'int4_g32'))
  inside = (x >= -8.5) & (x <= 7.5)
  assert inside.any() and (~inside).any()
  np.testing.assert_array_equal(np.asarray(g), np.where(inside, 3.0, 0.0))
  # max-abs scales never clip: the gradient is the identity everywhere
  g = jax.grad(lambda w: jnp.sum(qat.fake_quant(w, 'int4_g32')))(w)
  np.testing.assert_array_equal(g, np.ones_like(g))


def test_learnable_scale_gets_lsq_gradient():
  w = weight((32, 4))
  scale = qat.init_scale(w, 'int4_g32')
  g = jax.grad(lambda s: jnp.sum(qat.fake_quant(w, 'int4_g32', s)), argnums=0)(scale)
  x = np.asarray(w) / np.asarray(qat.round_scale(scale, 'int4_g32'))
  expect = (np.round(x) - x).sum(0, keepdims=True) / np.sqrt(32 * 7)
  np.testing.assert_allclose(g, expect, rtol=1e-4, atol=1e-6)
  # extraction with the learned scale reproduces the forward exactly (channel-wise scales
  # are fp32, unrounded: the forward must use the parameter's exact value)
  for scheme in ('int4_g32', 'int4_channel', 'int8_channel'):
    learned = qat.init_scale(w, scheme) * 1.3
    fq = jax.jit(lambda w, s: qat.fake_quant(w, scheme, s))(w, learned)
    q, s = qat.extract(w, scheme, learned)
    np.testing.assert_array_equal(fq, grid.dequantize(np.asarray(q), np.asarray(s), -2))
    if scheme.endswith('channel'):
      np.testing.assert_array_equal(s, learned)


def test_bad_scheme_and_group_fail_clearly():
  with pytest.raises(ValueError, match='unknown quantization scheme'):
    qat.fake_quant(weight(), 'int3')
  with pytest.raises(ValueError, match='does not divide'):
    qat.fake_quant(weight((3, 48, 16)), 'int4_g32')


# ------------------------------------------------------------------ the whole model

from flax import nnx  # noqa: E402

from configs import tiny  # noqa: E402
from mobilemoe_jax.model import Transformer  # noqa: E402
from mobilemoe_jax.model.layers import QuantScale  # noqa: E402
from mobilemoe_jax.quant.extract import dequantized_state, integer_weights  # noqa: E402


def _models(kind, learnable=False, router=False):
  cfg = tiny.get_config(kind).model
  cfg.n_layers = 2
  cfg.quant.update(dict(weights='int4_g32', learnable_scale=learnable, router=router))
  fq = Transformer(cfg, rngs=nnx.Rngs(0))
  plain_cfg = tiny.get_config(kind).model
  plain_cfg.n_layers = 2
  return fq, Transformer(plain_cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('kind, learnable, router', [('moe', False, False), ('dense', False, False),
                                                     ('moe', True, True)])
def test_model_forward_equals_dequantized_integer_model(kind, learnable, router):
  fq, plain = _models(kind, learnable, router)
  x = jax.random.randint(jax.random.key(1), (2, 12), 0, 2048)
  float_logits = plain(x)[0]
  if learnable:   # move the scales off their max-abs init so the learned ones are really used
    scales = nnx.state(fq, QuantScale)
    nnx.update(fq, jax.tree.map(lambda s: s * 1.1, scales))
  ints = integer_weights(fq)
  for e in ints.values():
    assert int(e['q'].min()) >= -8 and int(e['q'].max()) <= 7
    assert bool(jnp.all(e['scales'] > 0)) and bool(jnp.all(jnp.isfinite(e['scales'])))
  names = {p[-1] for p in ints}
  assert {'q', 'k', 'v', 'o', 'gate', 'up', 'down', 'embed'} <= names
  assert ('router' in names) == router
  # the float model with every weight replaced by its dequantized integers ...
  state = nnx.state(plain, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  for path, w in dequantized_state(fq).items():
    flat[path].set_value(w)
  nnx.update(plain, nnx.from_flat_state(flat))
  # ... computes exactly what the fake-quant forward computes
  np.testing.assert_array_equal(fq(x)[0], plain(x)[0])
  assert not np.allclose(fq(x)[0], float_logits, atol=1e-4)     # and quantization did act


def test_init_scales_from_loaded_weights_equal_max_abs_scales():
  """Scales of an LSQ model whose weights were replaced (a loaded float checkpoint) restart
  at exactly the grid's max-abs scales of the new weights."""
  cfg = tiny.get_config('moe').model
  cfg.update(dict(n_layers=2, vocab_size=64, d_model=64))
  plain = Transformer(cfg, rngs=nnx.Rngs(7))                  # the "checkpoint": other weights
  cfg.quant.update(dict(weights='int4_g32', learnable_scale=True, router=True))
  lsq = Transformer(cfg, rngs=nnx.Rngs(0))
  nnx.update(lsq, nnx.state(plain, nnx.Param))
  qat.init_scales_from_weights(lsq)
  n = 0
  for path, e in integer_weights(lsq).items():
    if path == ('embed',):
      continue                                                 # no learned scale there
    w = np.asarray(e['q'], np.float32)                         # shape only
    mat = dict(nnx.to_flat_state(nnx.state(plain)))[path][...]
    mat = np.asarray(mat).reshape(w.shape)
    np.testing.assert_array_equal(e['scales'], grid.scales(mat, 'int4_g32', in_axis=-2))
    n += 1
  assert n >= 12    # q, k, v, o, dense and expert gate/up/down, shared, router


@pytest.mark.slow
def test_lsq_qat_trains_from_a_float_checkpoint(data_dir, tmp_path):
  """train.init_from a float checkpoint with learned scales: the run starts the scales from
  the loaded weights (not the random init) and trains them."""
  from configs.stages import qat as qat_stage
  from mobilemoe_jax.train.loading import load_checkpoint
  from mobilemoe_jax.train import train_and_evaluate
  from tests.support.train import make_config
  # Another seed than the QAT run's: its random-init scales would be far from these weights.
  float_run = train_and_evaluate(make_config(data_dir, **{
      'train.steps': 2, 'train.seed': 1, 'train.eval_batches': 0}), str(tmp_path / 'float'))
  config = make_config(data_dir, qat_stage, **{
      'train.steps': 3, 'model.quant.learnable_scale': True, 'train.lr': 1e-5,
      'train.eval_batches': 0,
      'train.init_from': str(tmp_path / 'float' / 'checkpoints')})
  summary = train_and_evaluate(config, str(tmp_path / 'lsq'))
  assert np.isfinite(summary['loss_end'])
  loaded = load_checkpoint(float_run['checkpoint']).model
  lsq = load_checkpoint(summary['checkpoint']).model
  flat = lambda m: {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, QuantScale))}
  random_init = Transformer(config.model, rngs=nnx.Rngs(0))
  init = flat(random_init)
  nnx.update(random_init, nnx.state(loaded, nnx.Param))      # the float weights, no scales
  start, trained = flat(qat.init_scales_from_weights(random_init)), flat(lsq)
  for path in trained:
    a, b, c = trained[path], start[path], init[path]
    assert not np.array_equal(a, b), path                    # the scales trained ...
    assert np.abs(a / b - 1).max() < 0.05, path              # ... from the loaded weights' max-abs
    assert np.abs(c / b - 1).max() > 0.2, path               # (not from the random init)



# ------------------------------------------------------------------ int8 KV cache


def test_int8_kv_cache_decode_equals_full_forward():
  """With model.quant.kv_cache='int8' the decode cache really holds int8 (+ a scale per token
  and head), and prefill + decode computes what the full forward computes under the same
  fake quantization of K and V."""
  from mobilemoe_jax.config import ConfigError
  from mobilemoe_jax.model.generate import decode_step, prefill
  from mobilemoe_jax.model.transformer import init_cache
  cfg = tiny.get_config('moe').model
  cfg.update(dict(n_layers=2, vocab_size=64, d_model=64, dtype='float32', sliding_window=8))
  float_model = Transformer(cfg, rngs=nnx.Rngs(0))
  cfg = cfg.copy_and_resolve_references()        # (the float model keeps its own config)
  cfg.quant.kv_cache = 'int8'
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  x = jax.random.randint(jax.random.key(2), (2, 14), 0, 64)
  full = model(x)[0]
  assert np.abs(full - float_model(x)[0]).max() > 1e-3        # the grid acts on K and V
  cache = init_cache(cfg, 2, 16, jnp.float32)
  assert cache['layers'][0]['k'].dtype == jnp.int8 and cache['layers'][0]['k_scale'].shape == (2, 16, 2, 1)
  first, cache = prefill(model, x[:, :5], jnp.full((2,), 5), cache)
  steps = [first]
  for t in range(5, 13):                                       # past the window of 8
    out, cache = decode_step(model, x[:, t], cache)
    steps.append(out)
  np.testing.assert_allclose(jnp.stack(steps, 1), full[:, 4:13], atol=2e-5, rtol=0)
  k = np.asarray(cache['layers'][1]['k'])
  assert np.abs(k).max() == 127 and k.dtype == np.int8         # each row's max maps to 127
  # training sees the same values with a straight-through (identity) gradient
  kx = jax.random.normal(jax.random.key(3), (2, 5, 2, 16))
  c = jax.random.normal(jax.random.key(4), kx.shape)
  g = jax.grad(lambda a: jnp.sum(qat.fake_quant_kv(a, cfg.quant) * c))(kx)
  np.testing.assert_array_equal(g, c)
  cfg.quant.kv_cache = 'int4'
  with pytest.raises(ConfigError, match='model.quant.kv_cache'):
    Transformer(cfg, rngs=nnx.Rngs(0))
