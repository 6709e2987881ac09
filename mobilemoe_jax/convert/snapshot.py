"""Import a released MobileMoE snapshot as our checkpoint, and export our checkpoints back.

Import (`import_snapshot`): config.json + model.safetensors (+ tokenizer and remote-code
files) -> `<out>/checkpoints/0`, an Orbax checkpoint of params and state with its config
(train.init_from, eval's load_checkpoint and the exporter read it), and `<out>/release/`:
the snapshot's config.json and side files, kept for the way back.

- QAT snapshots: weights become q * scale exactly (fp32) and the scales become the model's
  learned quantization scales on the release grid (release.QAT_QUANT), so the fake-quant
  forward, a QAT stage started from it and `extract.integer_weights` all see exactly the
  released integers and scales.
- Base/SFT snapshots (bf16): the float weights, in fp32.

Export (`export_checkpoint`): any checkpoint of a model the format can express -> a snapshot
dir: 'qat' (packed INT4: the model's own integers under QAT, else post-training INT4 on the
release grid) or 'bf16'. A checkpoint descending from an import (its lineage names it)
reuses that snapshot's config.json fields, safetensors metadata and side files, so import ->
export of an unchanged QAT snapshot gives a byte-identical model.safetensors.
"""
import json
import os
import shutil

import ml_collections
import ml_dtypes
import numpy as np

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.convert import layout, release
from mobilemoe_jax.convert.safetensors_file import File, FormatError, write

IMPORT_STAGE = 'import'


# ---- import -------------------------------------------------------------------------------

def read_snapshot(snapshot: str):
  """snapshot dir -> (model config, layout name, {float tensor name: fp32 array},
  {float tensor name: fp32 group scales [..., K/32]} (QAT), safetensors metadata)."""
  cfg_path = os.path.join(snapshot, 'config.json')
  st_path = os.path.join(snapshot, 'model.safetensors')
  for p in (cfg_path, st_path):
    if not os.path.isfile(p):
      raise FormatError(f'{p}: missing (a snapshot dir holds config.json and model.safetensors)')
  try:
    with open(cfg_path) as f:
      cfg_json = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise FormatError(f'{cfg_path}: not valid JSON ({e})') from None
  model_cfg, layout_name = release.model_config_from(cfg_json, cfg_path)
  file = File(st_path)
  _check_inventory(file, release.file_spec(model_cfg, layout_name), layout_name, st_path)
  weights, scales = {}, {}
  for name, shape in layout.tensor_shapes(model_cfg).items():
    if layout_name == 'qat' and release.is_quantized(name):
      qname, sname = release.packed_names(name)
      q, s = release.unpack(file.read(qname)), file.read(sname).astype(np.float32)
      if not np.isfinite(s).all():
        raise FormatError(f'{st_path}: tensor {sname}: non-finite scales')
      weights[name] = q.astype(np.float32) * release.expand_groups(s, shape[-1])   # exact
      scales[name] = s
    else:
      weights[name] = file.read(name).astype(np.float32)
  return model_cfg, layout_name, weights, scales, file.metadata


def _check_inventory(file: File, spec: dict, layout_name: str, where: str):
  """Every tensor of `spec` present with its dtype and shape, nothing else; else one error
  listing the missing, unexpected and mismatched tensors."""
  have = file.entries
  missing = [n for n in spec if n not in have]
  unexpected = [n for n in have if n not in spec]
  wrong = []
  for n, (dtype, shape) in spec.items():
    if n not in have:
      continue
    ok_dtypes = ('F32', 'BF16') if n.endswith('router.weight') and layout_name == 'bf16' else (dtype,)
    if have[n][0] not in ok_dtypes or have[n][1] != shape:
      wrong.append(f'{n}: {have[n][0]} {list(have[n][1])}, expected {"/".join(ok_dtypes)} {list(shape)}')
  if missing or unexpected or wrong:
    hint = ''
    if layout_name == 'bf16' and any(n.endswith('qweight') for n in have):
      hint = ' (packed INT4 tensors, but config.json has no `quantization` block)'
    if layout_name == 'qat' and not any(n.endswith('qweight') for n in have):
      hint = ' (config.json declares a quantization block, but nothing is packed)'
    show = lambda xs: f'{len(xs)} {xs[:12]}{" ..." if len(xs) > 12 else ""}'
    raise FormatError(f'{where}: not the {layout_name} layout of this config{hint}: '
                      f'missing {show(missing)}; unexpected {show(unexpected)}; '
                      f'wrong dtype/shape {show(wrong)}')


def _scale_params(abstract_params, our_scales: dict, quant) -> dict:
  """Group scales in our matrix views, keyed by their QuantScale paths. our_scales: {weight
  path: scale field in the weight's own shape (each group scale repeated over the group)}."""
  from flax import nnx
  from mobilemoe_jax.quant import grid, qat
  g = grid.get_scheme(quant.weights).group
  out = {}
  for path, var in nnx.to_flat_state(abstract_params):
    path = tuple(path)
    if not str(path[-1]).endswith('_scale'):
      continue
    weight = path[:-1] + (path[-1][:-len('_scale')],)
    field, shape = our_scales[weight], var.get_value().shape
    if weight == ('embed',):
      out[path] = field.T[::g]                                   # [D/G, V]
    elif qat.weight_grid(quant, expert=len(shape) > 2)['axis'] == qat.OUT_AXIS:
      out[path] = field.reshape(*shape[:-1], -1)[..., ::g]       # [E, in, out/G]
    else:
      out[path] = field.reshape(*shape[:-2], -1, shape[-1])[..., ::g, :]   # [in/G, out]
  return out


def import_snapshot(snapshot: str, out: str, log=print) -> str:
  """Writes `<out>/checkpoints/0` and `<out>/release/`; returns the checkpoint step dir."""
  from flax import nnx
  from mobilemoe_jax.model import Transformer
  from mobilemoe_jax.train import checkpoint as ckpt_lib

  if os.path.exists(os.path.join(out, 'checkpoints')):
    raise FileExistsError(f'{out}/checkpoints already exists: import into a new directory')
  model_cfg, layout_name, weights, scales, metadata = read_snapshot(snapshot)
  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  _, params, rest = nnx.split(abstract, nnx.Param, ...)
  values = layout.to_ours(weights, model_cfg, snapshot)
  if scales:   # the same mapping moves each weight's scale field (groups repeated) along
    _warn_zero_scales(scales, log)
    fields = {n: release.expand_groups(s, weights[n].shape[-1]) for n, s in scales.items()}
    values.update(_scale_params(params, layout.to_ours({**weights, **fields}, model_cfg, snapshot),
                                model_cfg.quant))
    del fields
  del weights
  state = {'params': _fill(params, values, snapshot), 'rest': _fill(rest, values, snapshot)}
  release_dir = os.path.join(out, 'release')
  os.makedirs(release_dir, exist_ok=True)
  shutil.copyfile(os.path.join(snapshot, 'config.json'), os.path.join(release_dir, 'config.json'))
  copied = [f for f in release.SIDE_FILES if os.path.isfile(os.path.join(snapshot, f))]
  for f in copied:
    shutil.copyfile(os.path.join(snapshot, f), os.path.join(release_dir, f))
  tokenizer = os.path.join(release_dir, 'tokenizer.json')
  ckpt_dir = os.path.abspath(os.path.join(out, 'checkpoints'))
  entry = {'stage': IMPORT_STAGE, 'checkpoint': os.path.join(ckpt_dir, '0'), 'step': 0,
           'snapshot': os.path.abspath(snapshot), 'release': os.path.abspath(release_dir),
           'layout': layout_name, 'metadata': metadata}
  config = {'model': model_cfg.to_dict(),
            'data': {'train': {'tokenizer': os.path.abspath(tokenizer) if os.path.isfile(tokenizer) else ''}}}
  meta = {'stage': IMPORT_STAGE, 'step': 0, 'lineage': [entry], 'config': config}
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=1, async_save=False)
  ckpt.save(0, state, None, meta)
  ckpt.wait()
  ckpt.close()
  log(f'[convert] {snapshot}: {layout_name} layout -> {entry["checkpoint"]}; '
      f'side files: {copied or "none"}')
  if layout_name == 'qat':   # a QAT stage must build the same grid to start from these params
    log('[convert] a QAT stage continues from the released integers with --config.train.init_from='
        f'{ckpt_dir} ' + ' '.join(f'--config.model.quant.{k}={v}' for k, v in release.QAT_QUANT.items()
                                  if k in ('learnable_scale', 'learnable_embedding_scale',
                                           'expert_group_axis', 'scale_rule')))
  return entry['checkpoint']


def _fill(abstract_state, values: dict, where: str):
  """The abstract nnx.State with every variable set from `values` (path -> array, cast to the
  variable's dtype and checked against its shape)."""
  from flax import nnx
  flat = nnx.to_flat_state(abstract_state)
  for path, var in flat:
    path = tuple(path)
    want = var.get_value()
    if path not in values:
      raise FormatError(f'{where}: nothing maps to our parameter {"/".join(map(str, path))}')
    v = np.asarray(values[path])
    if v.shape != want.shape:
      raise FormatError(f'{where}: parameter {"/".join(map(str, path))}: shape {v.shape}, '
                        f'the model expects {want.shape}')
    var.set_value(np.asarray(v, want.dtype))
  return nnx.from_flat_state(flat)


def _warn_zero_scales(scales, log):
  """A zero scale keeps the group's values (0) but not its integers: export writes 0s."""
  for name, s in scales.items():
    zero = s == 0
    if zero.any():
      log(f'[convert] note: {name}: {int(zero.sum())} groups have scale 0; their integers '
          'are not kept (every value is 0; export writes q = 0 there)')


# ---- export -------------------------------------------------------------------------------

def _import_entry(meta: dict) -> dict | None:
  """The lineage entry of the import this checkpoint descends from, if any."""
  for entry in meta.get('lineage', []):
    if entry.get('stage') == IMPORT_STAGE and entry.get('release'):
      return entry
  return None


def _release_grid(quant) -> str | None:
  """Why a QAT config's integers cannot be stored in the release format (None: they can)."""
  want = {k: v for k, v in release.QAT_QUANT.items() if k not in (
      'learnable_scale', 'learnable_embedding_scale', 'activations', 'scale_rule')}
  bad = [f'model.quant.{k}={quant.get(k)!r} (the format needs {v!r})' for k, v in want.items()
         if quant.get(k) != v]
  return '; '.join(bad) or None


def release_tensors(model, layout_name: str) -> dict:
  """{file tensor name: array} of an nnx model in the release layout ('qat' or 'bf16')."""
  from mobilemoe_jax.quant import extract
  cfg = model.cfg
  release.check_expressible(cfg)
  why = _release_grid(cfg.quant) if layout_name == 'qat' else None
  if why:
    raise ValueError(f'cannot write the QAT layout: {why}')
  params = layout.from_model(model)
  out = {}
  if not cfg.moe.expert_bias:   # the release always has one; no bias is a zero bias
    out.update({f'model.layers.{i}.feed_forward.expert_bias': np.zeros(cfg.moe.n_experts, ml_dtypes.bfloat16)
                for i in range(cfg.n_layers) if config_lib.is_moe_layer(cfg, i)})
  if layout_name == 'bf16':
    if cfg.quant.weights is not None:   # the weights the QAT forward computes with
      params.update({p: np.asarray(w) for p, w in extract.dequantized_state(model).items()})
    for name, a in layout.to_release(params, cfg).items():
      out[name] = a.astype(np.float32 if name.endswith('router.weight') else ml_dtypes.bfloat16)
    return out
  ints, fields = dict(params), dict(params)
  for path, e in extract.integer_weights(model).items():
    q, s, axis = np.asarray(e['q']), np.asarray(e['scales'], np.float32), e['axis']
    s = np.repeat(s, q.shape[axis] // s.shape[axis], axis=axis)   # each group's scale repeated
    fold = (lambda a: a.T) if e.get('transposed') else (lambda a, e=e: a.reshape(e['shape']))
    ints[path], fields[path] = fold(q.astype(np.float32)), fold(s)
  ints, fields = layout.to_release(ints, cfg), layout.to_release(fields, cfg)
  floats = layout.to_release(params, cfg)
  for name in layout.tensor_shapes(cfg):
    if not release.is_quantized(name):
      out[name] = floats[name].astype(np.float32 if name.endswith('router.weight') else ml_dtypes.bfloat16)
      continue
    qname, sname = release.packed_names(name)
    scale = fields[name][..., ::release.GROUP]
    if not np.array_equal(scale.astype(np.float16).astype(np.float32), scale):
      raise ValueError(f'{sname}: scales not representable in float16')
    out[qname] = release.pack(ints[name].astype(np.int8))
    out[sname] = scale.astype(np.float16)
  return out


def quantized_for_release(model):
  """A float model -> the same weights under the release grid with max-abs scales on the
  paper's rule (post-training INT4); a model already under QAT is returned as it is."""
  if model.cfg.quant.weights is not None:
    return model
  from flax import nnx
  from mobilemoe_jax.model import Transformer
  cfg = model.cfg.copy_and_resolve_references()
  cfg.quant.update({**release.QAT_QUANT, 'learnable_scale': False})
  ptq = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, _, _ = nnx.split(ptq, nnx.Param, ...)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, params, rest)


def export_checkpoint(checkpoint: str, out_dir: str, fmt: str | None = None, log=print) -> str:
  """An Orbax checkpoint -> a `mobilemoe` snapshot dir. fmt: 'qat' | 'bf16' | None (qat for
  a QAT checkpoint, else bf16). Returns out_dir."""
  from mobilemoe_jax.train import loading
  if fmt not in ('qat', 'bf16', None):
    raise ValueError(f'--format {fmt!r}: choose qat or bf16')
  model = loading.load_checkpoint(checkpoint, need_tokenizer=False).model
  meta = loading.read_meta(checkpoint)
  fmt = fmt or ('qat' if model.cfg.quant.weights is not None else 'bf16')
  source = _import_entry(meta)
  base, metadata = None, {'format': 'pt'}
  if source:
    with open(os.path.join(source['release'], 'config.json')) as f:
      base = json.load(f)
    metadata = source.get('metadata') or None
  tensors = release_tensors(quantized_for_release(model) if fmt == 'qat' else model, fmt)
  os.makedirs(out_dir, exist_ok=True)
  write(os.path.join(out_dir, 'model.safetensors'), tensors, metadata)
  cfg_json = release.config_json(model.cfg, base, quantized=fmt == 'qat')
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(cfg_json, f, indent=2)
    f.write('\n')
  copied = _copy_side_files(source, meta, out_dir)
  log(f'[convert] {checkpoint} -> {out_dir} ({fmt}, {len(tensors)} tensors; side files: '
      f'{copied or "none"})')
  return out_dir


def _copy_side_files(source, meta, out_dir) -> list:
  """The import's tokenizer / remote-code files, else the checkpoint's tokenizer.json."""
  copied = []
  if source:
    for f in release.SIDE_FILES:
      src = os.path.join(source['release'], f)
      if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(out_dir, f))
        copied.append(f)
    return copied
  tok = ml_collections.ConfigDict(meta['config']).get('data', {}).get('train', {}).get('tokenizer', '')
  if tok and tok.endswith('.json') and os.path.isfile(tok):
    shutil.copyfile(tok, os.path.join(out_dir, 'tokenizer.json'))
    copied.append('tokenizer.json')
  return copied
