"""MobileLLM-Pro, the dense on-device baseline (1.08B params), in its published shape.

30 layers, d_model 1280, SwiGLU FFN 6144, 20 heads of 64 with 4 KV heads, tied 202,048
vocab, local attention (window 512) on three of every four layers (3:1 local/global).
The same model class as MobileMoE with the MoE turned off.

  python -m mobilemoe_jax.info --config=configs/mobilellm_pro.py
"""
from mobilemoe_jax.config import experiment, model_config


def get_config():
  return experiment(model_config(
      vocab_size=202_048, d_model=1280, n_layers=30, n_heads=20, n_kv_heads=4, head_dim=64,
      d_ff=6144, tie_embeddings=True, sliding_window=512, global_every=4, max_seq_len=8192,
      rope_theta=500_000.0))
