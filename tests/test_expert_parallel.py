"""Expert parallelism on 8 fake CPU devices: the chunked all-to-all pipeline computes what
one device computes (outputs, drops, gradients), and its compiled program leaves the
all-to-alls free to overlap the shared expert and the other chunks' expert matmuls."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mobilemoe_jax.config import mesh_config
from mobilemoe_jax.model import Transformer  # noqa: F401  (imports the model before moe.layer)
from mobilemoe_jax.moe import dispatch, routing
from mobilemoe_jax.moe.layer import MoE
from mobilemoe_jax.sharding import make_mesh
from tests.support.hlo import Graph

N, D, E, F, K = 64, 16, 8, 24, 3
MESH = dict(data=2, expert=4)      # tokens in 8 shards, experts in 4 blocks of 2


def _problem(skew):
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (N, D))
  logits = jax.random.normal(ks[1], (N, E)) + skew * jnp.arange(E)   # skew: drops happen
  w, e, _ = routing.route(logits, top_k=K, score_func='softmax', norm_topk_prob=True,
                          routed_scale=1.0)
  gate, up = (jax.random.normal(k, (E, D, F)) * 0.3 for k in ks[2:4])
  down = jax.random.normal(ks[4], (E, F, D)) * 0.3
  return x, w, e, gate, up, down


def _per_shard_reference(x, w, e, gate, up, down, capacity_factor):
  """One device, no mesh: `gather` on each of the 8 token shards in turn (the capacity is
  per shard under expert parallelism: each device fills its own buffer)."""
  ys, dropped = [], 0
  for sl in np.split(np.arange(N), 8):
    y, d = dispatch.gather_capacity(x[sl], w[sl], e[sl], gate, up, down, capacity_factor)
    ys.append(y)
    dropped += d
  return jnp.concatenate(ys), dropped


def _loss_and_grads(fn):
  """sum(sin(y)) and its gradients in x, the routing weights and the three expert weights."""
  def loss(x, w, gate, up, down, e):
    y, dropped = fn(x, w, e, gate, up, down)
    return jnp.sum(jnp.sin(y)), (y, dropped)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


# `make test-fast` runs the case with drops; dropless EP also trains in test_train_sharding.py.
@pytest.mark.parametrize('capacity_factor,skew', [
    pytest.param(0.0, 0.0, marks=pytest.mark.slow), (1.0, 0.5)], ids=['dropless', 'capacity-drops'])
def test_chunked_expert_parallel_equals_one_device(capacity_factor, skew):
  x, w, e, gate, up, down = _problem(skew)
  args = (x, w, gate, up, down, e)
  (_, (y_ref, d_ref)), g_ref = _loss_and_grads(
      lambda *a: _per_shard_reference(*a, capacity_factor))(*args)
  assert (int(d_ref) > 0) == (capacity_factor > 0)
  n_local = N // 8
  cap = dispatch.capacity(n_local, K, E, capacity_factor)
  with jax.set_mesh(make_mesh(mesh_config(**MESH))):
    assert dispatch.can_expert_parallel(N, E)
    # 1: the buffer whole; 2 and 3 slices, uneven where they do not divide C (3 or 8 rows)
    for chunks in (1, 2, 3):
      assert len(dispatch.chunk_bounds(cap, chunks)) == chunks
      (_, (y, d)), g = _loss_and_grads(lambda x, w, e, gate, up, down: dispatch.expert_parallel(
          x, w, e, gate, up, down, capacity_factor, chunks=chunks))(*args)
      assert int(d) == int(d_ref), chunks
      np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5, err_msg=f'chunks={chunks}')
      for name, a, b in zip(('x', 'weights', 'gate', 'up', 'down'), g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f'd {name}, chunks={chunks}')


def test_chunk_bounds_cover_the_capacity_once():
  for cap in (1, 2, 5, 24):
    for chunks in (1, 2, 3, 8):
      b = dispatch.chunk_bounds(cap, chunks)
      assert b[0][0] == 0 and b[-1][1] == cap and len(b) == min(chunks, cap)
      assert all(hi > lo for lo, hi in b) and all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
      assert max(hi - lo for lo, hi in b) - min(hi - lo for lo, hi in b) <= 1


@functools.cache
def _moe_program(chunks, grad):
  """The compiled MoE layer (routed experts + one shared expert) on the 8-device mesh: its
  forward, or forward and backward."""
  cfg = tiny.get_config('moe').model
  cfg.moe.n_shared, cfg.moe.ep_overlap_chunks = 1, chunks
  with jax.set_mesh(make_mesh(mesh_config(**MESH))):
    graphdef, state = nnx.split(MoE(cfg, nnx.Rngs(0)))
    x = jnp.ones((8, 16, cfg.d_model))
    fwd = lambda s, x: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(x)[0]))
    fn = jax.jit(jax.grad(fwd, argnums=(0, 1)) if grad else fwd)
    return Graph(fn.lower(state, x).compile().as_text())


@pytest.mark.parametrize('grad', [False, True], ids=['forward', 'forward+backward'])
def test_shared_expert_is_independent_of_every_all_to_all(grad):
  """Each all-to-all (dispatch and return, forward and backward) has shared-expert matmuls
  that neither feed it nor read its result: XLA may run them while the all-to-all is in
  flight (on GPU, between the all-to-all-start and -done its async collectives become)."""
  g = _moe_program(2, grad)
  a2a, shared = g.find('all-to-all'), g.matmuls('shared_expert')
  assert len(a2a) == (8 if grad else 4) and shared        # 2 chunks x (send, return)
  for a in a2a:
    assert any(g.independent(a, s) for s in shared), a
  assert any(a in g.ancestors(r) for a in a2a for r in g.find(scope='routed_experts'))


@pytest.mark.parametrize('grad', [False, True], ids=['forward', 'forward+backward'])
def test_chunks_let_all_to_alls_overlap_expert_matmuls(grad):
  """With 2 chunks every all-to-all has an expert matmul (another chunk's) independent of it;
  with the buffer whole, the forward's dispatch feeds every one of them."""
  for chunks, want in ((2, True), (1, False)):
    g = _moe_program(chunks, grad)
    routed = g.matmuls('expert_matmuls')           # not the combine's small einsums
    assert routed
    free = [any(g.independent(a, r) for r in routed) for a in g.find('all-to-all')]
    assert len(free) == (4 if grad else 2) * chunks and all(free) == want, (chunks, free)


def test_slice_count_is_no_config_change_on_resume():
  """ep_overlap_chunks changes no result: a checkpoint written before the field, or with
  another count, resumes without train.allow_config_change; a real change still stops."""
  from mobilemoe_jax.train import checkpoint
  model = lambda **moe: {'model': {'moe': {'n_experts': 8, **moe}}}
  assert checkpoint.config_differences(model(), model(ep_overlap_chunks=2)) == []
  assert checkpoint.config_differences(model(ep_overlap_chunks=1), model(ep_overlap_chunks=4)) == []
  assert checkpoint.config_differences(model(), model(n_experts=16))
