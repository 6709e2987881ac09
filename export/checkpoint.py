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
  from mobilemoe_jax.config import load_file
  return load_file(spec)


def from_orbax(path: str, config: str | None = None):
  """Params (+ the expert-bias state) of a training checkpoint -> MobileMoE; with `config`,
  the model is built from that config (its shapes must match the checkpoint's)."""
  from mobilemoe_jax.train.loading import load_checkpoint
  model_cfg = load_config(config).model if config else None
  loaded = load_checkpoint(path, model_config=model_cfg, need_tokenizer=False)
  return torch_model.from_flax(loaded.model, loaded.config.model)
