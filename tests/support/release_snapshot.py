"""Synthetic released-MobileMoE snapshots, and their weights read back independently.

Written from shared/notes/mobilemoe_release.md alone (§1 config.json, §3 tensors and the
INT4 packing contract), not from mobilemoe_jax/convert, so the importer is checked against
the notes. `write_snapshot` writes config.json + model.safetensors of any (tiny) shape in
exactly the released layout, with random integers and fp16 scales (QAT) or random bf16
weights (the Base/SFT hypothesis, §3.3). `dequantized` reads a snapshot back with the
safetensors library into float64 release-layout weights, which the notes' numpy forward
(tests/support/release.py, reference_logits) runs on.

  from tests.support.release_snapshot import write_snapshot
  write_snapshot('/tmp/snap', layout='qat', **TINY)
"""
import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

# A tiny shape with everything the release has (GQA, several experts, top-k > 1, shared
# expert, RoPE scaling that bites at these lengths) and one NoPE layer.
TINY = dict(vocab=96, hidden=64, layers=3, heads=4, kv_heads=2, head_dim=16, experts=6, top_k=2,
            d_expert=32, d_shared=64, nope=(1,), rope_original=16, rope_factor=4.0)
# Llama-3 style side files carried through import and export (contents are placeholders).
SIDE_FILES = {'tokenizer_config.json': '{"bos_token": "<|begin_of_text|>"}\n',
              'generation_config.json': '{"bos_token_id": 128000, "eos_token_id": [128001, 128008]}\n'}


def config_dict(*, vocab, hidden, layers, heads, kv_heads, head_dim, experts, top_k, d_expert,
                d_shared, nope=(), rope_original=8192, rope_factor=16.0, low=1.0, high=1.0,
                layout='qat', every=1):
  """config.json of the release (§1.1) for these dims; `quantization` (§1.2) for QAT."""
  cfg = {
      'architectures': ['MobileMoEForCausalLM'], 'model_type': 'mobilemoe',
      'vocab_size': vocab, 'hidden_size': hidden, 'intermediate_size': d_expert,
      'intermediate_size_mlp': d_shared, 'num_hidden_layers': layers,
      'num_attention_heads': heads, 'num_key_value_heads': kv_heads, 'head_dim': head_dim,
      'num_local_experts': experts, 'num_experts_per_tok': top_k,
      'interleave_moe_layer_step': every, 'no_rope_layers': [0 if i in nope else 1 for i in range(layers)],
      'layer_types': ['full_attention'] * layers, 'use_qk_norm': True,
      'attn_temperature_tuning': False, 'rope_theta': 500000.0,
      'rope_scaling': {'rope_type': 'llama3', 'factor': rope_factor,
                       'original_max_position_embeddings': rope_original,
                       'low_freq_factor': low, 'high_freq_factor': high},
      'max_position_embeddings': rope_original, 'rms_norm_eps': 1e-05, 'hidden_act': 'silu',
      'attention_bias': False, 'attention_dropout': 0.0, 'routed_scaling_factor': 2.5,
      'norm_topk_prob': True, 'tie_word_embeddings': True, 'torch_dtype': 'bfloat16',
      'bos_token_id': 128000, 'eos_token_id': [128001, 128008],
  }
  if layout == 'qat':
    cfg['quantization'] = {
        'format': 'mobilemoe-int4-g32', 'group_size': 32, 'embedding_group_size': 32,
        'qmin': -8, 'qmax': 7, 'symmetric': True, 'packed': True, 'scale_dtype': 'float16',
        'linear_group_axis': 'in (last dim of [out, in])',
        'expert_group_axis': 'out (last dim of [E, in, out])'}
  return cfg


def pack_nibbles(q: np.ndarray) -> np.ndarray:
  """int values in [-8, 7], [..., K] -> uint8 [..., K/2]: element 2j in the low nibble."""
  u = (q.astype(np.int16) & 0xF).astype(np.uint8)
  return u[..., 0::2] | (u[..., 1::2] << 4)


def float_shapes(c: dict) -> dict:
  """{name: shape} of the float view of every weight (§3.1 with §3.3's float names)."""
  h, q, k = c['hidden_size'], c['num_attention_heads'] * c['head_dim'], c['num_key_value_heads'] * c['head_dim']
  e, i_, s = c['num_local_experts'], c['intermediate_size'], c['intermediate_size_mlp']
  out = {'model.embed_tokens.weight': (c['vocab_size'], h), 'model.norm.weight': (h,)}
  for n in range(c['num_hidden_layers']):
    p = f'model.layers.{n}.'
    out.update({p + 'input_layernorm.weight': (h,), p + 'post_attention_layernorm.weight': (h,),
                p + 'self_attn.q_proj.weight': (q, h), p + 'self_attn.k_proj.weight': (k, h),
                p + 'self_attn.v_proj.weight': (k, h), p + 'self_attn.o_proj.weight': (h, q),
                p + 'feed_forward.router.weight': (e, h), p + 'feed_forward.expert_bias': (e,),
                p + 'feed_forward.experts.gate_up_proj': (e, h, 2 * i_),
                p + 'feed_forward.experts.down_proj': (e, i_, h),
                p + 'feed_forward.shared_expert.gate_proj.weight': (s, h),
                p + 'feed_forward.shared_expert.up_proj.weight': (s, h),
                p + 'feed_forward.shared_expert.down_proj.weight': (h, s)})
  return out


def _packed_name(name: str) -> tuple[str, str]:
  if '.experts.' in name:
    base = name[:-len('_proj')]
    return base + '_qweight', base + '_scale'
  base = name[:-len('.weight')]
  return base + '.qweight', base + '.weight_scale'


def tensors(c: dict, layout: str, seed: int = 0) -> dict:
  """{file tensor name: array} of a random checkpoint of config `c` in `layout`."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in float_shapes(c).items():
    if name.endswith('norm.weight'):
      out[name] = rng.uniform(0.5, 1.5, shape).astype(ml_dtypes.bfloat16)
    elif name.endswith('expert_bias'):
      out[name] = rng.normal(0, 0.05, shape).astype(ml_dtypes.bfloat16)
    elif name.endswith('router.weight'):
      out[name] = rng.normal(0, 0.2, shape).astype(np.float32)
    elif layout == 'qat':
      qname, sname = _packed_name(name)
      out[qname] = pack_nibbles(rng.integers(-8, 8, shape))
      out[sname] = rng.uniform(0.004, 0.02, shape[:-1] + (shape[-1] // 32,)).astype(np.float16)
    else:
      out[name] = rng.normal(0, 0.05, shape).astype(ml_dtypes.bfloat16)
  return out


def write_snapshot(path: str, *, layout: str = 'qat', seed: int = 0, side_files: bool = True,
                   **dims) -> dict:
  """Writes config.json and model.safetensors (+ side files) of a random checkpoint; returns
  the config dict. dims: config_dict's keyword arguments (e.g. **TINY)."""
  os.makedirs(path, exist_ok=True)
  cfg = config_dict(layout=layout, **dims)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(cfg, f, indent=2)
  save_file(tensors(cfg, layout, seed), os.path.join(path, 'model.safetensors'),
            metadata={'format': 'pt'})
  if side_files:
    for name, text in SIDE_FILES.items():
      with open(os.path.join(path, name), 'w') as f:
        f.write(text)
  return cfg


# ---- reading back ---------------------------------------------------------------------------

def dequantized(path: str) -> dict:
  """{float name: float64 array} of a snapshot: q * scale for packed tensors (§3.2)."""
  with open(os.path.join(path, 'config.json')) as f:
    c = json.load(f)
  t = load_file(os.path.join(path, 'model.safetensors'))
  out = {}
  for name in float_shapes(c):
    if name in t:
      out[name] = t[name].astype(np.float64)
      continue
    qname, sname = _packed_name(name)
    p = t[qname]
    lo, hi = (p & 0xF).astype(np.int64), (p >> 4).astype(np.int64)
    q = np.stack([lo, hi], -1).reshape(*p.shape[:-1], -1)
    q = np.where(q >= 8, q - 16, q)
    out[name] = q * np.repeat(t[sname].astype(np.float64), 32, axis=-1)
  return out
