"""MobileMoE-S as designed here before the release: 0.27B active / 1.34B total parameters.

Not the released model (configs/mobilemoe_s.py); see configs/prerelease/__init__.py.

Why this shape. Same tokenizer (tied 202,048 vocab), head size, KV heads and 3:1
local/global attention as MobileLLM-Pro, so on-device comparisons differ only in the
FFN. At ~0.3B active the tied embedding (155M at d_model 768) is half the active
budget, so d_model stays at 768 and the rest goes to depth (16 layers). Fine-grained
experts (64 of hidden 512, top-4, plus one always-on shared expert of 512) give a 5x
total/active ratio at moderate sparsity (k/E = 1/16); the first layer stays dense.
INT4 (group 32) weights: 0.75 GB vs 0.61 GB for MobileLLM-Pro, with 3.9x fewer weight
bytes read and FLOPs per decoded token (`python -m mobilemoe_jax.info`).

  python -m mobilemoe_jax.info --config=configs/prerelease/mobilemoe_s.py
"""
from mobilemoe_jax.config import experiment, model_config


def moe_model(**kw):
  """MobileLLM-Pro's attention and vocabulary with an MoE FFN; shapes from `kw`."""
  moe = kw.pop('moe')
  m = model_config(vocab_size=202_048, n_kv_heads=4, head_dim=64, tie_embeddings=True,
                   sliding_window=512, global_every=4, max_seq_len=8192, **kw)
  m.moe.update(dict(first_dense=1, score_func='softmax', norm_topk_prob=True,
                    capacity_factor=1.25, **moe))
  return m


def get_config():
  return experiment(moe_model(
      d_model=768, n_layers=16, n_heads=12, d_ff=2048,
      moe=dict(n_experts=64, top_k=4, d_expert=512, n_shared=1, d_shared=512)))
