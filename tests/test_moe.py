"""Routing invariants and dispatch equivalence (fast paths vs the dense reference)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilemoe_jax.moe import dispatch, routing

N, D, E, F, K = 48, 16, 8, 24, 3


def _problem(seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (N, D))
  logits = jax.random.normal(ks[1], (N, E))
  gate = jax.random.normal(ks[2], (E, D, F)) * 0.3
  up = jax.random.normal(ks[3], (E, D, F)) * 0.3
  down = jax.random.normal(ks[4], (E, F, D)) * 0.3
  return x, logits, gate, up, down


@pytest.mark.parametrize('score_func', ['softmax', 'sigmoid'])
@pytest.mark.parametrize('norm', [True, False])
def test_route_invariants(score_func, norm):
  _, logits, *_ = _problem()
  w, e, scores = routing.route(logits, top_k=K, score_func=score_func, norm_topk_prob=norm,
                               routed_scale=2.5)
  e = np.asarray(e)
  assert all(len(set(row)) == K for row in e), 'k distinct experts per token'
  # the chosen experts are the k best scores
  best = np.argsort(-np.asarray(scores), -1, kind='stable')[:, :K]
  np.testing.assert_array_equal(np.sort(e, -1), np.sort(best, -1))
  if norm:
    np.testing.assert_allclose(np.asarray(w).sum(-1), 2.5, rtol=1e-5)
  else:
    np.testing.assert_allclose(w, 2.5 * np.take_along_axis(np.asarray(scores), e, -1), rtol=1e-6)


def test_bias_moves_selection_not_weights():
  _, logits, *_ = _problem()
  bias = jnp.zeros((E,)).at[5].set(10.0)
  w, e, scores = routing.route(logits, top_k=K, score_func='sigmoid', norm_topk_prob=False,
                               routed_scale=1.0, bias=bias)
  assert (np.asarray(e) == 5).any(-1).all(), 'a large bias forces expert 5 into every top-k'
  np.testing.assert_allclose(w, np.take_along_axis(np.asarray(scores), np.asarray(e), -1))


def test_load_balancing_loss_is_one_when_balanced():
  # every expert chosen equally often with uniform scores -> loss exactly 1
  experts = jnp.arange(E * 2).reshape(E, 2) % E
  scores = jnp.full((E, E), 1.0 / E)
  assert float(routing.load_balancing_loss(scores, experts, E)) == pytest.approx(1.0)
  # all tokens on one expert with all mass there -> E
  skew = jnp.zeros((E, E)).at[:, 0].set(1.0)
  assert float(routing.load_balancing_loss(skew, jnp.zeros((E, 1), jnp.int32), E)) == pytest.approx(E)


@pytest.mark.parametrize('method', ['sorted', 'gather', 'ragged', 'grouped', 'grouped_tile4'])
def test_fast_dispatch_equals_reference(method):
  x, logits, gate, up, down = _problem(1)

  def run(fn, x, gate, up, down):
    w, e, _ = routing.route(logits, top_k=K, score_func='softmax', norm_topk_prob=True,
                            routed_scale=1.0)
    y, dropped = fn(x, w, e, gate, up, down)
    return y, dropped

  fast = {'sorted': dispatch.sorted_capacity, 'gather': dispatch.gather_capacity,
          'ragged': dispatch.ragged, 'grouped': dispatch.grouped,
          # several tiles per expert, most of them padded at the end
          'grouped_tile4': functools.partial(dispatch.grouped, tile=4)}[method]
  y_ref, _ = run(dispatch.dense, x, gate, up, down)
  y, dropped = run(fast, x, gate, up, down)
  assert int(dropped) == 0
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)

  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(run(fn, *a)[0]))
  g_ref = jax.grad(loss(dispatch.dense), argnums=(0, 1, 2, 3))(x, gate, up, down)
  g = jax.grad(loss(fast), argnums=(0, 1, 2, 3))(x, gate, up, down)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)

  # gradients into the routing weights too (the router learns through them)
  w, e, _ = routing.route(logits, top_k=K, score_func='softmax', norm_topk_prob=True,
                          routed_scale=1.0)
  wloss = lambda fn: lambda w: jnp.sum(jnp.sin(fn(x, w, e, gate, up, down)[0]))
  np.testing.assert_allclose(jax.grad(wloss(fast))(w), jax.grad(wloss(dispatch.dense))(w),
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('tile', [1, 4, 5, 128])
def test_group_slots_layout(tile):
  """Every assignment has its own row, in a tile of its expert; rows stay inside the
  static bound even when every expert pads its last tile."""
  for experts in (jnp.asarray(np.random.default_rng(tile).integers(0, E, (N, K)), jnp.int32),
                  jnp.arange(N * K, dtype=jnp.int32).reshape(N, K) % E):   # all E experts hit
    src, dst, tile_expert = dispatch.group_slots(experts, E, tile)
    src, dst, tile_expert = map(np.asarray, (src, dst, tile_expert))
    flat = np.asarray(experts).reshape(-1)
    assert len(set(dst.reshape(-1).tolist())) == N * K
    np.testing.assert_array_equal(src[dst.reshape(-1)], np.arange(N * K))
    np.testing.assert_array_equal(tile_expert[dst.reshape(-1) // tile], flat)
    assert (src == N * K).sum() == len(src) - N * K                         # the rest is padding
    assert len(src) == tile * (-(-N * K // tile) + E - 1)


@pytest.mark.parametrize('w_shape', [(D, F), (D, 2, F)])
def test_tile_matmul_grads_equal_autodiff_of_the_gather(w_shape):
  """tile_matmul's backward (per-tile weight gradients summed by a one-hot matmul, weights
  gathered again) equals autodiff of the plain matmul against the gathered weights (whose
  weight gradient is a scatter-add). Experts without tiles get zero gradients."""
  ks = jax.random.split(jax.random.key(5), 3)
  tile_expert = jnp.asarray([0, 0, 2, 3, 3, 3, 5], jnp.int32)             # 1, 4, 6, 7 unused
  x = jax.random.normal(ks[0], (len(tile_expert), 4, D))
  w = jax.random.normal(ks[1], (E, *w_shape))
  ct = jax.random.normal(ks[2], (len(tile_expert), 4, *w_shape[1:]))
  plain = lambda x, w: jnp.einsum('tck,tk...->tc...', x, jnp.take(w, tile_expert, axis=0))
  fast = lambda x, w: dispatch.tile_matmul(x, w, tile_expert)
  np.testing.assert_allclose(fast(x, w), plain(x, w), rtol=1e-6, atol=1e-6)
  loss = lambda fn: lambda x, w: jnp.sum(fn(x, w) * ct)
  for a, b in zip(jax.grad(loss(fast), (0, 1))(x, w), jax.grad(loss(plain), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert not np.asarray(jax.grad(loss(fast), 1)(x, w))[np.array([1, 4, 6, 7])].any()


@pytest.mark.parametrize('backend', ['gpu', 'cpu'])
def test_auto_dispatch_without_capacity(monkeypatch, backend):
  """Dropless 'auto' takes `grouped` on a GPU (not a buffer of all N tokens per expert) and
  `gather` on a CPU; with a capacity, `gather` on both."""
  x, logits, gate, up, down = _problem(4)
  w, e, _ = routing.route(logits, top_k=K, score_func='softmax', norm_topk_prob=True,
                          routed_scale=1.0)
  called = []
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  monkeypatch.setattr(dispatch, 'grouped', lambda *a, **kw: called.append('grouped') or (x, 0))
  monkeypatch.setattr(dispatch, 'gather_capacity',
                      lambda *a, **kw: called.append('gather') or (x, 0))
  dispatch.run_experts(x, w, e, gate, up, down, method='auto', capacity_factor=0.0)
  dispatch.run_experts(x, w, e, gate, up, down, method='auto', capacity_factor=1.25)
  assert called == (['grouped', 'gather'] if backend == 'gpu' else ['gather', 'gather'])


@pytest.mark.parametrize('fn', [dispatch.sorted_capacity, dispatch.gather_capacity])
def test_capacity_drops_are_counted_and_zeroed(fn):
  x, _, gate, up, down = _problem(2)
  experts = jnp.zeros((N, 1), jnp.int32)            # every token wants expert 0
  weights = jnp.ones((N, 1))
  cap = dispatch.capacity(N, 1, E, 1.0)             # N/E rows per expert
  y, dropped = fn(x, weights, experts, gate, up, down, capacity_factor=1.0)
  assert int(dropped) == N - cap
  y_ref, _ = dispatch.dense(x, weights, experts, gate, up, down)
  np.testing.assert_allclose(y[:cap], y_ref[:cap], atol=1e-5)      # earliest tokens kept
  assert np.all(np.asarray(y[cap:]) == 0)                        # dropped tokens get nothing


def test_gather_drops_like_sorted():
  """Same capacity -> the same assignments dropped, the same outputs and gradients."""
  x, logits, gate, up, down = _problem(3)
  w, e, _ = routing.route(logits + jnp.arange(E) * 0.5, top_k=K, score_func='softmax',
                          norm_topk_prob=True, routed_scale=1.0)       # skewed: drops happen
  run = lambda fn: lambda x, w: fn(x, w, e, gate, up, down, capacity_factor=1.0)
  (y_s, d_s), (y_g, d_g) = run(dispatch.sorted_capacity)(x, w), run(dispatch.gather_capacity)(x, w)
  assert int(d_s) == int(d_g) > 0
  np.testing.assert_allclose(y_g, y_s, atol=1e-5, rtol=1e-5)
  loss = lambda fn: lambda x, w: jnp.sum(jnp.sin(run(fn)(x, w)[0]))
  for a, b in zip(jax.grad(loss(dispatch.gather_capacity), (0, 1))(x, w),
                  jax.grad(loss(dispatch.sorted_capacity), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _two_matmuls(x, gate, up, spec):
  """The SwiGLU hidden rows as two separate matmuls: the reference for swiglu_hidden."""
  return jax.nn.silu(jnp.einsum(spec, x, gate)) * jnp.einsum(spec, x, up)


@pytest.mark.parametrize('fn', [dispatch.sorted_capacity, dispatch.gather_capacity])
def test_fused_gate_up_equals_two_matmuls(fn, monkeypatch):
  """swiglu_hidden: one matmul for gate and up (one fewer dot in the program), same outputs
  and gradients as the two separate matmuls."""
  x, logits, gate, up, down = _problem(3)
  w, e, _ = routing.route(logits, top_k=K, score_func='softmax', norm_topk_prob=True,
                          routed_scale=1.0)

  def run(fused):
    def loss(x, gate, up, down):     # a new function each run: jax caches traces per function
      return jnp.sum(jnp.sin(fn(x, w, e, gate, up, down, capacity_factor=1.0)[0]))
    with monkeypatch.context() as m:
      if not fused:
        m.setattr(dispatch, 'swiglu_hidden', _two_matmuls)
      return (str(jax.make_jaxpr(loss)(x, gate, up, down)).count('dot_general'),
              loss(x, gate, up, down), jax.grad(loss, argnums=(0, 1, 2, 3))(x, gate, up, down))

  (dots1, y1, g1), (dots0, y0, g0) = run(True), run(False)
  assert dots1 == dots0 - 1, (dots1, dots0)
  np.testing.assert_allclose(y1, y0, rtol=1e-6)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_fused_gate_up_mlp_equals_unfused(monkeypatch):
  from flax import nnx
  from configs import tiny
  from mobilemoe_jax.model import layers
  cfg = tiny.get_config().model
  cfg.dtype = 'float32'
  x = jax.random.normal(jax.random.key(4), (2, 5, cfg.d_model))
  out = {}
  for fused in (True, False):
    with monkeypatch.context() as m:
      if not fused:
        m.setattr(layers, 'swiglu_hidden', _two_matmuls)
      mlp = layers.MLP(cfg, 24, nnx.Rngs(0))
      out[fused] = (mlp(x), nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(mlp))
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(out[True][1]), jax.tree.leaves(out[False][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_swiglu_keeps_only_the_matmul_output_for_the_backward_pass(capsys):
  """The SwiGLU products are rematerialised: no [.., F] intermediate is kept, only the
  gate/up matmul's [.., 2, F] output (and the inputs)."""
  from jax.ad_checkpoint import print_saved_residuals
  x = jnp.ones((16, 32), jnp.bfloat16)
  gate = up = jnp.ones((32, 24), jnp.bfloat16)
  print_saved_residuals(lambda x: dispatch.swiglu_hidden(x, gate, up, '...d,df->...f')
                        .astype(jnp.float32).sum(), x)
  saved = capsys.readouterr().out.splitlines()
  assert any(line.startswith('bf16[16,2,24]') for line in saved), saved
  assert not any(line.startswith('bf16[16,24]') for line in saved), saved
