"""Stage 1, pre-training: next-token prediction on the corpus, warmup-stable-decay LR.

  python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:tiny --workdir=runs/demo/pretrain
  python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:mobilemoe_s \
      --workdir=gs://BUCKET/mobilemoe_s/pretrain --config.data.train.sources=...

The arg is `PRESET[,data_dir=DIR]` (see configs/stages/common.py). WSD keeps the LR flat
until the last `decay_fraction` of the steps, so the run can be extended or branched from
any stable-phase checkpoint; mid-training then anneals from the final one.
"""
from configs.stages import common


def get_config(arg: str = 'tiny'):
  small = common.is_small(common.parse_arg(arg)[0])
  return common.stage_config(
      'pretrain', arg,
      steps=600 if small else 100_000,
      schedule='wsd',
      decay_fraction=0.2)
