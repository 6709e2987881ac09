"""Incremental decoding with the KV cache: greedy or temperature/top-k sampling."""
import jax
import jax.numpy as jnp
from flax import nnx

from mobilemoe_jax.model.transformer import init_cache


@nnx.jit
def prefill(model, prompt, lengths, cache):
  """Runs right-padded prompts [B, T] through the model; returns last-token logits [B, V]."""
  logits, _, cache = model(prompt, cache=cache)
  cache = dict(cache, end=lengths)          # padding slots are overwritten by later tokens
  return logits[jnp.arange(prompt.shape[0]), lengths - 1], cache


@nnx.jit
def decode_step(model, token, cache):
  """One token per row [B] -> next-token logits [B, V]."""
  logits, _, cache = model(token[:, None], cache=cache)
  return logits[:, 0], cache


def sample(logits, rng, temperature: float, top_k: int = 0):
  """Greedy when temperature == 0, else softmax(logits / T) over the top_k (0 = all)."""
  if temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits).astype(jnp.int32)


def generate(model, prompt, max_new_tokens: int, *, lengths=None, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, eos_id=None, cache_dtype=jnp.float32):
  """prompt: [B, T] int (right-padded; `lengths` [B] real lengths, default T).
  Returns [B, max_new_tokens] int32; after `eos_id` a row repeats eos_id.
  The cache holds K/V in `cache_dtype`, or int8 + per-token scales when the model has
  model.quant.kv_cache='int8' (init_cache)."""
  prompt = jnp.asarray(prompt, jnp.int32)
  b, t = prompt.shape
  lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  if t + max_new_tokens > model.cfg.max_seq_len:
    raise ValueError(f'prompt length {t} + max_new_tokens {max_new_tokens} exceeds '
                     f'model.max_seq_len={model.cfg.max_seq_len}')
  cache = init_cache(model.cfg, b, t + max_new_tokens, cache_dtype)
  logits, cache = prefill(model, prompt, lengths, cache)
  rng = jax.random.key(seed)
  done = jnp.zeros((b,), bool)
  out = []
  for _ in range(max_new_tokens):
    rng, key = jax.random.split(rng)
    token = sample(logits, key, temperature, top_k)
    if eos_id is not None:
      token = jnp.where(done, eos_id, token)
      done = done | (token == eos_id)
    out.append(token)
    logits, cache = decode_step(model, token, cache)
  return jnp.stack(out, 1)
