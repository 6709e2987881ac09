"""The one way to read a training checkpoint back: (model, config, tokenizer).

Eval, export, the pipeline and the benchmarks all load through `load_checkpoint`. A training
checkpoint (Orbax, `<workdir>/checkpoints[/<step>]`) carries its config in the `meta` item,
so the model is rebuilt from it and only `params` + `rest` are read (no optimizer state, no
data iterator). The tokenizer is the one the stage trained with (`config.data.train.tokenizer`)
unless a path is given.
"""
import logging
import os
from typing import NamedTuple

import ml_collections

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.train import checkpoint as ckpt_lib


class Loaded(NamedTuple):
  model: object                          # mobilemoe_jax.model.Transformer
  config: ml_collections.ConfigDict      # the experiment config saved with the checkpoint
  tokenizer: object                      # mobilemoe_jax.data.tokenizer.Tokenizer, or None


def read_meta(path: str) -> dict:
  """The `meta` item saved with a checkpoint: its config, lineage, import record."""
  import orbax.checkpoint as ocp
  directory, step = ckpt_lib.resolve(path)
  try:
    return ocp.CheckpointManager(directory, item_handlers={'meta': ocp.JsonCheckpointHandler()}) \
        .restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # Orbax/JSON errors: say which checkpoint and what
    raise ckpt_lib.CheckpointError(f'checkpoint {directory / str(step)}: cannot read its config '
                                   f'(meta item): {type(e).__name__}: {e}') from e


def read_config(path: str) -> ml_collections.ConfigDict:
  """The experiment config a checkpoint was saved with. Its model section starts from today's
  schema, so checkpoints written before a field existed still load (with the default), and
  retired fields are dropped (config.upgrade_saved_model)."""
  meta = read_meta(path)
  cfg = ml_collections.ConfigDict(meta['config'])
  model = config_lib.model_config()
  model.update(config_lib.upgrade_saved_model(meta['config']['model'], f'checkpoint {path}'))
  cfg.model = model
  return cfg


def tokenizer_path(cfg: ml_collections.ConfigDict) -> str | None:
  """The tokenizer file a checkpoint's stage trained with, if the config names one."""
  return cfg.get('data', {}).get('train', {}).get('tokenizer') or None


def load_checkpoint(path: str, tokenizer: str | None = None, *, model_config=None,
                    need_tokenizer: bool = True, inference: bool = True) -> Loaded:
  """`<workdir>/checkpoints` (latest step) or `<workdir>/checkpoints/<step>` -> Loaded.

  tokenizer: a path overriding the checkpoint's own. model_config: build the model from this
  config instead of the saved one (its parameter shapes must match the checkpoint's). With
  need_tokenizer=False a missing tokenizer file gives `tokenizer=None` instead of an error.

  inference=True (eval, export, generation) runs the MoE dropless: `moe.capacity_factor` is a
  training-throughput setting, and with it a token's output would depend on which other
  tokens share its batch. The saved config keeps the trained value."""
  import jax
  from flax import nnx

  from mobilemoe_jax.data.tokenizer import load_tokenizer
  from mobilemoe_jax.model import Transformer

  cfg = read_config(path)
  if model_config is not None:
    cfg.model = config_lib.model_config()
    cfg.model.update(model_config.to_dict() if hasattr(model_config, 'to_dict') else model_config)
  if inference and cfg.model.moe.capacity_factor:
    logging.info('%s: trained with moe.capacity_factor=%s; loaded dropless for inference',
                 path, cfg.model.moe.capacity_factor)
    cfg.model.moe.capacity_factor = 0.0
  abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  target = {'params': params, 'rest': rest}
  # Read onto one device; callers place the model on their mesh afterwards.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: one, target)
  loaded, _, _ = ckpt_lib.load_for_init(path, target, shardings, ('params', 'rest'))
  model = nnx.merge(graphdef, loaded['params'], loaded['rest'])
  tok_path = tokenizer or tokenizer_path(cfg)
  if tok_path and os.path.exists(tok_path):   # a file, or a snapshot dir with tokenizer.json
    tok = load_tokenizer(tok_path)
  elif need_tokenizer:
    raise FileNotFoundError(f'tokenizer {tok_path!r} (from the checkpoint config) not found; '
                            'pass --tokenizer=PATH')
  else:
    tok = None
  return Loaded(model, cfg, tok)
