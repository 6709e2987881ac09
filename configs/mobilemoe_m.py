"""MobileMoE-M as released (facebook/MobileMoE-M-*): 528,300,568 active / 2,818,390,552 total.

The S family (configs/mobilemoe_s.py) at d_model 1024, 26 layers, 16 query heads, 60 experts
of 512 and a shared expert of 2048. Source: shared/notes/mobilemoe_release.md §1; d_model,
layers and heads from the paper's table, the expert widths inferred there and confirmed by
the published parameter counts, which this config reproduces exactly.

  python -m mobilemoe_jax.info --config=configs/mobilemoe_m.py
  python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:mobilemoe_m --workdir=runs/m
"""
from configs.mobilemoe_s import released_model
from mobilemoe_jax.config import experiment


def get_config():
  return experiment(released_model(d_model=1024, n_layers=26, n_heads=16, d_expert=512,
                                   d_shared=2048))
