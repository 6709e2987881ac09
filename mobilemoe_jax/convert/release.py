"""The released MobileMoE's file format (`model_type: mobilemoe`), as far as public sources
establish it (shared/notes/mobilemoe_release.md; §-numbers below refer to it).

config.json <-> our model config (`model_config_from`, `config_json`), and the tensors of
`model.safetensors` in its two layouts:

- 'qat' (verified on the real S-QAT file by third parties, §3.1-3.2): every linear and the
  embedding as packed INT4 `<name>.qweight` U8 + `<name>.weight_scale` F16, routed experts
  as `experts.gate_up_qweight` / `experts.gate_up_scale` and `experts.down_*`, the router
  F32, norms and expert_bias BF16.
- 'bf16' (Base/SFT; NOT verified publicly, the layout hypothesis of §3.3): the float names
  of convert/layout.py, all BF16 except the router (F32 or BF16 accepted).

INT4 packing (§3.2): signed two's-complement nibbles in [-8, 7], no zero point; byte j of a
row holds element 2j in its low nibble and 2j+1 in its high nibble; pairs and groups of 32
run along the LAST axis of the stored tensor: the input axis of linears / the embedding
[out, in], the output axis of experts [E, in, out]. value = q * fp16 scale.
"""
import numpy as np

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.convert import layout
from mobilemoe_jax.convert.safetensors_file import FormatError
from mobilemoe_jax.quant import grid

GROUP = 32
MAX_LAYERS, MAX_DIM = 4096, 2 ** 24     # sanity bounds on config.json's sizes
# config.json's `quantization` block of the QAT checkpoints, field for field (§1.2).
QUANTIZATION = {
    'format': 'mobilemoe-int4-g32',
    'group_size': 32,
    'embedding_group_size': 32,
    'qmin': -8,
    'qmax': 7,
    'symmetric': True,
    'packed': True,
    'scale_dtype': 'float16',
    'linear_group_axis': 'in (last dim of [out, in])',
    'expert_group_axis': 'out (last dim of [E, in, out])',
}
# Our quant config of a model on that grid: every linear and the embedding INT4 in groups of
# 32, experts grouped along their output axis, the paper's scale rule, scales held as learned
# (LSQ) parameters so the imported integers are kept exactly; router and activations float.
QAT_QUANT = dict(weights='int4_g32', embedding='int4_g32', learnable_scale=True,
                 learnable_embedding_scale=True, router=False,
                 expert_group_axis='out', scale_rule='release', activations=None)
# Files of a snapshot carried through unchanged (tokenizer, generation defaults, remote code).
SIDE_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
              'generation_config.json', 'chat_template.jinja', 'tokenizer.model',
              'configuration_mobilemoe.py', 'modeling_mobilemoe.py')


# ---- config.json ---------------------------------------------------------------------------

def _field(cfg: dict, key: str, kind, where: str, default=None):
  if key not in cfg:
    if default is None:
      raise FormatError(f'{where}: field `{key}` is missing')
    return default
  v = cfg[key]
  ok = (isinstance(v, bool) if kind is bool else
        isinstance(v, int) and not isinstance(v, bool) if kind is int else
        isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else
        isinstance(v, kind))
  if not ok:
    raise FormatError(f'{where}: field `{key}` must be {kind.__name__}, got {v!r}')
  return v


def _expect(cfg: dict, key: str, want, where: str):
  """A field we can only express at one value (absent is fine)."""
  if key in cfg and cfg[key] != want:
    raise FormatError(f'{where}: field `{key}` = {cfg[key]!r} is not supported (only {want!r})')


def check_quantization(block, where: str):
  """The QAT `quantization` block must be exactly QUANTIZATION: any other contract would
  decode the nibbles wrongly."""
  if not isinstance(block, dict):
    raise FormatError(f'{where}: field `quantization` must be an object, got {block!r}')
  for key, want in QUANTIZATION.items():
    if key not in block:
      raise FormatError(f'{where}: field `quantization.{key}` is missing (expected {want!r})')
    if block[key] != want or type(block[key]) is not type(want):
      raise FormatError(f'{where}: field `quantization.{key}` = {block[key]!r}, expected '
                        f'{want!r} (the only INT4 contract this importer decodes)')
  extra = sorted(set(block) - set(QUANTIZATION))
  if extra:
    raise FormatError(f'{where}: unknown fields in `quantization`: {extra}')


def model_config_from(cfg: dict, where: str = 'config.json'):
  """A release config.json (dict) -> (our model ConfigDict, validated; layout 'qat' or 'bf16').
  Raises FormatError naming the first field it cannot express."""
  if not isinstance(cfg, dict):
    raise FormatError(f'{where}: not a JSON object')
  if cfg.get('model_type') != 'mobilemoe':
    raise FormatError(f'{where}: field `model_type` = {cfg.get("model_type")!r}, expected "mobilemoe"')
  ints = {k: _field(cfg, k, int, where) for k in (
      'vocab_size', 'hidden_size', 'intermediate_size', 'intermediate_size_mlp',
      'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'num_local_experts',
      'num_experts_per_tok', 'max_position_embeddings')}
  ints['head_dim'] = _field(cfg, 'head_dim', int, where,
                            ints['hidden_size'] // max(ints['num_attention_heads'], 1))
  for k, v in ints.items():
    # Far above any real model; a hostile file's sizes fail here, before anything is allocated.
    if not 0 < v <= (MAX_LAYERS if k == 'num_hidden_layers' else MAX_DIM):
      raise FormatError(f'{where}: field `{k}` = {v} is out of range')
  n_layers, head_dim = ints['num_hidden_layers'], ints['head_dim']
  step = _field(cfg, 'interleave_moe_layer_step', int, where, 1)
  rope_flags = _field(cfg, 'no_rope_layers', list, where, None) if 'no_rope_layers' in cfg else [1] * n_layers
  if len(rope_flags) != n_layers or any(f not in (0, 1) or isinstance(f, bool) for f in rope_flags):
    raise FormatError(f'{where}: field `no_rope_layers` must be {n_layers} flags of 0/1 '
                      f'(1 = RoPE), got {rope_flags!r}')
  types = _field(cfg, 'layer_types', list, where, None) if 'layer_types' in cfg else ['full_attention'] * n_layers
  if len(types) != n_layers or any(t != 'full_attention' for t in types):
    raise FormatError(f'{where}: field `layer_types`: only {n_layers} x "full_attention" is '
                      f'supported, got {types!r}')
  _expect(cfg, 'hidden_act', 'silu', where)
  _expect(cfg, 'attention_bias', False, where)
  _expect(cfg, 'attention_dropout', 0.0, where)
  _expect(cfg, 'attn_temperature_tuning', False, where)
  for key in ('use_qk_norm', 'norm_topk_prob', 'tie_word_embeddings'):
    _field(cfg, key, bool, where)
  m = config_lib.model_config(
      vocab_size=ints['vocab_size'], d_model=ints['hidden_size'], n_layers=n_layers,
      n_heads=ints['num_attention_heads'], n_kv_heads=ints['num_key_value_heads'],
      head_dim=head_dim, d_ff=ints['intermediate_size_mlp'],
      tie_embeddings=cfg['tie_word_embeddings'], rope_theta=float(_field(cfg, 'rope_theta', float, where)),
      norm_eps=float(_field(cfg, 'rms_norm_eps', float, where)), sliding_window=0,
      max_seq_len=ints['max_position_embeddings'], qk_norm=cfg['use_qk_norm'],
      nope_layers=tuple(i for i, f in enumerate(rope_flags) if f == 0))
  scaling = cfg.get('rope_scaling')
  if scaling is not None:
    if not isinstance(scaling, dict):
      raise FormatError(f'{where}: field `rope_scaling` must be an object or null, got {scaling!r}')
    kind = scaling.get('rope_type', scaling.get('type'))
    if kind != 'llama3':
      raise FormatError(f'{where}: field `rope_scaling.rope_type` = {kind!r}: only "llama3" is supported')
    sub = f'{where} rope_scaling'
    m.rope_scaling.update(dict(
        kind='llama3', factor=float(_field(scaling, 'factor', float, sub)),
        original_max_len=_field(scaling, 'original_max_position_embeddings', int, sub),
        low_freq_factor=float(_field(scaling, 'low_freq_factor', float, sub)),
        high_freq_factor=float(_field(scaling, 'high_freq_factor', float, sub))))
  m.moe.update(dict(
      n_experts=ints['num_local_experts'], top_k=ints['num_experts_per_tok'],
      d_expert=ints['intermediate_size'], n_shared=1, d_shared=ints['intermediate_size_mlp'],
      first_dense=0, every=step, score_func='sigmoid', norm_topk_prob=cfg['norm_topk_prob'],
      routed_scale=float(_field(cfg, 'routed_scaling_factor', float, where)), expert_bias=True,
      capacity_factor=0.0))
  layout_name = 'bf16'
  if 'quantization' in cfg and cfg['quantization'] is not None:
    check_quantization(cfg['quantization'], where)
    m.quant.update(QAT_QUANT)
    layout_name = 'qat'
    if any(n % GROUP for n in (ints['hidden_size'], ints['intermediate_size'],
                               ints['intermediate_size_mlp'], ints['num_attention_heads'] * head_dim)):
      raise FormatError(f'{where}: hidden_size, intermediate_size, intermediate_size_mlp and '
                        f'num_attention_heads x head_dim must be multiples of {GROUP} (INT4 groups)')
  try:
    config_lib.validate(m)
  except config_lib.ConfigError as e:
    raise FormatError(f'{where}: {e}') from None
  return m, layout_name


def config_json(model, base: dict | None = None, quantized: bool = False) -> dict:
  """Our model config -> a release config.json dict. `base` (the imported checkpoint's own
  config.json) keeps every field we do not model (eos ids, torch_dtype, ...); ours override.
  Raises ValueError naming the field of a model the release format cannot express."""
  check_expressible(model)
  m = model.moe
  out = dict(base or {'architectures': ['MobileMoEForCausalLM'], 'model_type': 'mobilemoe',
                      'hidden_act': 'silu', 'attention_bias': False, 'attention_dropout': 0.0,
                      'attn_temperature_tuning': False, 'torch_dtype': 'bfloat16'})
  scaling = config_lib.rope_scaling(model)
  out.update({
      'model_type': 'mobilemoe',
      'vocab_size': model.vocab_size, 'hidden_size': model.d_model,
      'intermediate_size': m.d_expert, 'intermediate_size_mlp': m.n_shared * m.d_shared,
      'num_hidden_layers': model.n_layers, 'num_attention_heads': model.n_heads,
      'num_key_value_heads': model.n_kv_heads, 'head_dim': model.head_dim,
      'num_local_experts': m.n_experts, 'num_experts_per_tok': m.top_k,
      'interleave_moe_layer_step': m.every,
      'no_rope_layers': [0 if i in tuple(model.nope_layers) else 1 for i in range(model.n_layers)],
      'layer_types': ['full_attention'] * model.n_layers,
      'use_qk_norm': bool(model.qk_norm), 'rope_theta': model.rope_theta,
      'rope_scaling': None if scaling['kind'] == 'none' else {
          'rope_type': 'llama3', 'factor': scaling['factor'],
          'original_max_position_embeddings': scaling['original_max_len'],
          'low_freq_factor': scaling['low_freq_factor'], 'high_freq_factor': scaling['high_freq_factor']},
      'max_position_embeddings': model.max_seq_len, 'rms_norm_eps': model.norm_eps,
      'routed_scaling_factor': m.routed_scale, 'norm_topk_prob': bool(m.norm_topk_prob),
      'tie_word_embeddings': bool(model.tie_embeddings),
  })
  out.pop('quantization', None)
  if quantized:
    out['quantization'] = dict(QUANTIZATION)
  return out


def check_expressible(model):
  """Raises ValueError naming the first field of `model` the release format has no place for."""
  m = model.moe
  bad = []
  if m.n_experts == 0:
    bad.append('model.moe.n_experts: the release is an MoE (0 = dense)')
  if model.sliding_window:
    bad.append('model.sliding_window: the release attends globally on every layer')
  if m.score_func != 'sigmoid':
    bad.append(f"model.moe.score_func: the release routes with sigmoid scores, not {m.score_func!r}")
  if m.n_shared == 0:
    bad.append('model.moe.n_shared: the release has a shared expert')
  moe = [config_lib.is_moe_layer(model, i) for i in range(model.n_layers)]
  if any(moe[i] != ((i + 1) % m.every == 0) for i in range(model.n_layers)):
    bad.append('model.moe.first_dense: the release puts an MoE on layer i iff '
               '(i + 1) % interleave_moe_layer_step == 0')
  if not all(moe) and model.d_ff != m.n_shared * m.d_shared:
    bad.append('model.d_ff: dense layers of the release have width intermediate_size_mlp '
               f'(= n_shared x d_shared = {m.n_shared * m.d_shared})')
  if bad:
    raise ValueError('this model cannot be written in the released MobileMoE format: '
                     + '; '.join(bad))


# ---- tensors -------------------------------------------------------------------------------

def is_expert(name: str) -> bool:
  return '.experts.' in name


def packed_names(name: str) -> tuple[str, str]:
  """A float tensor name of layout.py -> its (qweight, scale) names in the QAT file."""
  if is_expert(name):                    # experts.gate_up_proj -> experts.gate_up_qweight
    base = name.removesuffix('_proj')
    return base + '_qweight', base + '_scale'
  base = name.removesuffix('.weight')
  return base + '.qweight', base + '.weight_scale'


def is_quantized(name: str) -> bool:
  """Whether the QAT file stores this float tensor as packed INT4 (all but norms, the
  router and the expert bias)."""
  return not (name.endswith('norm.weight') or name.endswith('router.weight')
              or name.endswith('expert_bias'))


def file_spec(model, layout_name: str) -> dict[str, tuple[str, tuple]]:
  """{file tensor name: (dtype, shape)} of a model's checkpoint in `layout_name`."""
  out = {}
  for name, shape in layout.tensor_shapes(model).items():
    if layout_name == 'qat' and is_quantized(name):
      q, s = packed_names(name)
      out[q] = ('U8', shape[:-1] + (shape[-1] // 2,))
      out[s] = ('F16', shape[:-1] + (shape[-1] // GROUP,))
    else:
      out[name] = ('F32' if name.endswith('router.weight') else 'BF16', shape)
  return out


def pack(q: np.ndarray) -> np.ndarray:
  """int4 values [..., K] -> uint8 [..., K/2], element 2j in the low nibble of byte j."""
  return grid.pack_int4(q)


def unpack(packed: np.ndarray) -> np.ndarray:
  """uint8 [..., K/2] -> int8 [..., K] in [-8, 7] (two's-complement nibbles)."""
  return grid.unpack_int4(packed)


def expand_groups(scale: np.ndarray, k: int) -> np.ndarray:
  """[..., K/G] group scales -> [..., K]: each repeated over its group (the last axis)."""
  return np.repeat(scale, k // scale.shape[-1], axis=-1)
