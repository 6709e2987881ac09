"""Tiny models for the CPU demo and the tests (a few M parameters).

  --config=configs/tiny.py          MoE: 8 experts top-2 + 1 shared, first layer dense
  --config=configs/tiny.py:dense    the same model with the MoE off
"""
from mobilemoe_jax.config import experiment, model_config


def get_config(arg: str = 'moe'):
  if arg not in ('moe', 'dense'):
    raise ValueError(f"configs/tiny.py takes 'moe' or 'dense', got {arg!r}")
  m = model_config(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                   head_dim=32, d_ff=384, sliding_window=64, global_every=2, max_seq_len=512,
                   rope_theta=10_000.0, dtype='float32')
  if arg == 'moe':
    m.moe.update(dict(n_experts=8, top_k=2, d_expert=64, n_shared=1, d_shared=64, first_dense=1))
  return experiment(m)
