"""Cross-entropy over the LM head in chunks of sequence positions (train.loss_chunk_len).

The unchunked loss materialises fp32 logits [B, T, V] and their gradient: at MobileMoE-S's
202,048-entry vocabulary and 8 x 2048 tokens that is 13 GB each, written and read several
times per step. Here the logits of `chunk_len` positions (of every row) exist at a time.
The loss is a weighted sum over tokens, so its cotangent is one scalar: the gradients of the
hidden states and of the head are computed chunk by chunk in the forward pass (custom_vjp)
and only scaled in the backward pass, so each chunk's logits are computed once and the head
matmuls are the same three as unchunked (forward, two backward).

`exp_once` (the default) computes each chunk's exponentials once: after
the row max, one pass writes e = exp(logits - max) (0 at the target) in the compute dtype and
sums it in fp32 (rest; sum = rest + the target's exp); the target entries are then set to
-rest (a scatter of one value per row), and the gradient d loss / d logits = w / sum * e is
never formed: the head matmuls take e, and the row scale w / sum is applied to their
[.., D]-sized operand or output. The same math as the softmax gradient pass it replaces (exp_once=False: logsumexp's
max and sum-of-exp passes, then a third pass over the logits for the gradient), with the
target entry (p_target - 1) as precise as there (not 1 - rounded p_target).
"""
import functools
import math

import jax
import jax.numpy as jnp

from mobilemoe_jax import sharding
from mobilemoe_jax.model.transformer import logits as head_logits


def chunked_cross_entropy(x, head, targets, weights, chunk_len: int, exp_once: bool = True):
  """sum(weights * CE(logits(x, head), targets)) computed `chunk_len` positions at a time.

  x [B, T, D] and head [D, V] as `Transformer(..., return_hidden=True)` returns them,
  targets [B, T] int, weights [B, T] float (0: no loss and no gradient; padding, prompts).
  T need not be a multiple of chunk_len (the last chunk is padded with weight-0 tokens).
  Returns a float32 scalar; differentiable in x and head (not in targets or weights).
  exp_once: the gradient from one exp pass per chunk (module docstring); False: the
  logsumexp + softmax-gradient passes. The same loss and gradients up to rounding.
  """
  if chunk_len < 1:
    raise ValueError(f'chunk_len must be >= 1, got {chunk_len}')
  return _ce_sum(x, head, targets, weights.astype(jnp.float32), int(chunk_len), bool(exp_once))


def _chunks(a, c: int):
  """[B, T, ...] -> [n, B, c, ...] with T padded (zeros) to n * c."""
  b, t = a.shape[:2]
  n = -(-t // c)
  a = jnp.pad(a, [(0, 0), (0, n * c - t)] + [(0, 0)] * (a.ndim - 2))
  return a.reshape(b, n, c, *a.shape[2:]).swapaxes(0, 1)


def _batch_shards(b: int) -> int:
  """Devices the batch dim is split over under the ambient mesh (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or not mesh.axis_names:
    return 1
  spec = sharding.logical_to_spec(('batch',), (b,), mesh)[0]
  axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return math.prod(sizes[a] for a in axes)


def _softmax_chunk(loss, logits, tc, wc, head, grad: bool):
  """(loss + CE sum, dlogits [B, c, V] in head.dtype or None): exp_once=False."""
  lse = jax.nn.logsumexp(logits, -1)
  target = jnp.take_along_axis(logits, tc[..., None], -1)[..., 0]
  loss = loss + jnp.sum(wc * (lse - target))
  if not grad:
    return loss, None
  # d loss / d logits = weight * (softmax - one_hot), in the compute dtype for the matmuls
  # (as the unchunked backward casts it).
  one_hot = tc[..., None] == jax.lax.broadcasted_iota(tc.dtype, (1, 1, logits.shape[-1]), 2)
  return loss, ((jnp.exp(logits - lse[..., None]) - one_hot) * wc[..., None]).astype(head.dtype)


def _exp_once_chunk(loss, logits, tc, wc, head):
  """(loss + CE sum, e [B, c, V] in head.dtype, row scale [B, c]): d CE / d logits = scale * e,
  from one exp pass over the logits after their max (module docstring)."""
  target = jnp.take_along_axis(logits, tc[..., None], -1)[..., 0]
  m = jnp.max(logits, -1)
  one_hot = tc[..., None] == jax.lax.broadcasted_iota(tc.dtype, (1, 1, logits.shape[-1]), 2)
  # The softmax numerators off the target, and their sum, from one pass over the logits.
  e = jnp.where(one_hot, 0.0, jnp.exp(logits - m[..., None]))
  rest = jnp.sum(e, -1)                                                  # sum over v != target
  total = rest + jnp.exp(target - m)
  loss = loss + jnp.sum(wc * (m + jnp.log(total) - target))
  # e with -rest at the target: there weight / total * -rest = weight * (p_target - 1),
  # rounded like the softmax pass's (p_target - 1).
  e = jnp.put_along_axis(e.astype(head.dtype), tc[..., None],
                         (-rest).astype(head.dtype)[..., None], -1, inplace=False)
  return loss, e, wc / total


def _scan(x, head, targets, weights, c: int, grad: bool, exp_once: bool = False):
  """(loss sum, dx [B, T, D] or None, dhead [D, V] fp32 or None) for cotangent 1."""
  b, t, d = x.shape
  v = head.shape[1]
  s = _batch_shards(b)
  xs = (sharding.constrain(_chunks(x, c), (None, 'batch', 'length', 'act_embed')),
        _chunks(targets, c), _chunks(weights, c))

  def body(carry, chunk):
    loss, dhead = carry
    xc, tc, wc = chunk                                                   # [B, c, ...]
    logits = head_logits(xc, head)                                       # [B, c, V] fp32
    if grad and exp_once:   # d loss / d logits = scale * g
      loss, g, scale = _exp_once_chunk(loss, logits, tc, wc, head)
      dx = jnp.einsum('bcv,dv->bcd', g, head, preferred_element_type=jnp.float32)
      dx = (dx * scale[..., None]).astype(x.dtype)
      xg = (xc.astype(jnp.float32) * scale[..., None]).astype(xc.dtype)
    else:
      loss, g = _softmax_chunk(loss, logits, tc, wc, head, grad)
      if not grad:
        return (loss, dhead), None
      dx, xg = jnp.einsum('bcv,dv->bcd', g, head), xc
    # Per batch shard partial sums [s, D, V]: no all-reduce per chunk, one after the loop.
    part = jnp.einsum('sbcd,sbcv->sdv', xg.reshape(s, b // s, c, d),
                      g.reshape(s, b // s, c, v), preferred_element_type=jnp.float32)
    dhead = sharding.constrain(dhead + part, ('batch', None, 'vocab'))
    return (loss, dhead), dx

  dhead0 = (sharding.constrain(jnp.zeros((s, d, v), jnp.float32), ('batch', None, 'vocab'))
            if grad else jnp.zeros(()))
  (loss, dhead), dx = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dhead0), xs)
  if not grad:
    return loss, None, None
  dx = dx.swapaxes(0, 1).reshape(b, -1, d)[:, :t]
  return loss, sharding.constrain(dx, ('batch', 'length', 'act_embed')), dhead.sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ce_sum(x, head, targets, weights, c, exp_once):
  return _scan(x, head, targets, weights, c, grad=False)[0]


def _ce_sum_fwd(x, head, targets, weights, c, exp_once):
  loss, dx, dhead = _scan(x, head, targets, weights, c, grad=True, exp_once=exp_once)
  return loss, (dx.astype(x.dtype), dhead, jnp.zeros((0,), head.dtype))


def _ce_sum_bwd(c, exp_once, res, g):
  dx, dhead, head_like = res
  return (g.astype(dx.dtype) * dx, (g * dhead).astype(head_like.dtype), None, None)


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)
