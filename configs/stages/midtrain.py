"""Stage 2, mid-training: anneal on a higher-quality mixture with the LR decaying to ~0.

  python -m mobilemoe_jax.train --config=configs/stages/midtrain.py:tiny --workdir=runs/demo/midtrain \
      --config.train.init_from=runs/demo/pretrain/checkpoints

Starts from pre-training's final params (train.init_from; the pipeline sets it) with a fresh
optimizer. Mixture (data package, "midtrain"): the corpus through TFDS plus chat transcripts.
"""
from configs.stages import common


def get_config(arg: str = 'tiny'):
  small = common.is_small(common.parse_arg(arg)[0])
  return common.stage_config(
      'midtrain', arg,
      steps=200 if small else 20_000,
      lr=1e-3 if small else 1.5e-4,   # starts below pre-training's peak, ends near zero
      schedule='wsd',
      warmup_steps=10 if small else 200,
      decay_fraction=1.0,             # the whole stage is the decay: an anneal
      min_lr_ratio=0.01)
