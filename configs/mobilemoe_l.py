"""MobileMoE-L as released (facebook/MobileMoE-L-*): 921,685,120 active / 5,325,704,320 total.

The S family (configs/mobilemoe_s.py) at d_model 1280, 32 layers, 20 query heads, 60 experts
of 640 and a shared expert of 2560. Source: shared/notes/mobilemoe_release.md §1 (the
L-Base model card and the paper's table).

  python -m mobilemoe_jax.info --config=configs/mobilemoe_l.py
  python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:mobilemoe_l --workdir=runs/l
"""
from configs.mobilemoe_s import released_model
from mobilemoe_jax.config import experiment


def get_config():
  return experiment(released_model(d_model=1280, n_layers=32, n_heads=20, d_expert=640,
                                   d_shared=2560))
