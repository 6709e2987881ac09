"""Stage 3, instruction fine-tuning: chat JSONL, loss only on the assistant's tokens.

  python -m mobilemoe_jax.train --config=configs/stages/sft.py:tiny --workdir=runs/demo/sft \
      --config.train.init_from=runs/demo/midtrain/checkpoints

The data package's chat template sets loss_mask to 1 on assistant content and the <|end|>
closing each assistant turn, 0 on system/user text; the loss is averaged over those tokens
only. Held-out perplexity is measured on held-out chats, assistant tokens only.
"""
from configs.stages import common


def get_config(arg: str = 'tiny'):
  small = common.is_small(common.parse_arg(arg)[0])
  return common.stage_config(
      'sft', arg,
      steps=200 if small else 5_000,
      lr=5e-4 if small else 5e-5,
      schedule='cosine',
      warmup_steps=10 if small else 100,
      weight_decay=0.0,
      min_lr_ratio=0.1)
