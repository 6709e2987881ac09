"""MobileMoE-M as designed here before the release: 0.61B active / 2.64B total parameters.

Not the released model (configs/mobilemoe_m.py); see configs/prerelease/__init__.py.

d_model 1024 and 24 layers; 64 experts of 512 with top-8 plus one shared expert of 512
(k/E = 1/8), first layer dense. Same vocabulary and attention layout as MobileLLM-Pro.

  python -m mobilemoe_jax.info --config=configs/prerelease/mobilemoe_m.py
"""
from mobilemoe_jax.config import experiment
from configs.prerelease.mobilemoe_s import moe_model


def get_config():
  return experiment(moe_model(
      d_model=1024, n_layers=24, n_heads=16, d_ff=4096,
      moe=dict(n_experts=64, top_k=8, d_expert=512, n_shared=1, d_shared=512)))
