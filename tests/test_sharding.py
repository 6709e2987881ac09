"""Sharding on 8 fake CPU devices: sharded == single-device, and expert parallelism is real."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mobilemoe_jax.config import ConfigError, mesh_config
from mobilemoe_jax.model import Transformer
from mobilemoe_jax.sharding import batch_sharding, make_mesh, shard_model


def cfg():
  c = tiny.get_config('moe').model
  c.n_layers = 3
  return c


def forward(model, x):
  return nnx.jit(lambda m, x: m(x)[0])(model, x)


@pytest.fixture(scope='module')
def reference():
  x = jax.random.randint(jax.random.key(0), (8, 16), 0, 2048)
  model = Transformer(cfg(), rngs=nnx.Rngs(0))
  return x, np.asarray(forward(model, x))


# The first mesh uses every model axis; `make test-fast` checks only it (a compile each).
MESHES = [dict(fsdp=2, expert=2, tensor=2, data=1)] + [
    pytest.param(axes, marks=pytest.mark.slow)
    for axes in (dict(data=1, expert=8), dict(data=2, expert=4), dict(data=8), dict(data=2, fsdp=4))]


@pytest.mark.parametrize('axes', MESHES, ids=lambda a: '-'.join(f'{k}{v}' for k, v in a.items()))
def test_sharded_forward_equals_single_device(reference, axes):
  x, want = reference
  mesh = make_mesh(mesh_config(**axes))
  with jax.set_mesh(mesh):
    model = shard_model(Transformer(cfg(), rngs=nnx.Rngs(0)), mesh)
    got = forward(model, jax.device_put(x, batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_expert_parallelism_is_real():
  mesh = make_mesh(mesh_config(data=1, expert=8))
  x = jax.random.randint(jax.random.key(0), (8, 16), 0, 2048)
  with jax.set_mesh(mesh):
    model = shard_model(Transformer(cfg(), rngs=nnx.Rngs(0)), mesh)
    moe = model.blocks[1].ffn
    # each device holds 1/8 of the experts: one [1, D, F] slice of gate/up/down
    for w in (moe.gate, moe.up, moe.down):
      shards = w[...].addressable_shards
      assert len(shards) == 8 and all(s.data.shape[0] == 1 for s in shards)
      assert len({s.index[0].start for s in shards}) == 8
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    hlo = fn.lower(state, jax.device_put(x, batch_sharding(mesh))).compile().as_text()
  # tokens travel by all-to-all; no expert weight (nor anything else) is gathered
  assert 'all-to-all' in hlo
  assert 'all-gather' not in hlo


def test_mesh_must_match_device_count():
  with pytest.raises(ConfigError, match='mesh'):
    make_mesh(mesh_config(data=3, expert=2))
  with pytest.raises(ConfigError, match='cannot fill'):
    make_mesh(mesh_config(data=-1, expert=3))
  with pytest.raises(ConfigError, match='at most one axis'):
    make_mesh(mesh_config(data=-1, expert=-1))
