"""The decoder-only LM (dense or MoE) and its incremental decoding."""
from mobilemoe_jax.model.transformer import Transformer, init_cache, moe_layers
from mobilemoe_jax.model.generate import generate
