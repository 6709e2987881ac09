"""The MobileMoE decoder in PyTorch (dense and MoE), the Flax -> PyTorch weight converter,
and the safetensors + config.json format.

Same math as mobilemoe_jax/model (fp32): RMSNorm, half-split RoPE (llama3-scaled frequencies,
NoPE layers), weightless QK-norm, GQA with an optional per-layer sliding window, SwiGLU,
and the MoE block (fp32 router, softmax/sigmoid scores, top-k with an optional
selection-only bias, norm_topk_prob, routed_scale, fused shared experts; always dropless:
`moe.capacity_factor` is a training setting). Written for litert-torch: only ops that lower
to plain LiteRT builtins, an external KV cache that the graph reads and never writes (it
returns the new tokens' K/V; the caller writes them in place), and the routed experts either as

  'portable': every expert computed as FCs and masked by its routing weight (stock LiteRT:
              one FC [E*2F, D] for all gate/up rows, one FC [D, F] per expert for down), or
  'delegate': the whole routed + shared block as one `MobileMoeBlock` custom op whose packed
              INT4 weights follow export/delegate's contract (see moe_op.py).
Attention is builtin matmuls, or with set_attention_lowering('delegate') one
`MobileKvAttention` custom op per layer for decode-sized calls with a cache (attention_op.py).
"""
import json
import math
import os
from typing import NamedTuple

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mobilemoe_jax import config as config_lib

FORMAT = 'mobilemoe-torch'
GRID_FILE = 'quant_grid.safetensors'   # a QAT model's exact integers and scales


KV_CACHE_DTYPES = ('f32', 'int8')


class ConfigMismatch(ValueError):
  """Checkpoint tensors that do not fit the config (names or shapes)."""


# ---- config -----------------------------------------------------------------------------

def config_dict(model_cfg) -> dict:
  """A plain dict of the model config (validated, head_dim filled in)."""
  cfg = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
  c = config_lib.model_config()   # schema defaults for fields an older config lacks
  c.update(cfg)
  config_lib.validate(c)
  return c.to_dict()


def is_moe_layer(cfg: dict, layer: int) -> bool:
  return config_lib.is_moe_layer(ml_collections.ConfigDict(cfg), layer)


def layer_window(cfg: dict, layer: int) -> int:
  """0 for a global layer, else the sliding window (the rule lives in config.py)."""
  return 0 if config_lib.is_global_layer(ml_collections.ConfigDict(cfg), layer) else cfg['sliding_window']


# ---- modules ----------------------------------------------------------------------------

class RMSNorm(nn.Module):
  def __init__(self, dim, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float, scaling=None):
  """cos/sin [max_len, Dh/2] in fp32 for the model's rotary frequencies (model/layers.py
  rope_frequencies, incl. model.rope_scaling; angles in fp64: only the final rounding
  differs from JAX's on-the-fly fp32 angles, ~1e-7)."""
  from mobilemoe_jax.model.layers import rope_frequencies
  freq = np.asarray(rope_frequencies(head_dim, theta, scaling), np.float64)
  angle = np.arange(max_len, dtype=np.float64)[:, None] * freq
  return (torch.tensor(np.cos(angle), dtype=torch.float32),
          torch.tensor(np.sin(angle), dtype=torch.float32))


def apply_rope(x, cos, sin):
  """x [B, T, H, Dh]; cos/sin [T, Dh/2]: the half-split convention."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = cos[None, :, None], sin[None, :, None]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def write_cache(cache, new, pos0: int, n: int = None):
  """Writes new rows (k, v [B, T, K, Dh], and with an int8 cache their scales [B, T, K])
  (the first n of them) into cache (k [B, K, S, Dh], v [B, K, Dh, S], scales [B, K, S]) at
  slots pos0.. in place: what the runner does with a signature's outputs (eager PyTorch;
  the graph never writes its cache)."""
  k, v = new[:2]
  n = k.shape[1] if n is None else n
  cache[0][:, :, pos0:pos0 + n] = k[:, :n].transpose(1, 2)
  cache[1][..., pos0:pos0 + n] = v[:, :n].permute(0, 2, 3, 1)
  for dst, scale in zip(cache[2:], new[2:]):
    dst[..., pos0:pos0 + n] = scale[:, :n].transpose(1, 2)
  return cache


def head_rms_norm(x, eps: float):
  """QK-norm (model/layers.py head_rms_norm): x * rsqrt(mean(x^2) + eps) over Dh, no weight."""
  return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def int8_quant(x):
  """x [..., Dh] -> (integers in [-127, 127] as floats, scale [..., 1]): the int8 KV-cache
  grid (quant.grid.quantize_act_int8: symmetric, one scale per token and head) with the same
  fp32 operations."""
  amax = x.abs().amax(-1, keepdim=True)
  inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, torch.ones_like(amax)),
                    torch.zeros_like(amax))
  return torch.clamp(torch.round(x * inv), -127, 127), amax / 127.0


def int8_qdq(x):
  q, scale = int8_quant(x)
  return q * scale


class Attention(nn.Module):
  def __init__(self, cfg, window, use_rope: bool = True):
    super().__init__()
    d, h, kv, dh = cfg['d_model'], cfg['n_heads'], cfg['n_kv_heads'], cfg['head_dim']
    self.h, self.kv, self.dh, self.window = h, kv, dh, window
    # A NoPE layer has neither RoPE nor QK-norm (config.is_rope_layer).
    self.use_rope = use_rope
    self.qk_norm_eps = cfg['norm_eps'] if use_rope and cfg.get('qk_norm') else None
    self.kv_int8 = (cfg.get('quant') or {}).get('kv_cache') == 'int8'
    # 'f32' or 'int8': the dtype of the cache tensors (MobileMoE.set_kv_cache_dtype). An int8
    # cache is (k, v) int8 + scales (k_scale, v_scale) [B, K, S], and implies the int8 grid.
    self.cache_dtype = 'f32'
    self.q = nn.Linear(d, h * dh, bias=False)
    self.k = nn.Linear(d, kv * dh, bias=False)
    self.v = nn.Linear(d, kv * dh, bias=False)
    self.o = nn.Linear(h * dh, d, bias=False)
    # 'portable' (builtin matmuls) or 'delegate': a call with a cache computes
    # y with one MobileKvAttention custom op (attention_op.py, MobileMoE.set_attention_lowering).
    self.lowering = 'portable'

  def forward(self, x, pos, cos, sin, cache=None):
    """x [B, T, D]; pos [T] int positions (contiguous); cache None (attention among the T
    tokens) or the past (k [B, K, P, Dh], v [B, K, Dh, P], and for an int8 cache their
    scales [B, K, P]) whose slots < pos[0] hold the earlier tokens (later slots are
    ignored: stale or unwritten). Returns (y, the T tokens' rows: (k, v) [B, T, K, Dh], for
    an int8 cache (k, v) int8 + (k_scale, v_scale) [B, T, K]): the graph never rewrites the
    cache, its caller writes those rows in place (write_cache, export.runner)."""
    b, t, _ = x.shape
    q = self.q(x).view(b, t, self.h, self.dh)
    k = self.k(x).view(b, t, self.kv, self.dh)
    if self.use_rope:
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if self.qk_norm_eps is not None:
      q, k = head_rms_norm(q, self.qk_norm_eps), head_rms_norm(k, self.qk_norm_eps)
    v = self.v(x).view(b, t, self.kv, self.dh)
    new = (k, v)
    if self.kv_int8 or self.cache_dtype == 'int8':   # the values an int8 cache returns
      (kq, ks), (vq, vs) = int8_quant(k), int8_quant(v)
      k, v = kq * ks, vq * vs
      new = (k, v) if self.cache_dtype == 'f32' else \
          (kq.to(torch.int8), vq.to(torch.int8), ks[..., 0], vs[..., 0])
    if self.lowering == 'delegate' and cache is not None and b == 1:
      from export import attention_op
      if t <= attention_op.MAX_TOKENS:   # decode and prefill chunks (all but huge ones)
        opts = json.dumps(attention_op.options(self.h, self.kv, self.dh, self.window))
        y = attention_op.kv_attention(q, k, v, cache[0], cache[1], pos.to(torch.int32), opts)
        return self.o(y), new
    rep = self.h // self.kv                      # query head i reads kv head i // rep
    # Query heads grouped per KV head, rows (head in group, token): [B, K, rep*T, Dh]; no
    # repeated copy of the cache (in LiteRT that copy was a BROADCAST_TO of it per layer).
    qg = q.view(b, t, self.kv, rep, self.dh).permute(0, 2, 3, 1, 4).reshape(b, self.kv, rep * t, self.dh)
    kn, vn = k.transpose(1, 2), v.transpose(1, 2)                          # [B, K, T, Dh]
    # Among the new tokens: causal, within the window.
    diff = pos[:, None] - pos[None, :]                                     # [T, T]
    visible = diff >= 0
    if self.window:
      visible = visible & (diff < self.window)
    scores = [torch.matmul(qg, kn.transpose(-1, -2))]                     # [B, K, rep*T, T]
    masks = [visible]
    if cache is not None:
      kc, vc = cache[:2]                           # [B, K, P, Dh], [B, K, Dh, P]
      slot = torch.arange(kc.shape[2], dtype=pos.dtype)
      d = pos[:, None] - slot[None, :]                                     # [T, P]
      past = d > (pos - pos[0])[:, None]                                   # slot < pos[0]
      if self.window:
        past = past & (d < self.window)
      # Both products read the cache as the transposed second operand of a BATCH_MATMUL
      # (keys [P, Dh] and values [Dh, P] per KV head: XNNPACK packs that layout without a
      # transpose), with no copy of it in the graph. Measured (8 attention layers, S=1024,
      # decode): 4.9 ms vs 7.5 ms with the cache as the first operand ([P, Dh], [Dh, P]
      # times q^T / p^T, whose 3 columns fill a tenth of XNNPACK's 32-wide tiles).
      past_scores = torch.einsum('bgqd,bgsd->bgqs', qg, kc.float())        # [B, K, rep*T, P]
      if len(cache) == 4:     # int8: a key's scale factors out of its dot products
        past_scores = past_scores * cache[2][:, :, None, :]
      scores.insert(0, past_scores)
      masks.insert(0, past)
    mask = torch.cat(masks, -1)                                            # [T, P+T]
    scores = torch.cat(scores, -1) / math.sqrt(self.dh)
    n_keys = scores.shape[-1]
    scores = scores.view(b, self.kv, rep, t, n_keys).masked_fill(~mask, float('-inf'))
    p = scores.softmax(-1).view(b, self.kv, rep * t, n_keys)
    y = torch.matmul(p[..., -t:], vn)                                      # [B, K, rep*T, Dh]
    if cache is not None:
      p_past = p[..., :-t] if len(cache) == 2 else p[..., :-t] * cache[3][:, :, None, :]
      y = y + torch.einsum('bgqs,bgds->bgqd', p_past, vc.float())
    y = y.reshape(b, self.kv, rep, t, self.dh).permute(0, 3, 1, 2, 4).reshape(b, t, self.h * self.dh)
    return self.o(y), new


class MLP(nn.Module):
  def __init__(self, d, hidden):
    super().__init__()
    self.gate = nn.Linear(d, hidden, bias=False)
    self.up = nn.Linear(d, hidden, bias=False)
    self.down = nn.Linear(hidden, d, bias=False)

  def forward(self, x):
    return self.down(F.silu(self.gate(x)) * self.up(x))


def route(logits, bias, m: dict):
  """logits [N, E] fp32 -> combine weights [N, E] (zero for unchosen experts).
  Same rules as moe/routing.py: the bias moves the choice, never the weights."""
  scores = logits.softmax(-1) if m['score_func'] == 'softmax' else torch.sigmoid(logits)
  select = scores if bias is None else scores + bias
  idx = torch.topk(select, m['top_k'], dim=-1).indices                       # [N, k]
  experts = torch.arange(scores.shape[-1], dtype=idx.dtype)
  chosen = (idx[..., None] == experts).any(-2)                               # [N, E]
  w = torch.where(chosen, scores, torch.zeros_like(scores))
  if m['norm_topk_prob']:
    w = w / (w.sum(-1, keepdim=True) + 1e-20)
  return w * m['routed_scale']


class MoE(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    m = cfg['moe']
    d, e, f = cfg['d_model'], m['n_experts'], m['d_expert']
    self.m, self.e, self.f = m, e, f
    self.router = nn.Linear(d, e, bias=False)
    self.gate_up = nn.Linear(d, e * 2 * f, bias=False)   # rows: expert e's gate then up
    self.down = nn.ModuleList([nn.Linear(f, d, bias=False) for _ in range(e)])
    self.shared = MLP(d, m['n_shared'] * m['d_shared']) if m['n_shared'] else None
    self.register_buffer('expert_bias', torch.zeros(e) if m['expert_bias'] else None)
    self.lowering = 'portable'
    self.op = None            # set by moe_op.attach() for the 'delegate' lowering
    self.expert_grid = None   # ExpertGrid: a release checkpoint's exact expert integers

  def forward(self, x):
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    if self.lowering == 'delegate':
      return self.op(flat).reshape(b, t, d)
    w = route(self.router(flat), self.expert_bias, self.m)                   # [N, E]
    gu = self.gate_up(flat).view(b * t, self.e, 2, self.f)
    h = F.silu(gu[:, :, 0]) * gu[:, :, 1]                                    # [N, E, F]
    y = sum(self.down[i](h[:, i]) * w[:, i:i + 1] for i in range(self.e))
    y = y.reshape(b, t, d)
    return y if self.shared is None else y + self.shared(x)


class Block(nn.Module):
  def __init__(self, cfg, layer):
    super().__init__()
    self.attn_norm = RMSNorm(cfg['d_model'], cfg['norm_eps'])
    self.attn = Attention(cfg, layer_window(cfg, layer),
                          config_lib.is_rope_layer(ml_collections.ConfigDict(cfg), layer))
    self.ffn_norm = RMSNorm(cfg['d_model'], cfg['norm_eps'])
    self.ffn = MoE(cfg) if is_moe_layer(cfg, layer) else MLP(cfg['d_model'], cfg['d_ff'])

  def forward(self, x, pos, cos, sin, cache=None):
    h, kv = self.attn(self.attn_norm(x), pos, cos, sin, cache)
    x = x + h
    return x + self.ffn(self.ffn_norm(x)), kv


class MobileMoE(nn.Module):
  """tokens [B, T] int -> logits [B, T, V] (and the new tokens' K/V when given a cache)."""

  def __init__(self, cfg: dict):
    super().__init__()
    self.cfg = cfg
    self.embed = nn.Embedding(cfg['vocab_size'], cfg['d_model'])
    self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg['n_layers'])])
    self.final_norm = RMSNorm(cfg['d_model'], cfg['norm_eps'])
    self.head = None if cfg['tie_embeddings'] else nn.Linear(cfg['d_model'], cfg['vocab_size'], bias=False)
    cos, sin = rope_tables(cfg['head_dim'], cfg['max_seq_len'], cfg['rope_theta'],
                           config_lib.rope_scaling(ml_collections.ConfigDict(cfg)))
    self.register_buffer('rope_cos', cos, persistent=False)
    self.register_buffer('rope_sin', sin, persistent=False)

  def forward(self, tokens, input_pos=None, kv_cache=None, last_index=None):
    """input_pos [T]: positions of the tokens (= cache slots; contiguous).
    kv_cache: None for a plain forward, or per layer the cache (k [B, K, P, Dh],
    v [B, K, Dh, P]) whose slots < input_pos[0] hold the earlier tokens (empty_cache);
    then returns (logits, [(k, v) of these tokens [B, T, K, Dh] per layer]), which the
    caller writes into its cache (write_cache): the graph does not copy the cache.
    last_index [1] int: logits only for that token of the chunk ([B, 1, V]): a prefill
    padded to T samples from its last real token, and the lm_head over the vocabulary
    then runs for one row instead of T."""
    if input_pos is None:
      input_pos = torch.arange(tokens.shape[1], dtype=torch.int32)
    cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
    x = self.embed(tokens)
    new_kv = []
    for i, block in enumerate(self.blocks):
      x, kv = block(x, input_pos, cos, sin, None if kv_cache is None else kv_cache[i])
      new_kv.append(kv)
    if last_index is not None:
      x = x.index_select(1, last_index)
    x = self.final_norm(x)
    logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
    return logits if kv_cache is None else (logits, new_kv)

  def empty_cache(self, batch: int, max_len: int):
    """Per layer (k [B, K, S, Dh], v [B, K, Dh, S]) zeros: each head's keys are rows and
    its values columns, the layouts the attention matmuls read in place."""
    k = (batch, self.cfg['n_kv_heads'], max_len, self.cfg['head_dim'])
    v = (batch, self.cfg['n_kv_heads'], self.cfg['head_dim'], max_len)
    if self.blocks[0].attn.cache_dtype == 'int8':   # + scales [B, K, S] (set_kv_cache_dtype)
      return [(torch.zeros(k, dtype=torch.int8), torch.zeros(v, dtype=torch.int8),
               torch.zeros(k[:3]), torch.zeros(k[:3])) for _ in self.blocks]
    return [(torch.zeros(k), torch.zeros(v)) for _ in self.blocks]

  def set_kv_cache_dtype(self, dtype: str):
    """'f32' or 'int8': the cache tensors' dtype (an int8 cache stores each token's K and V
    per head on the int8 grid, with f32 scales [B, K, S]: 4x less cache memory; the graph
    computes with the same values as model.quant.kv_cache='int8' in JAX)."""
    if dtype not in KV_CACHE_DTYPES:
      raise ValueError(f'unknown KV cache dtype {dtype!r}; choose from {KV_CACHE_DTYPES}')
    for b in self.blocks:
      b.attn.cache_dtype = dtype
    return self

  def set_moe_lowering(self, lowering: str, group_size: int = 32, weight_tiles='auto'):
    """'portable' or 'delegate' (the latter packs INT4 weights for the custom op; weight_tiles:
    moe_op.MoeBlockOp's, by default 16-row tiled where the shapes allow it)."""
    if lowering not in ('portable', 'delegate'):
      raise ValueError(f"unknown MoE lowering {lowering!r}: 'portable' or 'delegate'")
    from export import moe_op
    for b in self.blocks:
      if isinstance(b.ffn, MoE):
        b.ffn.lowering = lowering
        # The op's tensors alias the module's weights: none may stay behind once portable
        # (a save would then see shared tensors).
        b.ffn.op = moe_op.MoeBlockOp(b.ffn, group_size, weight_tiles) if lowering == 'delegate' else None
    return self

  def set_attention_lowering(self, lowering: str):
    """'portable' or 'delegate': the latter computes attention over a cache with the
    MobileKvAttention custom op (attention_op.py) for batch 1 and at most
    attention_op.MAX_TOKENS tokens (decode and prefill chunks)."""
    if lowering not in ('portable', 'delegate'):
      raise ValueError(f"unknown attention lowering {lowering!r}: 'portable' or 'delegate'")
    if lowering == 'delegate':
      from export import attention_op  # noqa: F401  (registers the op and its lowering)
    for b in self.blocks:
      b.attn.lowering = lowering
    return self


# ---- Flax -> PyTorch --------------------------------------------------------------------

def flax_params(model_or_state) -> dict:
  """{'blocks.0.attn.q': np.ndarray, ...} from an nnx model or its nnx.State."""
  import jax
  from flax import nnx
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  pure = nnx.to_pure_dict(state)
  flat = jax.tree_util.tree_flatten_with_path(pure)[0]
  return {jax.tree_util.keystr(p, simple=True, separator='.'): np.asarray(v, np.float32)
          for p, v in flat}


def convert_flax(params: dict, cfg: dict) -> dict:
  """Flax params (flax_params) -> this module's state_dict tensors. Raises ConfigMismatch
  naming the first missing, unexpected or mis-shaped tensor."""
  d, h, kv, dh = cfg['d_model'], cfg['n_heads'], cfg['n_kv_heads'], cfg['head_dim']
  m = cfg['moe']
  used, out = set(), {}

  def get(name, shape):
    if name not in params:
      raise ConfigMismatch(f'checkpoint has no tensor {name!r} that the config needs '
                           f'(n_layers={cfg["n_layers"]}, n_experts={m["n_experts"]}, ...)')
    a = params[name]
    if tuple(a.shape) != tuple(shape):
      raise ConfigMismatch(f'{name}: checkpoint shape {tuple(a.shape)} != {tuple(shape)} '
                           f'expected from the config')
    used.add(name)
    return a

  def mlp(src, dst, hidden):
    out[f'{dst}.gate.weight'] = get(f'{src}.gate', (d, hidden)).T
    out[f'{dst}.up.weight'] = get(f'{src}.up', (d, hidden)).T
    out[f'{dst}.down.weight'] = get(f'{src}.down', (hidden, d)).T

  out['embed.weight'] = get('embed', (cfg['vocab_size'], d))
  if not cfg['tie_embeddings']:
    out['head.weight'] = get('head', (d, cfg['vocab_size'])).T
  out['final_norm.weight'] = get('final_norm.scale', (d,))
  for i in range(cfg['n_layers']):
    p = f'blocks.{i}'
    out[f'{p}.attn_norm.weight'] = get(f'{p}.attn_norm.scale', (d,))
    out[f'{p}.ffn_norm.weight'] = get(f'{p}.ffn_norm.scale', (d,))
    out[f'{p}.attn.q.weight'] = get(f'{p}.attn.q', (d, h, dh)).reshape(d, h * dh).T
    out[f'{p}.attn.k.weight'] = get(f'{p}.attn.k', (d, kv, dh)).reshape(d, kv * dh).T
    out[f'{p}.attn.v.weight'] = get(f'{p}.attn.v', (d, kv, dh)).reshape(d, kv * dh).T
    out[f'{p}.attn.o.weight'] = get(f'{p}.attn.o', (h, dh, d)).reshape(h * dh, d).T
    if not is_moe_layer(cfg, i):
      mlp(f'{p}.ffn', f'{p}.ffn', cfg['d_ff'])
      continue
    e, f = m['n_experts'], m['d_expert']
    out[f'{p}.ffn.router.weight'] = get(f'{p}.ffn.router', (d, e)).T
    gate = get(f'{p}.ffn.gate', (e, d, f)).transpose(0, 2, 1)                # [E, F, D]
    up = get(f'{p}.ffn.up', (e, d, f)).transpose(0, 2, 1)
    out[f'{p}.ffn.gate_up.weight'] = np.stack([gate, up], 1).reshape(e * 2 * f, d)
    down = get(f'{p}.ffn.down', (e, f, d))
    for j in range(e):
      out[f'{p}.ffn.down.{j}.weight'] = down[j].T
    if m['n_shared']:
      mlp(f'{p}.ffn.shared', f'{p}.ffn.shared', m['n_shared'] * m['d_shared'])
    if m['expert_bias']:
      out[f'{p}.ffn.expert_bias'] = get(f'{p}.ffn.expert_bias', (e,))
  extra = sorted(set(params) - used)
  if extra:
    raise ConfigMismatch(f'checkpoint tensors the config does not use: {extra[:5]}'
                         f'{" ..." if len(extra) > 5 else ""} (wrong config for this checkpoint?)')
  arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
  # Arrays read from JAX are read-only; torch wants tensors it may write to.
  return {k: torch.from_numpy(a if a.flags.writeable else a.copy()) for k, a in arrays.items()}


class Grid(NamedTuple):
  """One weight's integers and scales from a QAT checkpoint, in this module's [out, in]
  layout: exactly what the checkpoint's fake-quant forward computed with."""
  q: np.ndarray         # int8 [out, in]
  scales: np.ndarray    # float32 [out, in / G] (G = in for channel-wise)
  scheme: str           # its quant.grid scheme, e.g. 'int4_g32'


class ExpertGrid(NamedTuple):
  """A MoE layer's routed experts on the released MobileMoE's grid (model.quant.
  expert_group_axis='out'): integers [E, in, out] with groups of G along out, the layout the
  MobileMoeBlock op reads with expert_group_axis 'out' (export/moe_op.py writes it as is)."""
  gate_up_q: np.ndarray   # int8 [E, D, 2F]: columns gate then up
  gate_up_s: np.ndarray   # float32 [E, D, 2F/G]
  down_q: np.ndarray      # int8 [E, F, D]
  down_s: np.ndarray      # float32 [E, F, D/G]
  scheme: str             # its quant.grid scheme (block-G INT4)


EXPERT_GRID_FIELDS = ExpertGrid._fields[:-1]


def from_flax(model_or_state, model_cfg) -> MobileMoE:
  """A QAT model (quant.weights set) converts to the weights its forward computes with: each
  quantized weight holds its dequantized integers, and the integers and scales themselves
  ride along as `module.grid` (the exporter writes them into the .tflite unchanged); routed
  experts grouped along their output axis ride along as the MoE's `expert_grid`."""
  cfg = config_dict(model_cfg)
  model = MobileMoE(cfg)
  params = flax_params(model_or_state)
  if not cfg['quant']['weights']:
    model.load_state_dict(convert_flax(params, cfg))
    return model.eval()
  from flax import nnx
  from mobilemoe_jax.quant import extract, grid
  if not isinstance(model_or_state, nnx.Module) or model_or_state.cfg.quant.to_dict() != cfg['quant']:
    raise ConfigMismatch('a QAT config (quant.weights set) converts from the nnx model built '
                         'with that same quant config, not from a bare state or another config')
  params = {k: v for k, v in params.items() if not k.endswith('_scale')}   # learned scales
  deq, ints, scales, off_grid, out_axis = {}, {}, {}, set(), {}
  for path, e in extract.integer_weights(model_or_state).items():
    name = '.'.join(map(str, path))
    q, s = np.asarray(e['q']), np.asarray(e['scales'], np.float32)

    def fold(a, e=e):   # [..., in, out] -> the parameter's own shape (a writable copy)
      return np.array(a.T if e.get('transposed') else a.reshape(e['shape']))

    deq[name] = fold(grid.dequantize(q, s, in_axis=e['axis']))
    ints[name] = fold(q.astype(np.float32))
    # Each group's scale repeated over its members, so the layout change below moves it along.
    scales[name] = fold(np.repeat(s, q.shape[e['axis']] // s.shape[e['axis']], axis=e['axis']))
    if e['axis'] != -2:   # a routed expert weight: its torch names below
      ffn, kind = name.rsplit('.', 1)
      off_grid |= {f'{ffn}.gate_up.weight'} | {f'{ffn}.down.{j}.weight' for j in range(q.shape[0])}
      out_axis.setdefault(ffn, {})[kind] = (q.astype(np.int8), s)
  model.load_state_dict(convert_flax({**params, **deq}, cfg))
  ints, scales = convert_flax({**params, **ints}, cfg), convert_flax({**params, **scales}, cfg)
  # Experts grouped along their output axis (the released MobileMoE's grid) have no TFLite
  # block-wise form (FC groups run along the input): they keep their exact dequantized
  # values here and no `grid` (the portable .tflite requantizes them on its own grid); their
  # integers ride along as the MoE's `expert_grid` for the MobileMoeBlock op.
  for ffn, parts in out_axis.items():
    (gq, gs), (uq, us), (dq, ds) = parts['gate'], parts['up'], parts['down']
    model.get_submodule(ffn).expert_grid = ExpertGrid(
        np.concatenate([gq, uq], -1), np.concatenate([gs, us], -1).astype(np.float32),
        dq, ds.astype(np.float32), cfg['quant']['weights'])
  for name in grid_names(model):
    if name in off_grid:
      continue
    scheme = cfg['quant']['embedding'] if name == 'embed.weight' else cfg['quant']['weights']
    k = ints[name].shape[1]
    group = grid.get_scheme(scheme).group or k
    set_grid(model, name, Grid(ints[name].numpy().astype(np.int8),
                               np.ascontiguousarray(scales[name].numpy()[:, ::group]), scheme))
  return model.eval()


def grid_names(model: MobileMoE) -> list:
  """The weights the .tflite stores as integers: every Linear but the routers, and the
  embedding (which a tied lm_head shares)."""
  return [f'{n}.weight' for n, m in model.named_modules()
          if isinstance(m, nn.Linear) and not n.endswith('router')] + ['embed.weight']


def set_grid(model, name: str, g: Grid):
  model.get_submodule(name.removesuffix('.weight')).grid = g


def grids(model) -> dict:
  """{state_dict name: Grid} of the weights that carry a QAT checkpoint's integers."""
  out = {}
  for name in grid_names(model):
    g = getattr(model.get_submodule(name.removesuffix('.weight')), 'grid', None)
    if g is not None:
      out[name] = g
  return out


def expert_grids(model) -> dict:
  """{MoE module name: ExpertGrid} of the MoE layers that carry out-axis expert integers."""
  return {n: m.expert_grid for n, m in model.named_modules()
          if isinstance(m, MoE) and m.expert_grid is not None}


# ---- files ------------------------------------------------------------------------------

def save(model: MobileMoE, out_dir: str):
  """out_dir/model.safetensors + config.json."""
  from safetensors.torch import save_file
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(out_dir, 'model.safetensors'))
  meta = {'format': FORMAT, 'model': model.cfg}
  exact, experts = grids(model), expert_grids(model)
  if exact or experts:   # a QAT model's integers and scales (learned ones are not recomputable)
    tensors = {f'{n}.{part}': torch.from_numpy(getattr(g, part)) for n, g in exact.items()
               for part in ('q', 'scales')}
    tensors.update({f'{n}.expert_grid.{part}': torch.from_numpy(np.ascontiguousarray(getattr(g, part)))
                    for n, g in experts.items() for part in EXPERT_GRID_FIELDS})
    save_file(tensors, os.path.join(out_dir, GRID_FILE))
    meta['grid'] = {n: g.scheme for n, g in exact.items()}
    meta['expert_grid'] = {n: g.scheme for n, g in experts.items()}
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(meta, f, indent=2)


def load(path: str) -> MobileMoE:
  from safetensors.torch import load_file
  cfg_path, st_path = os.path.join(path, 'config.json'), os.path.join(path, 'model.safetensors')
  for p in (cfg_path, st_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f'{p} is missing (expected a directory written by export.torch_model.save)')
  with open(cfg_path) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise ConfigMismatch(f'{cfg_path}: format {meta.get("format")!r}, expected {FORMAT!r}')
  model = MobileMoE(config_dict(config_lib.upgrade_saved_model(meta['model'], cfg_path)))
  tensors = load_file(st_path)
  want = model.state_dict()
  missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
  if missing or extra:
    raise ConfigMismatch(f'{st_path} does not match config.json: missing {missing[:5]}, '
                         f'unexpected {extra[:5]}')
  for k, v in tensors.items():
    if v.shape != want[k].shape:
      raise ConfigMismatch(f'{k}: shape {tuple(v.shape)} != {tuple(want[k].shape)} from config.json')
  model.load_state_dict(tensors)
  if meta.get('grid') or meta.get('expert_grid'):
    exact = load_file(os.path.join(path, GRID_FILE))
    for name, scheme in meta.get('grid', {}).items():
      set_grid(model, name, Grid(exact[f'{name}.q'].numpy(), exact[f'{name}.scales'].numpy(), scheme))
    for name, scheme in meta.get('expert_grid', {}).items():
      model.get_submodule(name).expert_grid = ExpertGrid(
          *(exact[f'{name}.expert_grid.{part}'].numpy() for part in EXPERT_GRID_FIELDS), scheme)
  return model.eval()
