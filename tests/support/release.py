"""The released MobileMoE's math as an independent numpy forward (shared/notes/
mobilemoe_release.md §2), and tiny configs of the released family: the reference that
tests/test_release_arch.py and tests/test_convert.py compare our model against.

It knows nothing of our model: adjacent-pair RoPE on the release's q/k rows, Llama 3
frequency scaling (Hugging Face's formula), weightless QK-norm after RoPE, sigmoid scores with
a selection-only expert bias, normalised weights x routed_scale on the expert outputs, an
ungated shared expert, the tied head. float64 numpy.
"""
import math

import numpy as np

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.config import model_config
from mobilemoe_jax.convert import layout


def release_like(**kw):
  """A tiny config of the released family; `kw` overrides fields (dotted names for moe/rope)."""
  m = model_config(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                   d_ff=48, tie_embeddings=True, rope_theta=500_000.0, norm_eps=1e-5,
                   max_seq_len=8192, qk_norm=True, dtype='float32')
  m.rope_scaling.update(dict(kind='llama3', factor=16.0, original_max_len=8192,
                             low_freq_factor=1.0, high_freq_factor=1.0))
  m.moe.update(dict(n_experts=8, top_k=3, d_expert=32, n_shared=1, d_shared=48, first_dense=0,
                    every=1, score_func='sigmoid', norm_topk_prob=True, routed_scale=2.5,
                    expert_bias=True, capacity_factor=0.0))
  for key, value in kw.items():
    section, _, field = key.rpartition('.')
    (m[section] if section else m)[field] = value
  return config_lib.validate(m)


def release_tensors(cfg, seed=0):
  """Random float tensors in the release's layout (names and shapes from layout.tensor_shapes,
  which test_tensor_shapes_follow_the_notes checks against the notes' table)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in layout.tensor_shapes(cfg).items():
    if name.endswith('norm.weight'):
      a = 1 + 0.2 * rng.standard_normal(shape)
    elif name.endswith('expert_bias'):
      a = 0.3 * rng.standard_normal(shape)         # large enough to change the selection
    elif name == 'model.embed_tokens.weight':
      a = 0.5 * rng.standard_normal(shape)
    else:
      a = rng.standard_normal(shape) / math.sqrt(shape[-2] if 'experts.' in name else shape[-1])
    out[name] = a.astype(np.float32)
  return out


# ---------------------------------------------------------------------------------------
# The reference, from the notes.

def rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def llama3_inv_freq(head_dim, theta, s):
  """Hugging Face's _compute_llama3_parameters, with its 0/0 smooth band guarded."""
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
  if s['kind'] == 'none':
    return inv
  low_wl, high_wl = s['original_max_len'] / s['low_freq_factor'], s['original_max_len'] / s['high_freq_factor']
  wl = 2 * np.pi / inv
  out = np.where(wl > low_wl, inv / s['factor'], inv)
  if s['high_freq_factor'] != s['low_freq_factor']:
    smooth = (s['original_max_len'] / wl - s['low_freq_factor']) / (s['high_freq_factor'] - s['low_freq_factor'])
    medium = ~(wl < high_wl) & ~(wl > low_wl)
    out = np.where(medium, (1 - smooth) * out / s['factor'] + smooth * out, out)
  return out


def rope_adjacent(x, pos, inv):
  """x: [T, heads, Dh]; pairs (2i, 2i+1) rotated by pos * inv[i] (notes §2.1)."""
  ang = pos[:, None, None] * inv[None, None]                       # [T, 1, Dh/2]
  cos, sin = np.cos(ang), np.sin(ang)
  a, b = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
  return out


def silu(x):
  return x / (1 + np.exp(-x))


def reference_logits(t, cfg, tokens, positions):
  """[T, V] logits of one sequence, float64."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  nh, kvh, dh, eps, m = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps, cfg.moe
  n = len(tokens)
  inv = llama3_inv_freq(dh, cfg.rope_theta, dict(cfg.rope_scaling))
  x = t['model.embed_tokens.weight'][tokens]
  causal = np.tril(np.ones((n, n), bool))
  for i in range(cfg.n_layers):
    p = f'model.layers.{i}.'
    h = rms(x, t[p + 'input_layernorm.weight'], eps)
    q = (h @ t[p + 'self_attn.q_proj.weight'].T).reshape(n, nh, dh)
    k = (h @ t[p + 'self_attn.k_proj.weight'].T).reshape(n, kvh, dh)
    v = (h @ t[p + 'self_attn.v_proj.weight'].T).reshape(n, kvh, dh)
    if i not in cfg.nope_layers:
      q, k = rope_adjacent(q, positions, inv), rope_adjacent(k, positions, inv)
      if cfg.qk_norm:
        q = q / np.sqrt(np.mean(q * q, -1, keepdims=True) + eps)
        k = k / np.sqrt(np.mean(k * k, -1, keepdims=True) + eps)
    att = np.empty((n, nh, dh))
    for head in range(nh):
      kv = head // (nh // kvh)
      s = q[:, head] @ k[:, kv].T / math.sqrt(dh)
      s = np.where(causal, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      att[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, kv]
    x = x + att.reshape(n, nh * dh) @ t[p + 'self_attn.o_proj.weight'].T
    h = rms(x, t[p + 'post_attention_layernorm.weight'], eps)
    f = p + 'feed_forward.'
    if f + 'router.weight' in t:
      scores = 1 / (1 + np.exp(-(h @ t[f + 'router.weight'].T)))             # [T, E]
      routed = np.zeros_like(h)
      for j in range(n):
        chosen = np.argsort(-(scores[j] + t[f + 'expert_bias']), kind='stable')[:m.top_k]
        weights = scores[j, chosen] / (scores[j, chosen].sum() + 1e-20) * m.routed_scale
        for e, w in zip(chosen, weights):
          gu = h[j] @ t[f + 'experts.gate_up_proj'][e]                       # [2I]
          a = silu(gu[:m.d_expert]) * gu[m.d_expert:]
          routed[j] += w * (a @ t[f + 'experts.down_proj'][e])
      sh = f + 'shared_expert.'
      shared = (silu(h @ t[sh + 'gate_proj.weight'].T) * (h @ t[sh + 'up_proj.weight'].T)) \
          @ t[sh + 'down_proj.weight'].T
      x = x + routed + shared
    else:
      x = x + (silu(h @ t[f + 'gate_proj.weight'].T) * (h @ t[f + 'up_proj.weight'].T)) \
          @ t[f + 'down_proj.weight'].T
  x = rms(x, t['model.norm.weight'], eps)
  head = t['model.embed_tokens.weight'] if cfg.tie_embeddings else t['lm_head.weight']
  return x @ head.T
