"""Hugging Face transformers interop, native classes only (no remote code).

Which configs map exactly:
  dense, no sliding window      -> LlamaForCausalLM (same RMSNorm, half-split RoPE, GQA, SwiGLU).
  dense, sliding window         -> Qwen2ForCausalLM with per-layer `layer_types`; Qwen2 always
                                   has q/k/v biases, written as zeros (adding 0 is exact).
                                   Llama/Mistral cannot mix global and windowed layers.
  MoE, softmax scores, routed_scale 1, no expert bias
                                -> Qwen2MoeForCausalLM: `mlp_only_layers` = our first dense
                                   layers, norm_topk_prob as ours, qkv_bias off. Its shared
                                   expert is scaled by sigmoid(gate(x)); we write a zero gate
                                   (sigmoid(0) = 0.5 exactly) and the shared down weights
                                   times 2, so the product is exactly ours.
  MoE with sigmoid scores, an expert (selection) bias or routed_scale != 1: refused. Those
  are DeepSeek-V3 routing, but transformers' DeepseekV3 uses MLA attention, which cannot
  express GQA exactly; Qwen2/3-MoE and OLMoE route with softmax only and no bias/scale.
HF -> ours is implemented for the dense case (import_dense).

Every directory carries its tokenizer (mobilemoe_jax.data.tokenizer.write_tokenizer_files:
tokenizer.json, tokenizer_config.json with the chat template, special_tokens_map.json) and
bos/eos/pad ids in config.json and generation_config.json.
"""
import os

import numpy as np
import torch

from export import torch_model
from mobilemoe_jax.data import tokenizer as tokenizer_lib


class Unsupported(ValueError):
  """A config with no exact native transformers equivalent."""


def _layer_types(cfg):
  return ['full_attention' if torch_model.layer_window(cfg, i) == 0 else 'sliding_attention'
          for i in range(cfg['n_layers'])]


def hf_config(cfg: dict):
  import transformers
  m = cfg['moe']
  common = dict(vocab_size=cfg['vocab_size'], hidden_size=cfg['d_model'],
                num_hidden_layers=cfg['n_layers'], num_attention_heads=cfg['n_heads'],
                num_key_value_heads=cfg['n_kv_heads'], head_dim=cfg['head_dim'],
                rms_norm_eps=cfg['norm_eps'], max_position_embeddings=cfg['max_seq_len'],
                tie_word_embeddings=cfg['tie_embeddings'], hidden_act='silu',
                rope_parameters={'rope_type': 'default', 'rope_theta': cfg['rope_theta']},
                dtype='float32')
  # Attention features no native transformers class computes (the released MobileMoE has
  # all three: export it with `python -m mobilemoe_jax.convert export` instead).
  unsupported = [why for on, why in (
      (cfg.get('qk_norm'), 'qk_norm (a weightless QK RMS norm)'),
      (cfg.get('nope_layers'), f"nope_layers={list(cfg.get('nope_layers') or ())}"),
      ((cfg.get('rope_scaling') or {}).get('kind', 'none') != 'none',
       f"rope_scaling={(cfg.get('rope_scaling') or {}).get('kind')!r}")) if on]
  if unsupported:
    raise Unsupported('no native transformers class computes this attention exactly: '
                      + '; '.join(unsupported))
  windowed = bool(cfg['sliding_window']) and 'sliding_attention' in _layer_types(cfg)
  sliding = dict(use_sliding_window=True, sliding_window=cfg['sliding_window'],
                 max_window_layers=cfg['n_layers'], layer_types=_layer_types(cfg)) if windowed else {}
  if not m['n_experts']:
    if not windowed:
      return transformers.LlamaConfig(intermediate_size=cfg['d_ff'], attention_bias=False,
                                      mlp_bias=False, **common)
    return transformers.Qwen2Config(intermediate_size=cfg['d_ff'], **sliding, **common)
  why = []
  if m['score_func'] != 'softmax':
    why.append(f"score_func={m['score_func']!r} (Qwen2-MoE routes with softmax)")
  if m['expert_bias']:
    why.append('expert_bias (a selection-only bias: DeepSeek-V3 routing, whose transformers '
               'class uses MLA attention, not GQA)')
  if m['routed_scale'] != 1.0:
    why.append(f"routed_scale={m['routed_scale']} (no routed scaling in Qwen2-MoE)")
  if why:
    raise Unsupported('no native transformers class computes this MoE exactly: ' + '; '.join(why))
  return transformers.Qwen2MoeConfig(
      intermediate_size=cfg['d_ff'], moe_intermediate_size=m['d_expert'],
      shared_expert_intermediate_size=max(m['n_shared'] * m['d_shared'], 1),
      num_experts=m['n_experts'], num_experts_per_tok=m['top_k'],
      norm_topk_prob=m['norm_topk_prob'], decoder_sparse_step=m.get('every', 1),
      mlp_only_layers=list(range(m['first_dense'])), qkv_bias=False,
      output_router_logits=False, **sliding, **common)


def state_dict(model: torch_model.MobileMoE, hf_model) -> dict:
  """Our weights under the HF model's names (biases and gates it has and we lack: zero)."""
  cfg, ours = model.cfg, model.state_dict()
  sd = {k: torch.zeros_like(v) for k, v in hf_model.state_dict().items()}
  sd['model.embed_tokens.weight'] = ours['embed.weight']
  sd['model.norm.weight'] = ours['final_norm.weight']
  if not cfg['tie_embeddings']:
    sd['lm_head.weight'] = ours['head.weight']
  elif 'lm_head.weight' in sd:
    sd['lm_head.weight'] = ours['embed.weight']
  for i in range(cfg['n_layers']):
    o, h = f'blocks.{i}', f'model.layers.{i}'
    sd[f'{h}.input_layernorm.weight'] = ours[f'{o}.attn_norm.weight']
    sd[f'{h}.post_attention_layernorm.weight'] = ours[f'{o}.ffn_norm.weight']
    for a in 'qkvo':
      sd[f'{h}.self_attn.{a}_proj.weight'] = ours[f'{o}.attn.{a}.weight']
    if not torch_model.is_moe_layer(cfg, i):
      for p in ('gate', 'up', 'down'):
        sd[f'{h}.mlp.{p}_proj.weight'] = ours[f'{o}.ffn.{p}.weight']
      continue
    e, f, d = cfg['moe']['n_experts'], cfg['moe']['d_expert'], cfg['d_model']
    sd[f'{h}.mlp.gate.weight'] = ours[f'{o}.ffn.router.weight']
    gu = ours[f'{o}.ffn.gate_up.weight'].view(e, 2 * f, d)       # per expert: gate rows, up rows
    down = torch.stack([ours[f'{o}.ffn.down.{j}.weight'] for j in range(e)])
    _set_experts(sd, f'{h}.mlp.experts', gu, down)
    if cfg['moe']['n_shared']:
      for p in ('gate', 'up'):
        sd[f'{h}.mlp.shared_expert.{p}_proj.weight'] = ours[f'{o}.ffn.shared.{p}.weight']
      # sigmoid(0) = 0.5 exactly; twice the down weights undoes it exactly.
      sd[f'{h}.mlp.shared_expert.down_proj.weight'] = 2 * ours[f'{o}.ffn.shared.down.weight']
  return sd


def _set_experts(sd, prefix, gate_up, down):
  """Fused expert tensors ([E, 2F, D] gate_up, [E, D, F] down, transformers 5) or one
  module per expert (older layouts)."""
  f = gate_up.shape[1] // 2
  if f'{prefix}.gate_up_proj' in sd:
    want = sd[f'{prefix}.gate_up_proj'].shape
    sd[f'{prefix}.gate_up_proj'] = gate_up if want == gate_up.shape else gate_up.transpose(1, 2)
    want = sd[f'{prefix}.down_proj'].shape
    sd[f'{prefix}.down_proj'] = down if want == down.shape else down.transpose(1, 2)
    return
  for j in range(gate_up.shape[0]):
    sd[f'{prefix}.{j}.gate_proj.weight'] = gate_up[j, :f]
    sd[f'{prefix}.{j}.up_proj.weight'] = gate_up[j, f:]
    sd[f'{prefix}.{j}.down_proj.weight'] = down[j]


def to_hf(model: torch_model.MobileMoE):
  import transformers
  config = hf_config(model.cfg)
  hf_model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  hf_model.load_state_dict(state_dict(model, hf_model), strict=True)
  return hf_model


def save(model: torch_model.MobileMoE, out_dir: str, tokenizer):
  """A directory that AutoModelForCausalLM.from_pretrained(out_dir) loads natively, with the
  tokenizer files AutoTokenizer reads and the bos/eos/pad ids in config.json and
  generation_config.json, so `generate` stops at the model's stop tokens.

  tokenizer: the one the model was trained with, a `Tokenizer` or a path for load_tokenizer.
  """
  hf_model = to_hf(model)
  tok = (tokenizer if isinstance(tokenizer, tokenizer_lib.Tokenizer)
         else tokenizer_lib.load_tokenizer(tokenizer))
  if tok.vocab_size > model.cfg['vocab_size']:
    raise ValueError(f'tokenizer {tok.path} has {tok.vocab_size} ids but the model only '
                     f'{model.cfg["vocab_size"]} embedding rows')
  os.makedirs(out_dir, exist_ok=True)
  ids = tokenizer_lib.write_tokenizer_files(tok, out_dir, model_max_length=model.cfg['max_seq_len'])
  for name, value in ids.items():
    setattr(hf_model.config, name, value)
    setattr(hf_model.generation_config, name, value)
  hf_model.save_pretrained(out_dir)
  return out_dir


def import_dense(path: str) -> torch_model.MobileMoE:
  """A Llama (or Qwen2 without q/k/v biases) directory -> our MobileMoE (dense). Refuses
  what our architecture cannot represent."""
  import transformers
  hf_cfg = transformers.AutoConfig.from_pretrained(path)
  if hf_cfg.model_type not in ('llama', 'qwen2'):
    raise Unsupported(f'{path}: model_type {hf_cfg.model_type!r}; import handles dense llama/qwen2')
  rope = getattr(hf_cfg, 'rope_parameters', None) or {}
  if rope.get('rope_type', 'default') != 'default':
    raise Unsupported(f'{path}: rope_type {rope.get("rope_type")!r} (only plain RoPE maps)')
  if getattr(hf_cfg, 'hidden_act', 'silu') != 'silu':
    raise Unsupported(f'{path}: hidden_act {hf_cfg.hidden_act!r} (ours is SwiGLU)')
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  sd = hf.state_dict()
  if any(k.endswith('bias') and torch.any(v != 0) for k, v in sd.items()):
    raise Unsupported(f'{path}: nonzero linear biases (ours has none)')
  layer_types = getattr(hf_cfg, 'layer_types', None) or ['full_attention'] * hf_cfg.num_hidden_layers
  windows = {getattr(hf_cfg, 'sliding_window', 0) for t in layer_types if t == 'sliding_attention'}
  window = windows.pop() if windows else 0
  global_every = 1
  if window:
    sliding = [t == 'sliding_attention' for t in layer_types]
    global_every = next((g for g in range(2, len(sliding) + 1)
                         if all(s == ((i + 1) % g != 0) for i, s in enumerate(sliding))), 1)
    if global_every == 1 and not all(sliding):
      raise Unsupported(f'{path}: layer_types {layer_types} is not "global every k" ')
  head_dim = getattr(hf_cfg, 'head_dim', None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
  cfg = torch_model.config_dict(dict(
      vocab_size=hf_cfg.vocab_size, d_model=hf_cfg.hidden_size, n_layers=hf_cfg.num_hidden_layers,
      n_heads=hf_cfg.num_attention_heads, n_kv_heads=hf_cfg.num_key_value_heads,
      head_dim=head_dim, d_ff=hf_cfg.intermediate_size,
      tie_embeddings=bool(hf_cfg.tie_word_embeddings), rope_theta=float(rope.get('rope_theta', 10000.0)),
      norm_eps=hf_cfg.rms_norm_eps, sliding_window=window or 0, global_every=global_every,
      max_seq_len=hf_cfg.max_position_embeddings, dtype='float32'))
  model = torch_model.MobileMoE(cfg)
  ours = {'embed.weight': sd['model.embed_tokens.weight'], 'final_norm.weight': sd['model.norm.weight']}
  if not cfg['tie_embeddings']:
    ours['head.weight'] = sd['lm_head.weight']
  for i in range(cfg['n_layers']):
    o, h = f'blocks.{i}', f'model.layers.{i}'
    ours[f'{o}.attn_norm.weight'] = sd[f'{h}.input_layernorm.weight']
    ours[f'{o}.ffn_norm.weight'] = sd[f'{h}.post_attention_layernorm.weight']
    for a in 'qkvo':
      ours[f'{o}.attn.{a}.weight'] = sd[f'{h}.self_attn.{a}_proj.weight']
    for p in ('gate', 'up', 'down'):
      ours[f'{o}.ffn.{p}.weight'] = sd[f'{h}.mlp.{p}_proj.weight']
  model.load_state_dict(ours)
  return model.eval()


def to_flax_state(model: torch_model.MobileMoE, nnx_model):
  """Writes a (dense) MobileMoE's weights into an nnx Transformer of the same config, in
  place: the inverse of torch_model.convert_flax, checked by round trip in the tests."""
  from flax import nnx
  import jax
  cfg = model.cfg
  d, h, kv, dh = cfg['d_model'], cfg['n_heads'], cfg['n_kv_heads'], cfg['head_dim']
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  flat = {'embed': sd['embed.weight'], 'final_norm.scale': sd['final_norm.weight']}
  if not cfg['tie_embeddings']:
    flat['head'] = sd['head.weight'].T
  for i in range(cfg['n_layers']):
    p = f'blocks.{i}'
    if torch_model.is_moe_layer(cfg, i):
      raise Unsupported('to_flax_state handles dense layers only')
    flat[f'{p}.attn_norm.scale'] = sd[f'{p}.attn_norm.weight']
    flat[f'{p}.ffn_norm.scale'] = sd[f'{p}.ffn_norm.weight']
    flat[f'{p}.attn.q'] = sd[f'{p}.attn.q.weight'].T.reshape(d, h, dh)
    flat[f'{p}.attn.k'] = sd[f'{p}.attn.k.weight'].T.reshape(d, kv, dh)
    flat[f'{p}.attn.v'] = sd[f'{p}.attn.v.weight'].T.reshape(d, kv, dh)
    flat[f'{p}.attn.o'] = sd[f'{p}.attn.o.weight'].T.reshape(h, dh, d)
    for n in ('gate', 'up', 'down'):
      flat[f'{p}.ffn.{n}'] = sd[f'{p}.ffn.{n}.weight'].T
  state = nnx.state(nnx_model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  names = [jax.tree_util.keystr(p, simple=True, separator='.') for p, _ in leaves]
  if set(names) != set(flat):
    raise torch_model.ConfigMismatch(f'nnx model params {sorted(set(names) ^ set(flat))[:5]} differ')
  new = jax.tree_util.tree_unflatten(treedef, [np.asarray(flat[n], np.float32) for n in names])
  nnx.replace_by_pure_dict(state, new)
  nnx.update(nnx_model, state)
  return nnx_model
