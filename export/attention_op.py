"""The 'delegate' attention lowering: one `MobileKvAttention` custom op per layer in every
signature (decode and each prefill_<T>), run by export/delegate, which reads only the cache
slots that hold tokens and, among the new tokens, only the causal ones (the portable graph
reads all cache slots in every layer and masks).

Contract (export/delegate's attention kernel implements exactly this):
  inputs  0 q [1, T, H, Dh] f32 (after RoPE), 1 k_new [1, T, K, Dh] f32 (after RoPE, and
          after the int8 qdq with an int8 KV cache: the rows the layer returns),
          2 v_new [1, T, K, Dh], 3 k_cache [1, K, P, Dh], 4 v_cache [1, K, Dh, P]
          (torch_model's cache layouts), 5 input_pos [T] int32 (contiguous; cache slots
          < input_pos[0] hold the earlier tokens, later slots are ignored).
  output  y [1, T, H*Dh] f32: query head h reads kv head h // (H/K), heads concatenated
          (the tensor Attention.forward feeds to its output projection).
  options (flexbuffer map) num_heads, num_kv_heads, head_dim, window (0 = global),
          scale (1/sqrt(Dh)).
Token t at p_t = pos[t] sees cache slots s < pos[0] with (window == 0 or p_t - s < window)
and new tokens j <= t with (window == 0 or p_t - p_j < window); softmax(scores * scale),
then the weighted sum of the values.

Emitted like moe_op's MobileMoeBlock: a torch custom op (its PyTorch body is the fp32
reference) with a litert-torch lowering to `tfl.custom`.
"""
import json
import math

import torch

from export.delegate import contract
from export.moe_op import lower_to_custom

OP_NAME = contract.ATTENTION.name
# Calls with more tokens than the op takes keep the portable matmuls.
MAX_TOKENS = contract.ATTENTION.max_tokens


def options(num_heads: int, num_kv_heads: int, head_dim: int, window: int) -> dict:
  return {'num_heads': int(num_heads), 'num_kv_heads': int(num_kv_heads),
          'head_dim': int(head_dim), 'window': int(window),
          'scale': 1.0 / math.sqrt(head_dim)}


@torch.library.custom_op('mobilemoe::kv_attention', mutates_args=())
def kv_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, input_pos: torch.Tensor,
                 options: str) -> torch.Tensor:
  """Reference math (fp32), written per KV head from the contract (not torch_model's
  grouped matmuls, so the two check each other)."""
  o = json.loads(options)
  h, kv, dh, window, scale = (o['num_heads'], o['num_kv_heads'], o['head_dim'], o['window'],
                              o['scale'])
  _, t = q.shape[:2]
  p = k_cache.shape[2]
  pos = input_pos.to(torch.int64)
  slot = torch.arange(p)
  d_past = pos[:, None] - slot[None, :]                                    # [T, P]
  d_new = pos[:, None] - pos[None, :]                                      # [T, T]
  see_past = slot[None, :] < pos[0]
  see_new = d_new >= 0
  if window:
    see_past = see_past & (d_past < window)
    see_new = see_new & (d_new < window)
  mask = torch.cat([see_past.expand(t, p), see_new], -1)                   # [T, P+T]
  ys = []
  for head in range(h):
    g = head // (h // kv)
    keys = torch.cat([k_cache[0, g], k_new[0, :, g]], 0)                   # [P+T, Dh]
    vals = torch.cat([v_cache[0, g].T, v_new[0, :, g]], 0)                 # [P+T, Dh]
    s = (q[0, :, head] @ keys.T) * scale                                   # [T, P+T]
    w = s.masked_fill(~mask, float('-inf')).softmax(-1)
    ys.append(w @ vals)                                                    # [T, Dh]
  return torch.cat(ys, -1)[None]                                           # [1, T, H*Dh]


@kv_attention.register_fake
def _(q, k_new, v_new, k_cache, v_cache, input_pos, options):
  return q.new_empty((q.shape[0], q.shape[1], q.shape[2] * q.shape[3]))


lower_to_custom(torch.ops.mobilemoe.kv_attention, OP_NAME)
