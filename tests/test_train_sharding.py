"""The train step on an 8-device mesh (data=2, expert=2, tensor=2: experts and FFNs split,
expert-parallel all-to-all dispatch) computes what it computes on one device."""
import jax
import numpy as np

from mobilemoe_jax import config as config_lib
from mobilemoe_jax import sharding
from mobilemoe_jax.data import pipeline
from mobilemoe_jax.train import optim, trainer
from tests.support.train import make_config


def _run(config, mesh, batches):
  tx, lr = optim.make_optimizer(config.train)
  with jax.set_mesh(mesh):
    init = trainer.make_init_fn(config, tx)
    state_sharding = sharding.state_shardings(jax.eval_shape(init), mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    state = jax.jit(init, out_shardings=state_sharding)()
    step = jax.jit(trainer.make_train_step(config, tx, lr),
                   in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None))
    out = []
    for batch in batches:
      state, m = step(state, jax.device_put(batch, batch_sharding))
      out.append((float(m['loss']), float(m['grad_norm']), float(m['aux_loss'])))
    gate = state['params']['blocks'][1]['ffn']['gate']
    return out, gate[...].sharding.spec, np.asarray(jax.device_get(gate[...]))


def test_sharded_step_matches_one_device(data_dir):
  config = make_config(data_dir, **{'model.moe.capacity_factor': 0.0})  # dropless on both
  it = iter(pipeline.make_dataset(config.data.train, seq_len=32, batch_size=8, seed=0))
  batches = [next(it) for _ in range(3)]
  one = sharding.make_mesh(config_lib.mesh_config(data=1), devices=jax.devices()[:1])
  eight = sharding.make_mesh(config_lib.mesh_config(data=2, expert=2, tensor=2))
  ref, _, ref_gate = _run(config, one, batches)
  got, spec, gate = _run(config, eight, batches)
  assert spec == jax.sharding.PartitionSpec('expert', None, 'tensor')  # really split
  np.testing.assert_allclose(got, ref, rtol=2e-5)
  np.testing.assert_allclose(gate, ref_gate, rtol=1e-4, atol=1e-6)
