"""Where export's weights come from: a PyTorch export dir, a training checkpoint (Orbax),
or an in-memory nnx model. Every path ends in an export.torch_model.MobileMoE.
"""
import os

from export import torch_model


def load_any(checkpoint: str, config: str | None = None):
  """checkpoint: a dir written by torch_model.save (config.json + model.safetensors), or an
  Orbax training checkpoint (`<workdir>/checkpoints[/<step>]`, mobilemoe_jax/train).
  config: `configs/x.py:arg` to check against (Orbax checkpoints carry their config)."""
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f'--checkpoint {checkpoint}: no such file or directory')
  if os.path.exists(os.path.join(checkpoint, 'config.json')):
    model = torch_model.load(checkpoint)
    if config:
      want = torch_model.config_dict(load_config(config).model)
      if want != model.cfg:
        diff = sorted(k for k in want if want[k] != model.cfg.get(k))
        raise torch_model.ConfigMismatch(
            f'{checkpoint}/config.json differs from --config {config} in {diff}')
    return model
  return from_orbax(checkpoint, config)


def load_config(spec: str):
  """'configs/tiny.py:moe' -> the ConfigDict its get_config returns."""
  import importlib.util
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise FileNotFoundError(f'--config {spec}: {path} does not exist')
  spec_ = importlib.util.spec_from_file_location('_export_config', path)
  mod = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def from_orbax(path: str, config: str | None = None):
  """Params (+ the expert-bias state) of a training checkpoint -> MobileMoE."""
  import jax
  import ml_collections
  from flax import nnx
  from mobilemoe_jax.model import Transformer
  try:
    from mobilemoe_jax.train import checkpoint as ckpt_lib
  except ImportError as e:
    raise FileNotFoundError(f'{path} has no config.json, and reading Orbax training checkpoints '
                            f'needs mobilemoe_jax.train ({e})') from e
  directory, step = ckpt_lib.resolve(path)
  if config:
    cfg = load_config(config)
  else:
    import orbax.checkpoint as ocp
    meta = ocp.CheckpointManager(directory, item_handlers={'meta': ocp.JsonCheckpointHandler()}) \
        .restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    cfg = ml_collections.ConfigDict({'model': meta['config']['model']})
  # Fields added to the schema after the checkpoint was written take their defaults.
  from mobilemoe_jax import config as config_lib
  model_cfg = config_lib.model_config()
  model_cfg.update(cfg.model.to_dict() if hasattr(cfg.model, 'to_dict') else cfg.model)
  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  target = {'params': params, 'rest': rest}
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
  loaded, _, _ = ckpt_lib.load_for_init(path, target, shardings, ('params', 'rest'))
  model = nnx.merge(graphdef, loaded['params'], loaded['rest'])
  return torch_model.from_flax(model, model_cfg)
