"""Exact accounting for a model config: parameters, FLOPs, INT4 bytes, KV-cache bytes.

Counted from the config alone (no arrays), so it works for 5B-parameter presets on a
laptop; tests check the parameter counts against the real parameter tree.

Conventions (written once, used everywhere):
- parameters are every weight of the model: matmuls, the embedding (once when tied), norm
  scales, routers [E, D] and expert biases [E] (selection-only, but a real tensor of the
  released checkpoints). QK-norm has no weights.
- *active* parameters are those touched by one token: everything except the routed
  experts a token does not choose. The (tied) embedding counts once, as the LM head
  is a full matmul over it for every token.
- forward FLOPs per token = 2 x (matmul weights used) + attention score/value FLOPs
  (4 x heads x head_dim x visible context per layer, context capped by the window).
  Training FLOPs per token = 3 x forward.
- INT4 weight bytes: every matmul weight and the embedding in symmetric INT4 with one
  fp16 scale (SCALE_BYTES) per group of 32 values (0.5 + 2/32 bytes per weight; groups along
  the input or the output axis count the same where dimensions are multiples of 32); routers,
  expert biases and norms stay fp32. This is the layout the exporter writes.
- Latency (a roofline, nothing finer): a decode step at batch 1 is memory-bound, so it
  takes (active INT4 weight bytes + KV-cache bytes read) / bandwidth; prefill is
  compute-bound, so it takes its FLOPs / compute rate. The two constants are placeholders
  (ASSUMED_DEVICE) unless the caller loads a benchmark record (`load_device(path)`; the search
  CLI's --device_json, e.g. bench/results/ondevice.json).
"""
import dataclasses
import json
import os

from mobilemoe_jax import config as config_lib

INT4_GROUP = 32
SCALE_BYTES = 2


@dataclasses.dataclass
class Counts:
  total_params: int
  active_params: int
  embedding_params: int
  routed_expert_params: int      # all routed experts of all layers
  matmul_params_active: int      # weights a token multiplies by (head included)
  fp32_params: int               # routers + expert biases + norms, kept in float on device


def _layer_params(cfg, layer):
  d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  attn = d * h * dh * 2 + d * kv * dh * 2
  norms = 2 * d
  if config_lib.is_moe_layer(cfg, layer):
    m = cfg.moe
    router = d * m.n_experts + (m.n_experts if m.expert_bias else 0)
    routed = m.n_experts * 3 * d * m.d_expert
    routed_active = m.top_k * 3 * d * m.d_expert
    shared = 3 * d * m.n_shared * m.d_shared
    return dict(matmul=attn + shared + routed, matmul_active=attn + shared + routed_active,
                routed=routed, fp32=norms + router)
  ffn = 3 * d * cfg.d_ff
  return dict(matmul=attn + ffn, matmul_active=attn + ffn, routed=0, fp32=norms)


def count(cfg) -> Counts:
  config_lib.validate(cfg)
  return _count(cfg)


def _count(cfg) -> Counts:
  """`count` without validation, for the architecture search: it calls this ~10^5 times
  on shapes valid by construction, and validation costs ~30x the counting."""
  layers = [_layer_params(cfg, i) for i in range(cfg.n_layers)]
  emb = cfg.vocab_size * cfg.d_model
  head = 0 if cfg.tie_embeddings else emb
  fp32 = sum(l['fp32'] for l in layers) + cfg.d_model
  total = emb + head + fp32 + sum(l['matmul'] for l in layers)
  routed = sum(l['routed'] for l in layers)
  inactive = sum(l['matmul'] - l['matmul_active'] for l in layers)
  # The LM head is a [D, V] matmul for every token (the tied embedding or its own weight).
  matmul_active = sum(l['matmul_active'] for l in layers) + emb
  return Counts(total_params=total, active_params=total - inactive, embedding_params=emb + head,
                routed_expert_params=routed, matmul_params_active=matmul_active,
                fp32_params=fp32)


def visible_context(cfg, layer: int, context: int) -> int:
  window = 0 if config_lib.is_global_layer(cfg, layer) else cfg.sliding_window
  return min(context, window) if window else context


def attention_flops_per_token(cfg, context: int) -> int:
  """QK^T and AV for one token attending to `context` earlier tokens, all layers."""
  per = 4 * cfg.n_heads * cfg.head_dim
  return sum(per * visible_context(cfg, i, context) for i in range(cfg.n_layers))


def forward_flops_per_token(cfg, context: int) -> int:
  c = count(cfg)
  router = sum(2 * cfg.d_model * cfg.moe.n_experts for i in range(cfg.n_layers)
               if config_lib.is_moe_layer(cfg, i))
  return 2 * c.matmul_params_active + router + attention_flops_per_token(cfg, context)


def train_flops_per_token(cfg, context: int) -> int:
  """Forward + backward (2x forward), attention averaged over a causal sequence of `context`."""
  return 3 * forward_flops_per_token(cfg, context // 2)


def int4_bytes(n_params: int, group: int = INT4_GROUP) -> int:
  return n_params // 2 + -(-n_params // group) * SCALE_BYTES


def int4_weight_bytes(cfg, group: int = INT4_GROUP) -> int:
  """Bytes of the INT4 model on device: quantised matmuls + embedding, fp32 router/norms."""
  c = count(cfg)
  return int4_bytes(c.total_params - c.fp32_params, group) + 4 * c.fp32_params


def active_int4_bytes_per_token(cfg, group: int = INT4_GROUP) -> int:
  """Weight bytes one decode step reads: active matmuls (head included), router, norms."""
  c = count(cfg)
  return int4_bytes(c.matmul_params_active, group) + 4 * c.fp32_params


def kv_cache_bytes(cfg, context: int, bytes_per_value: int = 2) -> int:
  """K and V of every layer for `context` tokens; windowed layers keep only the window."""
  per_token = 2 * cfg.n_kv_heads * cfg.head_dim * bytes_per_value
  return sum(per_token * visible_context(cfg, i, context) for i in range(cfg.n_layers))


# ---------------------------------------------------------------------------------------
# Everything at once, and the latency model.

@dataclasses.dataclass(frozen=True)
class DeviceModel:
  """The two constants of the roofline latency model."""
  bandwidth: float   # bytes/s of weights streamed from DRAM during decode (sustained)
  compute: float     # FLOP/s sustained during prefill
  source: str        # where the numbers came from; printed next to every latency

# Placeholders, NOT measurements: the order of a 2024 flagship phone (LPDDR5X peak ~77 GB/s,
# of which decode sustains roughly half; ~1 TFLOP/s of INT4/INT8 matmul on CPU+NPU).
# Latencies from these are only good for ranking configs against each other.
ASSUMED_DEVICE = DeviceModel(bandwidth=40e9, compute=1e12, source='assumed (no ondevice.json)')
def load_device(path: str) -> DeviceModel:
  """The latency constants from a benchmark record when one exists, else the placeholders.

  Two layouts are read:
  - explicit rates: {"decode_bytes_per_s": ..., "prefill_flops_per_s": ..., "device": ...};
  - `bench/ondevice.py`'s record: the MoE-block rows of method "delegate". Decode rate =
    "active_bytes_per_token_per_block" / the T=1 median time (an *effective* rate: it includes
    whatever compute overhead the kernel has, which is what a latency estimate needs); prefill
    rate = the block's matmul + router FLOPs per token x T / the largest-T median time. A
    decode rate above the record's "dram_read_gbps" is capped at it.
  """
  if not os.path.exists(path):
    return ASSUMED_DEVICE
  with open(path) as f:
    rec = json.load(f)
  name = rec.get('device') or rec.get('machine', {}).get('cpu', 'unnamed device')
  if 'decode_bytes_per_s' in rec and 'prefill_flops_per_s' in rec:
    return DeviceModel(bandwidth=float(rec['decode_bytes_per_s']),
                       compute=float(rec['prefill_flops_per_s']), source=f'{path} ({name})')
  rows = [r for r in rec.get('rows', []) if r.get('method') == 'delegate' and r.get('per') == 'block']
  if 'active_bytes_per_token_per_block' in rec and 'block' in rec and rows:
    b = rec['block']
    decode = min(rows, key=lambda r: r['T'])
    prefill = max(rows, key=lambda r: r['T'])
    flops = 2 * (b['top_k'] * 3 * b['d_expert'] + 3 * b['d_shared']) * b['d_model'] \
        + 2 * b['num_experts'] * b['d_model']
    bandwidth = rec['active_bytes_per_token_per_block'] / (decode['median_ms'] / 1e3)
    note = 'delegate medians'
    dram = rec.get('dram_read_gbps')
    if dram and bandwidth > dram * 1e9:
      # Faster than DRAM can deliver: the benchmark's weights were partly in cache. A whole
      # model is not, so the measured DRAM read rate is the honest bound.
      bandwidth, note = dram * 1e9, 'decode capped at the measured DRAM read rate'
    return DeviceModel(bandwidth=bandwidth,
                       compute=flops * prefill['T'] / (prefill['median_ms'] / 1e3),
                       source=f"{path} (MoE-block benchmark on {name}, {note})")
  raise ValueError(f'{path}: neither decode_bytes_per_s/prefill_flops_per_s nor a bench/ondevice.py '
                   'record with delegate rows; see accounting.load_device')


def decode_seconds(cfg, device: DeviceModel = ASSUMED_DEVICE, context: int = 0) -> float:
  """One decoded token at batch 1: the weights it uses plus `context` tokens of KV cache
  are read once from DRAM; at phone bandwidths that read dominates the arithmetic."""
  read = active_int4_bytes_per_token(cfg) + kv_cache_bytes(cfg, context)
  return read / device.bandwidth


def prefill_seconds(cfg, n_tokens: int, device: DeviceModel = ASSUMED_DEVICE) -> float:
  """A prompt of `n_tokens`: its forward FLOPs (attention averaged over the causal prompt)
  at the device's compute rate."""
  return n_tokens * forward_flops_per_token(cfg, n_tokens // 2) / device.compute


@dataclasses.dataclass(frozen=True)
class Costs:
  """Every number the scaling tools need for one config, from a single count."""
  total_params: int
  active_params: int
  embedding_params: int
  forward_flops: int           # per token at `context`
  int4_bytes: int              # whole model on device
  active_int4_bytes: int       # read per decoded token
  kv_bytes: int                # at `context`
  decode_s: float              # per token at `context`
  context: int


def costs(cfg, context: int = 2048, device: DeviceModel = ASSUMED_DEVICE,
          check: bool = True) -> Costs:
  """The same numbers as the functions above (tests hold them equal), computed with one
  count. `check=False` skips validation; only for shapes valid by construction."""
  c = count(cfg) if check else _count(cfg)
  router = sum(2 * cfg.d_model * cfg.moe.n_experts for i in range(cfg.n_layers)
               if config_lib.is_moe_layer(cfg, i))
  flops = 2 * c.matmul_params_active + router + attention_flops_per_token(cfg, context)
  weights = int4_bytes(c.total_params - c.fp32_params) + 4 * c.fp32_params
  active = int4_bytes(c.matmul_params_active) + 4 * c.fp32_params
  kv = kv_cache_bytes(cfg, context)
  return Costs(total_params=c.total_params, active_params=c.active_params,
               embedding_params=c.embedding_params, forward_flops=flops, int4_bytes=weights,
               active_int4_bytes=active, kv_bytes=kv, decode_s=(active + kv) / device.bandwidth,
               context=context)
