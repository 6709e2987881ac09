"""MobileMoE-L as designed here before the release: 0.93B active / 5.31B total parameters.

Not the released model (configs/mobilemoe_l.py); see configs/prerelease/__init__.py.

MobileLLM-Pro's width (d_model 1280, 20 heads) at 28 layers; 72 experts of 640 with
top-6 plus one shared expert of 1280, first layer dense: about as many active
parameters as the dense baseline, 5x the total.

  python -m mobilemoe_jax.info --config=configs/prerelease/mobilemoe_l.py
"""
from mobilemoe_jax.config import experiment
from configs.prerelease.mobilemoe_s import moe_model


def get_config():
  return experiment(moe_model(
      d_model=1280, n_layers=28, n_heads=20, d_ff=6144,
      moe=dict(n_experts=72, top_k=6, d_expert=640, n_shared=1, d_shared=1280)))
