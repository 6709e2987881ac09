"""The model and mesh config schema, and its validation.

Every preset in `configs/` starts from `model_config()` and `mesh_config()` and
overrides fields, so the schema lives in one place. Configs are locked: a typo in
a field name fails when it is set (`--config.model.d_modle=...` is refused by
ml_collections), and `validate()` checks the values before any array is built.
"""
import difflib
import importlib.util
import logging
import os
from contextlib import nullcontext as _nullcontext

import ml_collections


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


ATTENTION_IMPLS = ('xla', 'cudnn', 'auto')
CUDNN_MASKS = ('auto', 'bias_nograd', 'causal', 'segments')   # model.attention_mask


def model_config(**overrides) -> ml_collections.ConfigDict:
  """The decoder-only LM. With `moe.n_experts == 0` every FFN is dense."""
  c = ml_collections.ConfigDict()
  c.vocab_size = 32_000
  c.d_model = 512
  c.n_layers = 8
  c.n_heads = 8
  c.n_kv_heads = 2              # grouped-query attention: n_heads % n_kv_heads == 0
  c.head_dim = 0                 # 0: d_model // n_heads (which must divide)
  c.d_ff = 2048                 # hidden size of the dense SwiGLU FFN
  c.tie_embeddings = True
  c.rope_theta = 500_000.0
  # RoPE frequency scaling (model/layers.py, rope_frequencies): 'none' | 'llama3' (Llama 3.1's
  # rule: wavelengths above original_max_len / low_freq_factor are divided by `factor`, those
  # below original_max_len / high_freq_factor kept, the band between interpolated).
  c.rope_scaling = ml_collections.ConfigDict(dict(
      kind='none', factor=16.0, original_max_len=8192, low_freq_factor=1.0, high_freq_factor=1.0))
  c.nope_layers = ()            # layer indices without RoPE (and without QK-norm)
  c.qk_norm = False             # weightless per-head RMS norm of q and k after RoPE (RoPE layers)
  c.norm_eps = 1e-5
  c.sliding_window = 0          # 0: every layer attends globally
  c.global_every = 1            # with a window: layer i is global iff (i + 1) % global_every == 0
  c.max_seq_len = 2048
  c.dtype = 'bfloat16'          # compute dtype; params stay in param_dtype
  c.param_dtype = 'float32'
  c.init_std = 0.02
  c.remat = False               # rematerialise each block in the backward pass
  # Attention kernel: 'xla' (scores materialised; any backend), 'cudnn' (fused flash attention,
  # GPU, 16-bit dtypes), 'auto' (cudnn on GPU with a 16-bit dtype, else xla). Decoding with a KV
  # cache always uses xla. cuDNN keeps no [T, S] scores in memory (bench/attention_check.py
  # compares the two).
  c.attention_impl = 'auto'
  # cuDNN attention only: how documents/padding are kept apart (model/layers.py,
  # cudnn_attention): 'bias_nograd' (the mask as a bias, no gradient computed for it),
  # 'causal' (flags only: exact only for rows of one document without padding), 'segments'
  # (cuDNN's packed layout: each run of equal segment ids its own causal sequence, at most
  # attention_segments runs per row; exact for rows as the data pipeline packs them), 'auto'
  # ('causal' when every row of the batch is one document, checked at run time, else
  # 'bias_nograd'; train.trainer.step_config picks 'segments' on the host where it is exact
  # and the model has no sliding window). All but 'causal' and 'segments' are exact for any rows.
  c.attention_mask = 'auto'
  c.attention_segments = 0      # 'segments': the most runs of equal segment ids in one row

  c.moe = ml_collections.ConfigDict()
  c.moe.n_experts = 0           # routed experts per MoE layer; 0 turns the MoE off (dense model)
  c.moe.top_k = 2
  c.moe.d_expert = 256          # hidden size of one routed SwiGLU expert
  c.moe.n_shared = 0            # always-active shared experts
  c.moe.d_shared = 256          # hidden size of one shared expert
  c.moe.first_dense = 1         # the first layers keep a dense FFN (routing is unstable there)
  c.moe.every = 1               # from first_dense on, layer i is MoE iff (i + 1) % every == 0
  c.moe.score_func = 'softmax'  # 'softmax' | 'sigmoid'
  c.moe.norm_topk_prob = True   # renormalise the k chosen weights to sum to 1
  c.moe.routed_scale = 1.0      # multiplies the routed output (DeepSeek's routed scaling factor)
  c.moe.aux_loss_coef = 1e-2    # Switch-style load-balancing loss
  c.moe.z_loss_coef = 1e-3      # router z-loss
  c.moe.expert_bias = False     # aux-loss-free balancing: a selection bias updated from the load
  c.moe.bias_update_rate = 1e-3
  c.moe.capacity_factor = 0.0   # 0: no token is ever dropped; >0: per-expert capacity
  c.moe.dispatch = 'auto'       # 'auto' | 'dense' | 'sorted' | 'gather' | 'ragged' | 'grouped'; see moe/dispatch.py
  # Expert parallel only (a mesh 'expert' axis): the capacity buffer crosses devices in this
  # many slices, so one slice's all-to-all runs while another's expert matmuls do; the shared
  # expert covers the first send and the last return (moe/dispatch.py, expert_parallel).
  # Same outputs for any value; 1 sends the buffer whole; each slice more shrinks the GEMMs
  # and adds two collective launches, while the shared expert already covers the ends.
  c.moe.ep_overlap_chunks = 2
  # Fake quantization for QAT (quant/qat.py); weights=None keeps the float model.
  c.quant = ml_collections.ConfigDict()
  c.quant.weights = ml_collections.config_dict.placeholder(str)  # None | 'int4_g32' | 'int4_channel' | 'int8_channel' | ...
  c.quant.embedding = 'int4_g32'  # grid of the embedding / tied head when weights is set
  c.quant.learnable_scale = False  # LSQ-style trained scales (initialised from max-abs)
  # With learnable_scale: the embedding's scales are learned too (an imported release
  # checkpoint holds them; its integers are not recomputable from max-abs).
  c.quant.learnable_embedding_scale = False
  # The grid's shape (quant/grid.py). 'in' groups every weight along its input axis (TFLite
  # FCs); 'out' groups the routed experts ([E, in, out]) along their output axis, as the
  # released MobileMoE checkpoints do (mobilemoe_jax/convert).
  c.quant.expert_group_axis = 'in'
  # 'tflite': scale = max/qmax, bf16 -> fp16 (ai-edge-quantizer's grid); 'release': the
  # released MobileMoE's QAT rule, scale = fp16(2 max / (2^bits - 1)).
  c.quant.scale_rule = 'tflite'
  c.quant.router = False        # the router stays float unless asked
  # The int8 grid the .tflite quantizes FC inputs to at run time (quant/grid.py), modelled
  # on every input of an integer-weight linear: None | 'int8_dynamic' | 'int8_dynamic_sym'
  c.quant.activations = ml_collections.config_dict.placeholder(str)
  # KV cache on an int8 grid (quant/grid.py KV_CACHE): None | 'int8' (per token and head).
  # Fake-quantized in training, stored as int8 + scales when decoding with the cache.
  c.quant.kv_cache = ml_collections.config_dict.placeholder(str)
  c.update(overrides)
  return c


def mesh_config(**overrides) -> ml_collections.ConfigDict:
  """Named mesh axes. Sizes multiply to the device count; one size may be -1 (the rest)."""
  c = ml_collections.ConfigDict()
  c.data = -1
  c.fsdp = 1
  c.expert = 1
  c.tensor = 1
  c.update(overrides)
  return c


# Model fields, and values of fields, retired when the comparison that needed them was over.
# Saved configs (a checkpoint's meta, a torch export's config.json) may still hold them:
# `upgrade_saved_model` drops or renames the saved value that is today's behaviour and
# refuses any other. (field, saved value, its value today or RETIRED_FIELD, what replaced it)
RETIRED_FIELD = object()
RETIRED = (
    ('fuse_gate_up', True, RETIRED_FIELD,
     'SwiGLU FFNs always compute gate and up in one matmul (moe/dispatch.py, swiglu_hidden)'),
    ('attention_mask', 'bias', 'bias_nograd',
     "'bias_nograd': the same bias, outputs and gradients without the bias gradient "
     'nothing used'),
)


def upgrade_saved_model(saved: dict, source: str) -> dict:
  """A saved model config (plain dict) with its retired fields and values replaced by today's
  behaviour (one log line each). Raises ConfigError naming the field, the value and what
  replaced it for a retired field saved with any other value. `source` names the file."""
  out = dict(saved)
  for field, old, new, why in RETIRED:
    if field not in out:
      continue
    if out[field] == old:
      logging.info('%s: model.%s=%r is retired (%s); loaded as today\'s behaviour',
                   source, field, old, why)
      if new is RETIRED_FIELD:
        del out[field]
      else:
        out[field] = new
    elif new is RETIRED_FIELD:
      raise ConfigError(f'config field `model.{field}` in {source}: {out[field]!r} is no longer '
                        f'supported (the field is retired: {why}); only {old!r} loads')
  return out


def train_config(stage: str, small: bool, **overrides) -> ml_collections.ConfigDict:
  """The `train` section of a stage config (configs/stages/): every field with its default.
  small: the CPU demo presets' short stages. mobilemoe_jax/train/config_check.py holds the
  range of each field."""
  t = ml_collections.ConfigDict()
  t.stage = stage                 # name recorded in the checkpoint lineage
  t.seed = 0                      # model init, data order and the state's RNG key
  t.steps = 300 if small else 100_000
  t.batch_size = 16 if small else 256   # global rows per step (split over processes)
  t.seq_len = 128 if small else 2048
  t.grad_accum = 1                # micro-batches per step (batch_size % grad_accum == 0)
  t.lr = 3e-3 if small else 3e-4
  t.schedule = 'wsd'              # 'wsd' | 'cosine' | 'constant'
  t.warmup_steps = 30 if small else 2000
  t.decay_fraction = 0.2          # wsd: share of post-warmup steps spent decaying
  t.min_lr_ratio = 0.1            # final lr = lr * min_lr_ratio
  t.weight_decay = 0.1            # AdamW, decoupled; never applied to 1-D params
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.clip_norm = 1.0               # global-norm clipping; 0 = off
  t.adam_mu_dtype = ''            # AdamW first-moment dtype; '' = fp32 like the params (optim.py)
  t.on_nonfinite = 'stop'         # 'stop': fail with the last good checkpoint | 'skip'
  # With 'skip': stop anyway after more than this many skipped steps in a row, or once more
  # than max_consecutive_skips steps were skipped and they are over this share of all steps.
  t.max_consecutive_skips = 5
  t.max_skip_fraction = 0.1
  t.log_every = 25 if small else 100
  t.eval_every = 100 if small else 2000
  t.eval_batches = 8 if small else 64   # held-out batches per evaluation; 0 = none
  t.checkpoint_every = 100 if small else 1000
  t.keep_checkpoints = 2          # keep-last-K
  t.async_checkpoints = True      # save in the background while training continues
  t.checkpoint_fallback = True    # resume from the newest checkpoint that verifies; False: stop
  t.allow_config_change = False   # resume although the checkpoint's config differs (printed)
  t.init_from = ''                # previous stage's checkpoints dir (or a step dir); '' = scratch
  t.restore_optimizer = False     # with init_from: also take its optimizer state
  t.progress = True               # tqdm progress bar
  # Cross-entropy over this many positions (of every row) at a time, never all [B, T, V]
  # logits (train/loss.py); 0 = off. On for the full-size presets, whose [B, T, V] logits
  # and their gradient would take tens of GB; the CPU demo presets keep the full-logits loss.
  # Ignored (unchunked) with distill_weight: the KL needs the student's full logits.
  t.loss_chunk_len = 0 if small else 512
  t.distill_weight = 0.0          # QAT: weight of KL(float teacher || fake-quant model); 0 = off
  t.distill_temperature = 1.0
  t.update(overrides)
  return t



def experiment(model: ml_collections.ConfigDict, **sections) -> ml_collections.ConfigDict:
  """The top-level config a preset returns: the model, the mesh, and any other sections
  (train, data, ... added by the stage configs)."""
  c = ml_collections.ConfigDict()
  c.model = model
  c.mesh = sections.pop('mesh', mesh_config())
  for k, v in sections.items():
    c[k] = v
  return c


def is_moe_layer(model: ml_collections.ConfigDict, layer: int) -> bool:
  """Whether layer `layer` has an MoE FFN (else the dense SwiGLU of width d_ff)."""
  m = model.moe
  return (m.n_experts > 0 and layer >= m.first_dense
          and (layer + 1) % getattr(m, 'every', 1) == 0)   # configs saved before `every`: 1


def is_rope_layer(model: ml_collections.ConfigDict, layer: int) -> bool:
  """Whether layer `layer` applies RoPE (and QK-norm, when on): not a NoPE layer."""
  return layer not in tuple(getattr(model, 'nope_layers', ()))


ROPE_SCALINGS = ('none', 'llama3')


def rope_scaling(model: ml_collections.ConfigDict) -> dict:
  """model.rope_scaling as a plain dict; configs saved before the field have none."""
  scaling = model.get('rope_scaling')
  return {'kind': 'none'} if scaling is None else dict(scaling)


def is_global_layer(model: ml_collections.ConfigDict, layer: int) -> bool:
  if not model.sliding_window or model.global_every <= 1:
    return not model.sliding_window
  return (layer + 1) % model.global_every == 0


def _require(ok: bool, field: str, why: str):
  if not ok:
    raise ConfigError(f'config field `{field}`: {why}')


def field_names(config, prefix: str = '') -> list[str]:
  """The dotted name of every leaf field of a (nested) config: 'train.lr', 'model.moe.top_k'."""
  names = []
  for key, value in config.items():
    if hasattr(value, 'items'):
      names += field_names(value, f'{prefix}{key}.')
    else:
      names.append(prefix + key)
  return names


def unknown_field(config, field: str) -> str | None:
  """None if `field` ('model.moe.top_k') exists in `config`, else a one-line message naming
  it and the nearest known names."""
  known = field_names(config)
  if field in known or any(k.startswith(field + '.') for k in known):   # a field or a section
    return None
  # Fields beside it first (a typo rarely changes the section), then anywhere.
  section = field.rpartition('.')[0] + '.'
  near = (difflib.get_close_matches(field, [k for k in known if k.startswith(section)], n=3, cutoff=0.6)
          or difflib.get_close_matches(field, known, n=3, cutoff=0.6))
  return (f'unknown config field `{field}`'
          + (f'; nearest: {", ".join(near)}' if near else '; no similar field'))


def validate(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks a model config; raises ConfigError naming the first bad field.
  Fills the one derived field: head_dim = d_model // n_heads when it is 0."""
  known = set(model_config().keys())
  for key in model.keys():
    _require(key in known, f'model.{key}', 'unknown field')
  for key in model.moe.keys():
    _require(key in model_config().moe, f'model.moe.{key}', 'unknown field')
  for f in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff',
            'max_seq_len'):
    _require(model[f] > 0 or (f == 'head_dim' and model[f] == 0), f'model.{f}', f'must be positive, got {model[f]}')
  if model.head_dim == 0:
    _require(model.d_model % model.n_heads == 0, 'model.n_heads',
             f'must divide d_model={model.d_model} when head_dim is 0, got {model.n_heads}')
    with model.unlocked() if model.is_locked else _nullcontext():
      model.head_dim = model.d_model // model.n_heads
  _require(model.n_heads % model.n_kv_heads == 0, 'model.n_kv_heads',
           f'must divide n_heads={model.n_heads}, got {model.n_kv_heads}')
  _require(model.head_dim % 2 == 0, 'model.head_dim', 'must be even for RoPE')
  _require(model.sliding_window >= 0, 'model.sliding_window', 'must be >= 0')
  _validate_rope(model)
  _require(model.attention_mask in CUDNN_MASKS, 'model.attention_mask',
           f'unknown mask mode {model.get("attention_mask")!r}; known: {CUDNN_MASKS}')
  if model.get('attention_mask') == 'segments':
    _require(model.get('attention_segments', 0) >= 1, 'model.attention_segments',
             "must be >= 1 (the most runs of segment ids in a row) with attention_mask 'segments'")
  _require(model.get('attention_impl', 'auto') in ATTENTION_IMPLS, 'model.attention_impl',
           f'unknown attention kernel {model.get("attention_impl")!r}; known: {ATTENTION_IMPLS}')
  _require(model.dtype in ('bfloat16', 'float32', 'float16'), 'model.dtype',
           f'unknown dtype {model.dtype!r}')
  _require(model.param_dtype in ('bfloat16', 'float32'), 'model.param_dtype',
           f'unknown dtype {model.param_dtype!r}')
  q = model.quant
  for key in q.keys():
    _require(key in model_config().quant, f'model.quant.{key}', 'unknown field')
  if q.weights is not None:
    from mobilemoe_jax.quant import grid    # the one place schemes are defined
    for f in ('weights', 'embedding'):
      _require(q[f] in grid.SCHEMES, f'model.quant.{f}',
               f'unknown scheme {q[f]!r}; known: {sorted(grid.SCHEMES)}')
  _require(q.get('expert_group_axis', 'in') in ('in', 'out'), 'model.quant.expert_group_axis',
           f"must be 'in' or 'out', got {q.get('expert_group_axis')!r}")
  from mobilemoe_jax.quant import grid
  _require(q.get('scale_rule', 'tflite') in grid.RULES, 'model.quant.scale_rule',
           f'unknown scale rule {q.get("scale_rule")!r}; known: {grid.RULES}')
  if q.get('kv_cache') is not None:
    from mobilemoe_jax.quant import grid
    _require(q.kv_cache in grid.KV_CACHE, 'model.quant.kv_cache',
             f'unknown KV-cache grid {q.kv_cache!r}; known: None, {", ".join(grid.KV_CACHE)}')
  if q.get('activations') is not None:
    from mobilemoe_jax.quant import grid
    _require(q.activations in grid.ACTIVATIONS, 'model.quant.activations',
             f'unknown activation grid {q.activations!r}; known: None, {", ".join(grid.ACTIVATIONS)}')
  m = model.moe
  if m.n_experts:
    _require(m.n_experts > 0, 'model.moe.n_experts', 'must be >= 0')
    _require(0 < m.top_k <= m.n_experts, 'model.moe.top_k',
             f'must be in [1, n_experts={m.n_experts}], got {m.top_k}')
    _require(not (m.top_k == 1 and m.norm_topk_prob), 'model.moe.norm_topk_prob',
             'with top_k=1 it renormalises the one weight to exactly 1, so the router gets no '
             'gradient from the LM loss; set it False for top-1 routing')
    _require(m.d_expert > 0, 'model.moe.d_expert', 'must be positive')
    _require(m.n_shared >= 0, 'model.moe.n_shared', 'must be >= 0')
    _require(m.n_shared == 0 or m.d_shared > 0, 'model.moe.d_shared', 'must be positive')
    _require(0 <= m.first_dense <= model.n_layers, 'model.moe.first_dense',
             f'must be in [0, n_layers={model.n_layers}]')
    _require(m.get('every', 1) >= 1, 'model.moe.every', f'must be >= 1, got {m.get("every")}')
    _require(m.score_func in ('softmax', 'sigmoid'), 'model.moe.score_func',
             f"must be 'softmax' or 'sigmoid', got {m.score_func!r}")
    _require(m.capacity_factor >= 0, 'model.moe.capacity_factor', 'must be >= 0')
    chunks = m.get('ep_overlap_chunks', 1)
    _require(isinstance(chunks, int) and chunks >= 1, 'model.moe.ep_overlap_chunks',
             f'must be an integer >= 1, got {chunks!r}')
    _require(m.dispatch in ('auto', 'dense', 'sorted', 'gather', 'ragged', 'grouped'), 'model.moe.dispatch',
             f'unknown dispatch {m.dispatch!r}')
  return model


def _validate_rope(model: ml_collections.ConfigDict):
  nope = model.get('nope_layers', ())
  _require(isinstance(nope, (tuple, list)), 'model.nope_layers',
           f'must be a tuple of layer indices, got {nope!r}')
  for i in nope:
    _require(isinstance(i, int) and 0 <= i < model.n_layers, 'model.nope_layers',
             f'layer {i!r} is not in [0, n_layers={model.n_layers})')
  _require(model.get('qk_norm', False) in (True, False), 'model.qk_norm',
           f'must be a bool, got {model.get("qk_norm")!r}')
  if model.get('rope_scaling') is None:
    return
  r = model.rope_scaling
  for key in r.keys():
    _require(key in model_config().rope_scaling, f'model.rope_scaling.{key}', 'unknown field')
  _require(r.kind in ROPE_SCALINGS, 'model.rope_scaling.kind',
           f'unknown scaling {r.kind!r}; known: {ROPE_SCALINGS}')
  if r.kind == 'llama3':
    _require(r.factor > 0, 'model.rope_scaling.factor', f'must be positive, got {r.factor}')
    _require(r.original_max_len > 0, 'model.rope_scaling.original_max_len',
             f'must be positive, got {r.original_max_len}')
    _require(0 < r.low_freq_factor <= r.high_freq_factor, 'model.rope_scaling.low_freq_factor',
             f'must be in (0, high_freq_factor={r.high_freq_factor}], got {r.low_freq_factor}')


def validate_mesh(mesh: ml_collections.ConfigDict, n_devices: int) -> dict:
  """Resolves a -1 axis and checks the mesh covers exactly `n_devices`."""
  axes = {k: int(mesh[k]) for k in ('data', 'fsdp', 'expert', 'tensor')}
  for key in mesh.keys():
    _require(key in axes, f'mesh.{key}', 'unknown mesh axis')
  free = [k for k, v in axes.items() if v == -1]
  _require(len(free) <= 1, 'mesh', f'at most one axis may be -1, got {free}')
  for k, v in axes.items():
    _require(v == -1 or v >= 1, f'mesh.{k}', f'must be >= 1 or -1, got {v}')
  fixed = 1
  for k, v in axes.items():
    fixed *= v if v > 0 else 1
  if free:
    _require(n_devices % fixed == 0, f'mesh.{free[0]}',
             f'cannot fill: {n_devices} devices not divisible by the other axes ({fixed})')
    axes[free[0]] = n_devices // fixed
  _require(fixed * (axes[free[0]] if free else 1) == n_devices, 'mesh',
           f'axes {axes} multiply to {fixed}, but there are {n_devices} devices')
  return axes


def load_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/tiny.py:moe' -> what that file's get_config('moe') returns.

  Config files are read by path, as `--config=` does, never imported by name: the library
  sits below the configs/ tree. A relative path is taken from the working directory, else
  from the project root (where configs/ lives)."""
  path, _, arg = spec.partition(':')
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config {spec!r}: {path} does not exist')
  module_spec = importlib.util.spec_from_file_location('_config_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
