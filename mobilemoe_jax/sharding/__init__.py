"""Device mesh and logical-axis rules (MaxText style).

Layers tag every parameter with logical axis names (`axes=('embed', 'mlp')`) and
constrain activations with `constrain(x, ('batch', 'length', 'embed'))`; they never
see the mesh. This module maps logical names to the mesh axes
('data', 'fsdp', 'expert', 'tensor') with one table, RULES.

The mesh is ambient: the trainer enters `with jax.set_mesh(mesh):` and everything
below reads it with `jax.sharding.get_abstract_mesh()`. With no mesh set (a plain
CPU test) every constraint is a no-op, so the same model runs on 1 or N devices.
"""
import logging

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx

from mobilemoe_jax.config import validate_mesh

AXES = ('data', 'fsdp', 'expert', 'tensor')

# logical name -> mesh axes it is split over (in order). Tokens are split over every
# axis that is not model-parallel over them, so 'expert' doubles as data parallelism
# outside the MoE layers.
RULES = {
    'batch': ('data', 'fsdp', 'expert'),
    'length': (),
    'embed': ('fsdp',),            # parameters: FSDP shards the d_model dim
    'act_embed': (),               # activations keep d_model whole
    'vocab': ('tensor',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'head_dim': (),
    'mlp': ('tensor',),
    'expert': ('expert',),
    'expert_mlp': ('tensor',),
    'norm': (),
}

_warned = set()


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp', 'expert', 'tensor') mesh; fails if it does not fit the devices."""
  devices = jax.devices() if devices is None else devices
  sizes = validate_mesh(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  dev = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(dev, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def logical_to_spec(names, shape=None, mesh=None) -> P:
  """PartitionSpec for logical `names`; a mesh axis that does not divide its dim is dropped
  (replicated) with one warning, so small test models still run on big meshes."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None and mesh.axis_names else {}
  used, spec = set(), []
  for i, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in RULES:
      raise KeyError(f'logical axis {name!r} has no sharding rule; known: {sorted(RULES)}')
    axes = [a for a in RULES[name] if sizes.get(a, 1) > 1 and a not in used]
    if shape is not None and axes:
      total = int(np.prod([sizes[a] for a in axes]))
      if shape[i] % total:
        key = (name, shape[i], total)
        if key not in _warned:
          _warned.add(key)
          logging.warning('logical axis %r (dim %d) not divisible by mesh axes %s: replicated',
                          name, shape[i], axes)
        axes = []
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def constrain(x, names):
  """with_sharding_constraint by logical names under the ambient mesh (no-op without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or not mesh.axis_names or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def state_specs(state, mesh):
  """PartitionSpec tree for an nnx State whose Variables carry `axes` metadata."""
  def spec(v):
    axes = v.get_metadata().get('axes') if isinstance(v, nnx.Variable) else None
    if axes is None:
      return P()
    return logical_to_spec(axes, v.get_value().shape, mesh)
  return jax.tree.map(spec, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def state_shardings(state, mesh):
  """NamedSharding tree for an nnx State (see state_specs)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, mesh),
                      is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, length, ...] input array."""
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1), mesh=mesh))


def shard_model(model, mesh):
  """Places an nnx model's variables on `mesh` by their logical axes (in place)."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
  return model
