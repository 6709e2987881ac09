"""Chunked cross-entropy (train.loss_chunk_len): the same loss and gradients as the unchunked
loss over full logits, alone, sharded, and inside the train step (float and QAT), with the
gradient from one exp pass (what the trainer uses) and from the softmax pass (the reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.stages import qat
from mobilemoe_jax import sharding
from mobilemoe_jax.config import mesh_config
from mobilemoe_jax.model.transformer import logits as head_logits
from mobilemoe_jax.train import optim, trainer
from mobilemoe_jax.train.loss import chunked_cross_entropy

B, T, D, V = 4, 10, 16, 38


def _inputs(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (B, T, D))
  head = jax.random.normal(k[1], (D, V)) * 0.5
  targets = jax.random.randint(k[2], (B, T), 0, V)
  weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
  return x, head, targets, weights.at[-1, -4:].set(0.0)   # the last row ends in padding


def _reference(x, head, targets, weights):
  ce = optax.softmax_cross_entropy_with_integer_labels(head_logits(x, head), targets)
  return jnp.sum(ce * weights)


@pytest.mark.parametrize('exp_once', [True, False])
@pytest.mark.parametrize('chunk_len', [1, 4, 10, 16])   # 4 leaves a partial last chunk
def test_chunked_ce_matches_full_logits(chunk_len, exp_once):
  x, head, targets, weights = _inputs()
  grad = jax.value_and_grad(lambda f, x, h: f(x, h) / 7.0, argnums=(1, 2))
  want, want_g = grad(lambda x, h: _reference(x, h, targets, weights), x, head)
  got, got_g = jax.jit(lambda x, h: grad(
      lambda x, h: chunked_cross_entropy(x, h, targets, weights, chunk_len, exp_once), x, h))(x, head)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # weight-0 tokens (padding, prompts) get no gradient
  assert not np.any(got_g[0][weights == 0])
  assert np.any(got_g[0][weights == 1])
  # without differentiation (primal only) the same value
  np.testing.assert_allclose(chunked_cross_entropy(x, head, targets, weights, chunk_len, exp_once),
                             want * 7.0, rtol=1e-6)


def test_exp_once_bf16_error_as_softmax_pass():
  """bf16 operands (the training dtype), confident predictions (p_target near 1, where a
  rounded target entry would dominate the gradient): the one-exp gradient is as close to the
  fp32 reference as the softmax-pass gradient, and the two agree."""
  k = jax.random.split(jax.random.key(3), 3)
  b, t, d, v = 4, 24, 32, 300
  head = jax.random.normal(k[1], (d, v)) * 0.3
  targets = jax.random.randint(k[2], (b, t), 0, v)
  toward = head.T[targets] / jnp.linalg.norm(head.T[targets], axis=-1, keepdims=True)
  x = 0.5 * jax.random.normal(k[0], (b, t, d)) + 8.0 * toward
  bf = lambda a: a.astype(jnp.bfloat16)
  x, head = bf(x).astype(jnp.float32), bf(head).astype(jnp.float32)   # exact in bf16
  weights = jnp.ones((b, t)).at[0, :5].set(0.0)
  p_target = jnp.exp(-optax.softmax_cross_entropy_with_integer_labels(
      head_logits(x, head), targets))
  assert float(jnp.median(p_target)) > 0.99     # the regime this test is about
  want = jax.value_and_grad(_reference, argnums=(0, 1))(x, head, targets, weights)
  grad = jax.grad(lambda x, h, **kw: chunked_cross_entropy(x, h, targets, weights, 8, **kw),
                  argnums=(0, 1))
  got, errs = {}, {}
  for exp_once in (True, False):
    loss = chunked_cross_entropy(bf(x), bf(head), targets, weights, 8, exp_once)
    np.testing.assert_allclose(loss, want[0], rtol=2e-2)
    got[exp_once] = [g.astype(jnp.float32) for g in
                     jax.jit(lambda x, h: grad(x, h, exp_once=exp_once))(bf(x), bf(head))]
    errs[exp_once] = [float(jnp.abs(g - w).max() / jnp.abs(w).max())
                      for g, w in zip(got[exp_once], want[1])]
    assert not np.any(np.asarray(got[exp_once][0])[np.asarray(weights) == 0])
  for new, old in zip(errs[True], errs[False]):
    assert new <= 1.5 * old, errs
  for new, old in zip(got[True], got[False]):
    np.testing.assert_allclose(new, old, atol=1e-2 * float(jnp.abs(old).max()))


@pytest.mark.parametrize('exp_once', [True, False])
def test_chunked_ce_sharded_batch(exp_once):
  """Rows split over 4 devices (data=2 x fsdp=2), the head's vocab over 2 (tensor): the
  per-shard partial head gradients add up to the full one."""
  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
  x, head, targets, weights = _inputs(1)
  want = jax.value_and_grad(_reference, argnums=(0, 1))(x, head, targets, weights)
  with jax.set_mesh(mesh):
    f = jax.jit(jax.value_and_grad(lambda *a: chunked_cross_entropy(*a, 4, exp_once),
                                   argnums=(0, 1)))
    got = f(jax.device_put(x, sharding.batch_sharding(mesh, 3)), head, targets, weights)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_chunk_len_must_be_positive():
  with pytest.raises(ValueError, match='chunk_len'):
    chunked_cross_entropy(*_inputs(), 0)


def _step(stage, **overrides):
  """One train step of a one-layer tiny MoE (fp32) on a batch with documents and padding."""
  config = stage.get_config('tiny,data_dir=unused')
  config.update_from_flattened_dict({
      'model.n_layers': 1, 'model.moe.first_dense': 0, 'model.d_model': 32, 'model.d_ff': 64, 'model.vocab_size': 96,
      'model.n_heads': 2, 'model.n_kv_heads': 1, 'model.head_dim': 16,
      'model.moe.n_experts': 4, 'model.moe.d_expert': 32, 'model.moe.d_shared': 32,
      'train.batch_size': 4, 'train.seq_len': 32, **overrides})
  tx, lr = optim.make_optimizer(config.train)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 96, (4, 33), dtype=np.int32)
  seg = np.ones((4, 32), np.int32)
  seg[1, 20:] = 2               # two documents in row 1
  seg[3, 25:] = 0               # padding at the end of row 3
  pos = np.where(seg[1] == 2, np.arange(32) - 20, np.arange(32))
  positions = np.stack([np.arange(32), pos, np.arange(32), np.arange(32)]).astype(np.int32)
  mask = (seg > 0).astype(np.float32)
  mask[2, :10] = 0.0            # a prompt: no loss
  batch = {'inputs': ids[:, :-1], 'targets': ids[:, 1:], 'positions': positions,
           'segment_ids': seg, 'loss_mask': mask}
  state = jax.jit(trainer.make_init_fn(config, tx))()
  state, m = jax.jit(trainer.make_train_step(config, tx, lr))(state, batch)
  return float(m['loss']), float(m['grad_norm']), state['params']


def test_train_step_chunked_matches_unchunked():
  """QAT (INT4 table/head, int8 activations; distillation off, which would need full
  logits): loss, gradient norm and updated params as with the unchunked loss."""
  full = _step(qat, **{'train.distill_weight': 0.0})
  chunked = _step(qat, **{'train.distill_weight': 0.0, 'train.loss_chunk_len': 12})  # 12+12+8
  np.testing.assert_allclose(chunked[:2], full[:2], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(chunked[2]), jax.tree.leaves(full[2])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
