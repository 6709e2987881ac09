"""The MobileMoE decoder in PyTorch (dense and MoE), the Flax -> PyTorch weight converter,
and the safetensors + config.json format.

Same math as mobilemoe_jax/model (fp32): RMSNorm, half-split RoPE, GQA with an optional
per-layer sliding window, SwiGLU, and the MoE block (fp32 router, softmax/sigmoid scores,
top-k with an optional selection-only bias, norm_topk_prob, routed_scale, fused shared
experts). Written for litert-torch: only ops that lower to plain LiteRT builtins, an external
KV cache updated with dynamic_update_slice, and the routed experts either as

  'portable': every expert computed as FCs and masked by its routing weight (stock LiteRT:
              one FC [E*2F, D] for all gate/up rows, one FC [D, F] per expert for down), or
  'delegate': the whole routed + shared block as one `MobileMoeBlock` custom op whose packed
              INT4 weights follow export/delegate's contract (see moe_op.py).
"""
import json
import math
import os

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mobilemoe_jax import config as config_lib

FORMAT = 'mobilemoe-torch'


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


def rope_tables(head_dim: int, max_len: int, theta: float):
  """cos/sin [max_len, Dh/2] in fp32 (computed in fp64: only the final rounding differs
  from JAX's on-the-fly fp32 angles, ~1e-7)."""
  half = head_dim // 2
  freq = theta ** (-np.arange(half, dtype=np.float64) / half)
  angle = np.arange(max_len, dtype=np.float64)[:, None] * freq
  return (torch.tensor(np.cos(angle), dtype=torch.float32),
          torch.tensor(np.sin(angle), dtype=torch.float32))


def apply_rope(x, cos, sin):
  """x [B, T, H, Dh]; cos/sin [T, Dh/2]: the half-split convention."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = cos[None, :, None], sin[None, :, None]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def update_cache(cache, new, pos0):
  """cache [B, S, K, Dh] with new [B, T, K, Dh] written at slots pos0..pos0+T-1.
  When exporting, litert-torch's dynamic_update_slice (one DYNAMIC_UPDATE_SLICE op);
  eagerly a plain index_copy, so PyTorch use never imports litert-torch."""
  if not torch.compiler.is_exporting():
    slots = pos0.long() + torch.arange(new.shape[1])
    return cache.index_copy(1, slots, new)
  from export import keep_jax_x64
  with keep_jax_x64():   # litert_torch turns on jax_enable_x64 process-wide when imported
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice
  zero = torch.zeros([], dtype=torch.int32)
  return dynamic_update_slice(cache, new, [zero, pos0.reshape([]), zero, zero])


class Attention(nn.Module):
  def __init__(self, cfg, window):
    super().__init__()
    d, h, kv, dh = cfg['d_model'], cfg['n_heads'], cfg['n_kv_heads'], cfg['head_dim']
    self.h, self.kv, self.dh, self.window = h, kv, dh, window
    self.q = nn.Linear(d, h * dh, bias=False)
    self.k = nn.Linear(d, kv * dh, bias=False)
    self.v = nn.Linear(d, kv * dh, bias=False)
    self.o = nn.Linear(h * dh, d, bias=False)

  def forward(self, x, pos, cos, sin, cache=None):
    """x [B, T, D]; pos [T] int positions; cache (k, v) [B, S, K, Dh] or None.
    Returns (y, new cache)."""
    b, t, _ = x.shape
    q = apply_rope(self.q(x).view(b, t, self.h, self.dh), cos, sin)
    k = apply_rope(self.k(x).view(b, t, self.kv, self.dh), cos, sin)
    v = self.v(x).view(b, t, self.kv, self.dh)
    if cache is None:
      k_pos = pos
    else:
      k = update_cache(cache[0], k, pos[0])
      v = update_cache(cache[1], v, pos[0])
      cache = (k, v)
      k_pos = torch.arange(k.shape[1], dtype=pos.dtype)
    # Causal, within the window; cache slots past the query are unwritten or stale.
    diff = pos[:, None] - k_pos[None, :]                                   # [T, S]
    visible = diff >= 0
    if self.window:
      visible = visible & (diff < self.window)
    rep = self.h // self.kv                      # query head i reads kv head i // rep
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum('bthd,bshd->bhts', q, k) / math.sqrt(self.dh)
    scores = scores.masked_fill(~visible, float('-inf'))
    y = torch.einsum('bhts,bshd->bthd', scores.softmax(-1), v)
    return self.o(y.reshape(b, t, self.h * self.dh)), cache


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
    self.attn = Attention(cfg, layer_window(cfg, layer))
    self.ffn_norm = RMSNorm(cfg['d_model'], cfg['norm_eps'])
    self.ffn = MoE(cfg) if is_moe_layer(cfg, layer) else MLP(cfg['d_model'], cfg['d_ff'])

  def forward(self, x, pos, cos, sin, cache=None):
    h, cache = self.attn(self.attn_norm(x), pos, cos, sin, cache)
    x = x + h
    return x + self.ffn(self.ffn_norm(x)), cache


class MobileMoE(nn.Module):
  """tokens [B, T] int -> logits [B, T, V] (and the updated KV cache when given one)."""

  def __init__(self, cfg: dict):
    super().__init__()
    self.cfg = cfg
    self.embed = nn.Embedding(cfg['vocab_size'], cfg['d_model'])
    self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg['n_layers'])])
    self.final_norm = RMSNorm(cfg['d_model'], cfg['norm_eps'])
    self.head = None if cfg['tie_embeddings'] else nn.Linear(cfg['d_model'], cfg['vocab_size'], bias=False)
    cos, sin = rope_tables(cfg['head_dim'], cfg['max_seq_len'], cfg['rope_theta'])
    self.register_buffer('rope_cos', cos, persistent=False)
    self.register_buffer('rope_sin', sin, persistent=False)

  def forward(self, tokens, input_pos=None, kv_cache=None):
    """input_pos [T]: positions of the tokens (= cache slots; contiguous).
    kv_cache: list of (k, v) [B, S, K, Dh] per layer, or None for a plain forward."""
    if input_pos is None:
      input_pos = torch.arange(tokens.shape[1], dtype=torch.int32)
    cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
    x = self.embed(tokens)
    new_cache = []
    for i, block in enumerate(self.blocks):
      x, c = block(x, input_pos, cos, sin, None if kv_cache is None else kv_cache[i])
      new_cache.append(c)
    x = self.final_norm(x)
    logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
    return logits if kv_cache is None else (logits, new_cache)

  def empty_cache(self, batch: int, max_len: int):
    shape = (batch, max_len, self.cfg['n_kv_heads'], self.cfg['head_dim'])
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in self.blocks]

  def set_moe_lowering(self, lowering: str, group_size: int = 32):
    """'portable' or 'delegate' (the latter packs INT4 weights for the custom op)."""
    if lowering not in ('portable', 'delegate'):
      raise ValueError(f"unknown MoE lowering {lowering!r}: 'portable' or 'delegate'")
    from export import moe_op
    for b in self.blocks:
      if isinstance(b.ffn, MoE):
        b.ffn.lowering = lowering
        if lowering == 'delegate':
          b.ffn.op = moe_op.MoeBlockOp(b.ffn, group_size)
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
  if (cfg.get('quant') or {}).get('learnable_scale'):
    # ai-edge-quantizer recomputes max-abs scales from the weights it is given, so learned
    # (LSQ) scales would not survive into the .tflite: refuse rather than export silently
    # different integers.
    raise ConfigMismatch('checkpoint trained with quant.learnable_scale (LSQ): the exporter '
                         'writes max-abs scales and cannot keep learned ones yet')
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
  return {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in out.items()}


def from_flax(model_or_state, model_cfg) -> MobileMoE:
  cfg = config_dict(model_cfg)
  model = MobileMoE(cfg)
  model.load_state_dict(convert_flax(flax_params(model_or_state), cfg))
  return model.eval()


# ---- files ------------------------------------------------------------------------------

def save(model: MobileMoE, out_dir: str):
  """out_dir/model.safetensors + config.json."""
  from safetensors.torch import save_file
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(out_dir, 'model.safetensors'))
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump({'format': FORMAT, 'model': model.cfg}, f, indent=2)


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
  model = MobileMoE(config_dict(meta['model']))
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
  return model.eval()
