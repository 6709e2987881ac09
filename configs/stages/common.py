"""What every stage config shares: the preset table, the `data` section, and the parsing of
the `:arg` string (the `train` section's schema is mobilemoe_jax/config.py, train_config).

The arg is `PRESET[,key=value...]`: `tiny`, `mobilemoe_s`, `tiny,data_dir=/tmp/data`.
Known keys: data_dir (where `python -m mobilemoe_jax.data.build` wrote the bundled data).
"""
import ml_collections

from configs import mobilellm_pro, mobilemoe_l, mobilemoe_m, mobilemoe_s, tiny
from configs.prerelease import mobilemoe_l as prerelease_l
from configs.prerelease import mobilemoe_m as prerelease_m
from configs.prerelease import mobilemoe_s as prerelease_s
from mobilemoe_jax.config import experiment, mesh_config, train_config
from mobilemoe_jax.data import pipeline

# An explicit table, not an import by name: a typo is a KeyError listing the choices.
PRESETS = {
    'tiny': lambda: tiny.get_config('moe'),
    'tiny_dense': lambda: tiny.get_config('dense'),
    'mobilemoe_s': mobilemoe_s.get_config,
    'mobilemoe_m': mobilemoe_m.get_config,
    'mobilemoe_l': mobilemoe_l.get_config,
    'mobilellm_pro': mobilellm_pro.get_config,
    # The shapes designed before the release (configs/prerelease/__init__.py says why kept).
    'prerelease_s': prerelease_s.get_config,
    'prerelease_m': prerelease_m.get_config,
    'prerelease_l': prerelease_l.get_config,
}


def parse_arg(arg: str) -> tuple[str, dict]:
  preset, *pairs = arg.split(',')
  if preset not in PRESETS:
    raise KeyError(f'unknown model preset {preset!r}; choose from {sorted(PRESETS)}')
  opts = {'data_dir': 'data'}
  for pair in pairs:
    key, _, value = pair.partition('=')
    if key not in opts:
      raise KeyError(f'unknown stage option {key!r} in {arg!r}; known: {sorted(opts)}')
    opts[key] = value
  return preset, opts


def is_small(preset: str) -> bool:
  """The CPU demo presets: short stages sized for 2 cores."""
  return preset.startswith('tiny')


def data_config(stage: str, data_dir: str) -> ml_collections.ConfigDict:
  """`train` and `eval` inputs in the data package's schema (mobilemoe_jax/data/pipeline.py)."""
  stage = {'qat': 'sft'}.get(stage, stage)     # QAT trains on the SFT chats
  eval_stage = 'sft_eval' if stage == 'sft' else 'eval'
  return ml_collections.ConfigDict({
      'train': pipeline.bundled_data_config(data_dir, stage),    # sources, weights, tokenizer
      'eval': pipeline.bundled_data_config(data_dir, eval_stage),  # one unshuffled pass
  })


def stage_config(stage: str, arg: str, **train_overrides) -> ml_collections.ConfigDict:
  preset, opts = parse_arg(arg)
  base = PRESETS[preset]()
  return experiment(
      base.model,
      mesh=mesh_config(),
      train=train_config(stage, is_small(preset), **train_overrides),
      data=data_config(stage, opts['data_dir']),
  )
