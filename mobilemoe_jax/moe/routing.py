"""Top-k routing and the router's auxiliary losses. All math in float32."""
import jax
import jax.numpy as jnp


def route(logits, *, top_k: int, score_func: str, norm_topk_prob: bool, routed_scale: float,
          bias=None):
  """Chooses k experts per token.

  logits: [N, E] router logits. bias: [E] aux-loss-free selection bias: it moves which
  experts are *chosen* but never the weights they get (DeepSeek-V3).
  Returns (weights [N, k], experts [N, k] int32, scores [N, E]).
  """
  logits = logits.astype(jnp.float32)
  scores = jax.nn.softmax(logits, -1) if score_func == 'softmax' else jax.nn.sigmoid(logits)
  select = scores if bias is None else scores + bias.astype(jnp.float32)
  experts = _top_k_indices(select, top_k)
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * routed_scale, experts.astype(jnp.int32), scores


def _top_k_indices(x, k: int):
  """Indices of the k largest entries along the last axis; ties -> lower index.

  k rounds of argmax rather than lax.top_k: XLA's SPMD partitioner gathers every token
  to one device for TopK, but partitions argmax over the token dims (k <= 8 here).
  """
  picked = []
  for _ in range(k):
    i = jnp.argmax(x, -1)
    picked.append(i)
    x = jnp.where(jax.nn.one_hot(i, x.shape[-1], dtype=bool), -jnp.inf, x)
  return jnp.stack(picked, -1)


def load_balancing_loss(scores, experts, n_experts: int, valid=None):
  """Switch-Transformer loss E * sum_e f_e * p_e; equals 1 under perfect balance.

  f_e: fraction of the N*k assignments that went to e; p_e: mean normalised score of e.
  valid: [N] 0/1 mask so padding tokens do not count.
  """
  n, k = experts.shape
  valid = jnp.ones((n,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  count = jnp.maximum(valid.sum(), 1.0)
  hits = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32).sum(1)      # [N, E]
  f = (hits * valid[:, None]).sum(0) / (count * k)
  probs = scores / (scores.sum(-1, keepdims=True) + 1e-20)
  p = (probs * valid[:, None]).sum(0) / count
  return n_experts * jnp.sum(f * p)


def z_loss(logits, valid=None):
  """Router z-loss (ST-MoE): mean squared log-partition; keeps logits small."""
  z = jax.nn.logsumexp(logits.astype(jnp.float32), -1) ** 2
  if valid is None:
    return z.mean()
  valid = valid.astype(jnp.float32)
  return (z * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def tokens_per_expert(experts, n_experts: int, valid=None):
  """[E] number of (valid) token assignments each expert received."""
  hits = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32).sum(1)
  if valid is not None:
    hits = hits * valid.astype(jnp.float32)[:, None]
  return hits.sum(0)
