"""Models to evaluate: a training checkpoint (Orbax, mobilemoe_jax/train), or a fresh random init.

A training checkpoint carries its config (the `meta` item), so the model is rebuilt from it and
only `params` + `rest` are read (no optimizer state, no data iterator). The tokenizer is the
one the stage trained with (`config.data.train.tokenizer`) unless a path is given.
"""
import os

import ml_collections
from flax import nnx

from mobilemoe_jax.data.tokenizer import load_tokenizer
from mobilemoe_jax import config as config_lib
from mobilemoe_jax.model import Transformer


def load_model(path: str):
  """`<workdir>/checkpoints` (latest step) or `<workdir>/checkpoints/<step>` -> (model, meta):
  the model its stored config builds, with its params and state (no optimizer, no data)."""
  import jax
  import orbax.checkpoint as ocp

  from mobilemoe_jax.train import checkpoint as ckpt_lib

  directory, step = ckpt_lib.resolve(path)
  meta = ocp.CheckpointManager(directory, item_handlers={'meta': ocp.JsonCheckpointHandler()}) \
      .restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  # Start from today's schema so checkpoints written before a field existed still load.
  model_cfg = config_lib.model_config()
  model_cfg.update(meta['config']['model'])
  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  target = {'params': params, 'rest': rest}
  # Read onto one device; JaxLM places the model on its mesh afterwards.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: one, target)
  loaded, _, _ = ckpt_lib.load_for_init(path, target, shardings, ('params', 'rest'))
  return nnx.merge(graphdef, loaded['params'], loaded['rest']), meta


def load_checkpoint(path: str, tokenizer: str | None = None):
  """`<workdir>/checkpoints` (latest step) or `<workdir>/checkpoints/<step>` -> (model, tokenizer)."""
  model, meta = load_model(path)
  cfg = ml_collections.ConfigDict(meta['config'])
  tok_path = tokenizer or cfg.data.train.tokenizer
  if not os.path.isfile(tok_path):
    raise FileNotFoundError(f'tokenizer {tok_path!r} (from the checkpoint config) not found; '
                            'pass --tokenizer=PATH')
  return model, load_tokenizer(tok_path)


def random_model(config, seed: int = 0):
  """A randomly initialised model of `config.model` (smoke tests; its scores are chance)."""
  return Transformer(config.model, rngs=nnx.Rngs(seed))
