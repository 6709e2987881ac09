"""The MobileMoE decoder. One model for every shape: with `moe.n_experts == 0` it is the
dense baseline (MobileLLM-Pro), otherwise layers from `moe.first_dense` on use MoE FFNs
(every `moe.every`-th layer; the others a dense SwiGLU of width d_ff)."""
import jax
import jax.numpy as jnp
from flax import nnx

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.model.layers import (MLP, Attention, QuantScale, RMSNorm, act, add_quant_scale,
                                        kernel, param)
from mobilemoe_jax.moe.layer import MoE
from mobilemoe_jax.quant import qat
from mobilemoe_jax.sharding import constrain


class Block(nnx.Module):
  def __init__(self, cfg, layer: int, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    window = 0 if config_lib.is_global_layer(cfg, layer) else cfg.sliding_window
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.attn = Attention(cfg, window, rngs, use_rope=config_lib.is_rope_layer(cfg, layer))
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.ffn = MoE(cfg, rngs) if config_lib.is_moe_layer(cfg, layer) else MLP(cfg, cfg.d_ff, rngs)

  def __call__(self, x, positions, segment_ids, cache=None):
    h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
    x = x + h
    stats = None
    if isinstance(self.ffn, MoE):
      h, stats = self.ffn(self.ffn_norm(x), valid=segment_ids != 0)
    else:
      h = self.ffn(self.ffn_norm(x))
    x = constrain(x + h, ('batch', 'length', 'act_embed'))
    return x, cache, stats


class Transformer(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    config_lib.validate(cfg)
    pd = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), cfg.init_std, pd)
    self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.head = None if cfg.tie_embeddings else param(
        rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg.init_std, pd)
    if self.head is not None:
      add_quant_scale(self, 'head', cfg.quant)
    if cfg.quant.weights is not None and cfg.quant.learnable_scale and \
        cfg.quant.get('learnable_embedding_scale', False):
      # The table's learned scales [D/G, V], on the transposed table as `table` quantizes it.
      self.embed_scale = QuantScale(qat.init_scale(
          self.embed[...].T, cfg.quant.embedding, rule=qat.weight_grid(cfg.quant)['rule']), axes=None)

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, *,
               return_hidden=False):
    """tokens: [B, T] int. Returns (logits [B, T, V] fp32, stats, new_cache).

    return_hidden=True returns ((hidden [B, T, D], head [D, V]), stats, new_cache) instead of
    logits: the LM head's two operands as `head_operands` makes them, so that
    `logits(hidden, head)` is the logits; the trainer's chunked cross-entropy uses them to
    never hold all [B, T, V] logits at once.

    Training passes packed rows with positions/segment_ids (see data/); decoding passes
    a cache from `init_cache` and positions are the cache slots.
    stats: {'aux_loss', 'z_loss'} summed over MoE layers, 'tokens_per_expert' [L_moe, E],
    'dropped' (assignments over capacity).
    """
    b, t = tokens.shape
    dt = jnp.dtype(self.cfg.dtype)
    if cache is not None:
      positions = cache['end'][:, None] + jnp.arange(t)[None]
      segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = jnp.arange(t)[None].repeat(b, 0)
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    table = self.table(dt)                                                     # [V, D]
    x = embed(table, tokens)
    x = constrain(x, ('batch', 'length', 'act_embed'))
    moe_stats, new_layers = [], []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else dict(cache['layers'][i], end=cache['end'])
      if self.cfg.remat and cache is None:
        x, _, stats = nnx.remat(lambda blk, *a: blk(*a))(block, x, positions, segment_ids)
      else:
        x, layer_cache, stats = block(x, positions, segment_ids, layer_cache)
      if layer_cache is not None:
        new_layers.append({n: a for n, a in layer_cache.items() if n != 'end'})
      if stats is not None:
        moe_stats.append(stats)
    operands = self.head_operands(self.final_norm(x), table)
    new_cache = None if cache is None else {'layers': new_layers, 'end': cache['end'] + t}
    return (operands if return_hidden else logits(*operands)), summarize(moe_stats), new_cache

  def head_operands(self, x, table):
    """The LM head's inputs: the final-normed hidden states on the activation grid
    (model.quant.activations; identity otherwise) and the head [D, V] in the compute dtype
    (the tied table, already fake-quantized under QAT, or the untied `head`)."""
    head = table.T if self.head is None else kernel(self, 'head', self.cfg.quant, table.dtype)
    return act(x, self.cfg.quant), head

  def table(self, dtype):
    """The embedding table [V, D]; under QAT on its own grid, groups along D (the input
    dim of the tied head, so the gather and the head share one quantized tensor)."""
    q = self.cfg.quant
    if q.weights is None:
      return self.embed[...].astype(dtype)
    scale = getattr(self, 'embed_scale', None)
    return qat.fake_quant(self.embed[...].T, q.embedding, None if scale is None else scale[...],
                          **qat.weight_grid(q)).T.astype(dtype)


def embed(table, tokens):
  """table[tokens]: [V, D], [B, T] int -> [B, T, D]. Its gradient's scatter-add runs in fp32
  and is rounded to the table's dtype once: autodiff of the lookup would add in the table's
  dtype (bf16 when training) and round every add, and a frequent token's row takes hundreds
  of adds per micro-batch."""
  if table.dtype == jnp.float32:
    return table[tokens]
  return _embed_fp32_grad(table, tokens)


@jax.custom_vjp
def _embed_fp32_grad(table, tokens):
  return table[tokens]


def _embed_fwd(table, tokens):
  return table[tokens], (tokens, jnp.zeros((0,), table.dtype), table.shape[0])


def _embed_bwd(res, g):
  tokens, like, n = res
  d = jnp.zeros((n, g.shape[-1]), jnp.float32).at[tokens].add(g.astype(jnp.float32))
  return d.astype(like.dtype), None


_embed_fp32_grad.defvjp(_embed_fwd, _embed_bwd)


def logits(x, head):
  """The LM head: [..., D] @ [D, V] in the compute dtype, returned as fp32 [..., V]."""
  out = (x @ head).astype(jnp.float32)
  return constrain(out, ('batch', 'length', 'vocab')) if out.ndim == 3 else out


def summarize(moe_stats):
  """Stacks per-layer MoE stats; zeros for a dense model so callers need no branch."""
  if not moe_stats:
    return {'aux_loss': jnp.zeros(()), 'z_loss': jnp.zeros(()), 'dropped': jnp.zeros((), jnp.int32),
            'tokens_per_expert': jnp.zeros((0, 0))}
  return {
      'aux_loss': sum(s['aux_loss'] for s in moe_stats),
      'z_loss': sum(s['z_loss'] for s in moe_stats),
      'dropped': sum(s['dropped'] for s in moe_stats),
      'tokens_per_expert': jnp.stack([s['tokens_per_expert'] for s in moe_stats]),
  }


def init_cache(cfg, batch: int, max_len: int, dtype=jnp.bfloat16):
  """An empty KV cache: per layer k/v [B, S, K, Dh] in `dtype` and the filled length per row.
  With model.quant.kv_cache='int8', k/v are int8 and each token and head has a float32 scale
  ('k_scale', 'v_scale' [B, S, K, 1]); `dtype` is then unused."""
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  if cfg.quant.get('kv_cache') == 'int8':
    layer = lambda: {'k': jnp.zeros(shape, jnp.int8), 'k_scale': jnp.zeros(shape[:-1] + (1,)),
                     'v': jnp.zeros(shape, jnp.int8), 'v_scale': jnp.zeros(shape[:-1] + (1,))}
  else:
    layer = lambda: {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
  return {'layers': [layer() for _ in range(cfg.n_layers)], 'end': jnp.zeros((batch,), jnp.int32)}


def moe_layers(model: Transformer):
  """The MoE FFNs of a model, in layer order (used to update expert biases)."""
  return [b.ffn for b in model.blocks if isinstance(b.ffn, MoE)]
