"""Training: the loop (`train_and_evaluate`), optimizer, checkpoints and metrics.

  python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:tiny --workdir=runs/pretrain
"""
from mobilemoe_jax.train.checkpoint import CheckpointCorrupt, CheckpointError
from mobilemoe_jax.train.trainer import NonFiniteError, stage_summary, train_and_evaluate
