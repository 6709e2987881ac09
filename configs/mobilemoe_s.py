"""MobileMoE-S as released (facebook/MobileMoE-S-{Base,SFT,QAT}): 272,469,936 active /
1,263,374,256 total parameters.

The released shape, field for field from the checkpoint's config.json (source:
shared/notes/mobilemoe_release.md §1; S read from the real file by third parties): Llama-3
vocabulary (128,256, tied), d_model 768, 20 layers, 12 query heads of 64 and 4 KV heads,
full attention on every layer with RoPE theta 5e5 and Llama-3 frequency scaling (factor 16
from 8192), weightless QK-norm, every layer an MoE of 60 routed experts of 384 (top-4,
sigmoid scores, selection-only expert bias, normalised weights x 2.5) plus one ungated
shared expert of 1536. Dropless (capacity_factor 0): the preset describes the model;
training configs that want a capacity set it (--config.model.moe.capacity_factor=1.25).

  python -m mobilemoe_jax.info --config=configs/mobilemoe_s.py
  python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:mobilemoe_s --workdir=runs/s
"""
from mobilemoe_jax.config import experiment, model_config


def released_model(*, d_model: int, n_layers: int, n_heads: int, d_expert: int, d_shared: int):
  """The released MobileMoE family: what S, M and L share, with their shapes as arguments.
  `d_shared` is config.json's intermediate_size_mlp, also the dense FFN width (d_ff), which
  the release never uses (every layer is MoE)."""
  m = model_config(
      vocab_size=128_256, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=4,
      head_dim=64, d_ff=d_shared, tie_embeddings=True, rope_theta=500_000.0, norm_eps=1e-5,
      max_seq_len=8192, qk_norm=True, sliding_window=0, nope_layers=())
  m.rope_scaling.update(dict(kind='llama3', factor=16.0, original_max_len=8192,
                             low_freq_factor=1.0, high_freq_factor=1.0))
  # Balancing as the paper trained (notes §5, training recipe): the expert bias nudged from
  # the load (aux-loss-free) and the router z-loss, no Switch loss.
  m.moe.update(dict(n_experts=60, top_k=4, d_expert=d_expert, n_shared=1, d_shared=d_shared,
                    first_dense=0, every=1, score_func='sigmoid', norm_topk_prob=True,
                    routed_scale=2.5, expert_bias=True, capacity_factor=0.0, aux_loss_coef=0.0))
  return m


def get_config():
  return experiment(released_model(d_model=768, n_layers=20, n_heads=12, d_expert=384,
                                   d_shared=1536))
