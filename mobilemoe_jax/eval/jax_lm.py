"""The lm_eval backend on a JAX (Flax NNX) model: batched, padded, jitted, data-parallel.

  lm = JaxLM(model, tokenizer, batch_size=16)          # in memory (the pipeline, tests)
  lm = JaxLM(checkpoint='runs/x/ckpt')                 # from disk (see train/loading.py)
  lm_eval ... --model mobilemoe-jax --model_args checkpoint=runs/x/ckpt,batch_size=16

Shapes are bucketed (rows to `batch_size`, length to a multiple of `length_bucket`) so a whole
task compiles a handful of programs, not one per request. With several devices the batch is
split over all of them (a 'data' mesh from mobilemoe_jax.sharding); parameters follow their
logical axes, which on a data-only mesh means replicated.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.registry import register_model

from mobilemoe_jax.config import mesh_config
from mobilemoe_jax.eval.base import TokenLM
from mobilemoe_jax.model import init_cache
from mobilemoe_jax.model.generate import decode_step, prefill, sample
from mobilemoe_jax.sharding import batch_sharding, make_mesh, shard_model


@nnx.jit
def token_logprobs(model, inputs, targets):
  """inputs, targets: [B, T] int32 -> (log p(target) [B, T], target == argmax [B, T]).
  Reduced on device so only [B, T] comes back, never the [B, T, V] logits."""
  logits, _, _ = model(inputs)                                   # [B, T, V] fp32
  logp = jax.nn.log_softmax(logits, -1)
  picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return picked, jnp.argmax(logits, -1) == targets


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@register_model('mobilemoe-jax')
class JaxLM(TokenLM):

  def __init__(self, model=None, tokenizer=None, *, checkpoint: str | None = None,
               batch_size: int = 8, max_gen_toks: int = 256, length_bucket: int = 64,
               max_length: int | None = None, shard: bool = True, seed: int = 0, **unused):
    """max_length: context to evaluate at (default and upper bound: the model's max_seq_len).
    shard: split batches over all devices when there are several."""
    if unused:
      logging.warning('JaxLM ignores arguments %s', sorted(unused))
    if model is None:
      if checkpoint is None:
        raise ValueError('JaxLM needs an in-memory model + tokenizer, or checkpoint=PATH')
      from mobilemoe_jax.train.loading import load_checkpoint
      model, _, loaded_tok = load_checkpoint(checkpoint)
      tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
      raise ValueError('JaxLM needs a tokenizer (mobilemoe_jax.data.tokenizer.load_tokenizer)')
    if isinstance(tokenizer, str):
      from mobilemoe_jax.data.tokenizer import load_tokenizer
      tokenizer = load_tokenizer(tokenizer)
    max_length = min(int(max_length or model.cfg.max_seq_len), model.cfg.max_seq_len)
    super().__init__(tokenizer, max_length, max_gen_toks)
    if model.cfg.moe.n_experts and model.cfg.moe.capacity_factor > 0:
      # Padding and the other rows of a batch then compete for expert capacity.
      logging.warning('MoE capacity_factor=%s drops tokens: scores depend on batch content; '
                      'evaluate with capacity_factor=0', model.cfg.moe.capacity_factor)
    self.model = model
    self.length_bucket = int(length_bucket)
    self.seed = int(seed)
    self.mesh = None
    n_dev = jax.device_count()
    if shard and n_dev > 1:
      self.mesh = make_mesh(mesh_config(data=n_dev))
      shard_model(self.model, self.mesh)
    # Every batch is padded to this many rows; it must split evenly over the devices.
    self.batch_size = _round_up(int(batch_size), n_dev if self.mesh is not None else 1)

  # -- placement ---------------------------------------------------------------------------------
  def _put(self, x):
    x = np.asarray(x, np.int32)
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, batch_sharding(self.mesh, x.ndim))

  def _run(self, fn, *args):
    if self.mesh is None:
      return fn(*args)
    with jax.set_mesh(self.mesh):
      return fn(*args)

  def _bucket(self, n: int, limit: int) -> int:
    return min(_round_up(max(n, 1), self.length_bucket), limit)

  # -- scoring -----------------------------------------------------------------------------------
  def _score_pairs(self, pairs):
    # Longest first: rows of a batch then have similar lengths and little padding.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results = [None] * len(pairs)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      rows = [pairs[i][0] + pairs[i][1] for i in chunk]
      t = self._bucket(max(len(r) for r in rows) - 1, self.max_length)
      inputs = np.zeros((self.batch_size, t), np.int32)   # right padding: causal attention
      targets = np.zeros((self.batch_size, t), np.int32)  # never lets real tokens see it
      for r, row in enumerate(rows):
        inputs[r, :len(row) - 1] = row[:-1]
        targets[r, :len(row) - 1] = row[1:]
      logp, greedy = self._run(token_logprobs, self.model, self._put(inputs), self._put(targets))
      logp, greedy = np.asarray(logp), np.asarray(greedy)
      for r, i in enumerate(chunk):
        n_in, n_cont = len(rows[r]) - 1, len(pairs[i][1])
        span = slice(n_in - n_cont, n_in)                  # positions predicting the continuation
        results[i] = (float(logp[r, span].sum(dtype=np.float64)), bool(greedy[r, span].all()))
    return results

  # -- generation --------------------------------------------------------------------------------
  def _generate_ids(self, prompts, max_new, should_stop, temperature):
    out = [[] for _ in prompts]
    rng = jax.random.key(self.seed)
    for start in range(0, len(prompts), self.batch_size):
      chunk = list(range(start, min(start + self.batch_size, len(prompts))))
      t = self._bucket(max(len(prompts[i]) for i in chunk), self.max_length - max_new)
      tokens = np.zeros((self.batch_size, t), np.int32)
      lengths = np.ones((self.batch_size,), np.int32)      # pad rows: one token, ignored
      for r, i in enumerate(chunk):
        tokens[r, :len(prompts[i])] = prompts[i]
        lengths[r] = len(prompts[i])
      cache = init_cache(self.model.cfg, self.batch_size, t + max_new, jnp.float32)
      logits, cache = self._run(prefill, self.model, self._put(tokens), self._put(lengths), cache)
      done = [False] * len(chunk)
      for _ in range(max_new):
        rng, key = jax.random.split(rng)
        token = sample(logits, key, temperature)
        host = np.asarray(token)
        for r, i in enumerate(chunk):
          if done[r]:
            continue
          if host[r] in self.tok.stop_ids:
            done[r] = True
            continue
          out[i].append(int(host[r]))
          done[r] = should_stop(out[i])
        if all(done):  # the common case for short answers: stop long before max_new
          break
        logits, cache = self._run(decode_step, self.model, token, cache)
    return out
