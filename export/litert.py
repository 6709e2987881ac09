"""PyTorch MobileMoE -> LiteRT `.tflite` with `prefill_<T>` and `decode` signatures.

Inputs: token ids [1, T] int32, input_pos [T] int32 and the external KV cache
(`kv_cache_k_<i>` [1, K, S, Dh] and `kv_cache_v_<i>` [1, K, Dh, S] f32; decode's S is the
cache length, prefill_<T>'s the kv_len - T slots it can see), which the graph only reads.
Outputs: the new tokens' rows `new_k_<i>` / `new_v_<i>` [1, T, K, Dh] f32, written into the
cache by the caller (export.runner keeps the cache in the decode signature's own input
buffers and writes them there: a decode step copies no cache), and logits [1, T, V] f32,
or with prefill_logits='last' [1, 1, V] for the token at the prefill's extra input
`last_index` [1] int32 (its index in the padded chunk): what an app samples from, without
the T x V lm_head and logits copy (at V=202k and T=512 more MACs than a MoE model's whole
body). That is export.runner's convention; convention='litertlm' writes the LiteRT-LM
runtime's instead (ExportableLiteRTLM). kv_cache='int8' makes the cache tensors int8 with
f32 scales `kv_cache_{k,v}_scale_<i>` [1, K, S] (torch_model.set_kv_cache_dtype).

Quantization is done by ai-edge-quantizer on the fp32 flatbuffer (the same library that
litert-torch's quant_config calls, and it also offers INT4 channel-wise, which litert-torch's
recipe refuses): weights of FULLY_CONNECTED ops on quant.grid's scheme with dynamic int8
activations, the embedding gather on its own scheme, the MoE router kept in fp32 (a
4-bit router flips expert choices). quant.grid's tests pin the integers to that tool.
"""
import os
import tempfile
import time

import numpy as np
import torch

from export import flatbuf
from export.runner import CACHE_PARTS   # torch_model's order: k, v (, int8 scales)

PREFILL_LOGITS = ('all', 'last')
# 'runner': export.runner's signatures (cache read only, new rows out: zero copy);
# 'litertlm': the LiteRT-LM runtime's (ExportableLiteRTLM), for .litertlm bundles.
CONVENTIONS = ('runner', 'litertlm')
QUANTS = ('int4_g32', 'int4_channel', 'int8', 'fp32')
# 'auto': the FC scheme, so a tied embedding is stored once for the gather and the lm_head.
EMBEDDINGS = ('auto', 'int4_g32', 'int4', 'int8', 'fp32')
_AUTO_EMBEDDING = {'int4_g32': 'int4_g32', 'int4_channel': 'int4', 'int8': 'int8', 'fp32': 'fp32'}
# The quant.grid scheme each choice writes (None: float).
FC_SCHEMES = {'int4_g32': 'int4_g32', 'int4_channel': 'int4_channel', 'int8': 'int8_channel',
              'fp32': None}
EMBEDDING_SCHEMES = {'int8': 'int8_channel', 'int4': 'int4_channel', 'int4_g32': 'int4_g32',
                     'fp32': None}


class Exportable(torch.nn.Module):
  """Named inputs/outputs for the signatures: the cache comes in (`kv_cache_{k,v}_<i>`,
  read only), the new tokens' rows go out (`new_{k,v}_<i>`) with the logits."""

  def __init__(self, model):
    super().__init__()
    self.model = model

  def forward(self, tokens, input_pos, kv_cache, last_index=None):
    logits, new = self.model(tokens, input_pos, layer_caches(kv_cache, self.model), last_index)
    out = {'logits': logits}
    for i, rows in enumerate(new):
      for name, x in zip(CACHE_PARTS, rows):
        out[f'new_{name}_{i}'] = x
    return out


def layer_caches(kv_cache: dict, model) -> list:
  """The signature's `kv_cache` dict ({'k_0': ..}) -> per layer the tuple torch_model takes."""
  parts = CACHE_PARTS if 'k_scale_0' in kv_cache else CACHE_PARTS[:2]
  return [tuple(kv_cache[f'{p}_{i}'] for p in parts) for i in range(len(model.blocks))]


class ExportableLiteRTLM(torch.nn.Module):
  """The signature contract of Google's LiteRT-LM runtime (litert_lm.Engine), as litert-torch's
  generative models export it: inputs `tokens` [1, T], `input_pos` [T] and the whole cache
  `kv_cache_{k,v}_<i>` (the same kv_len slots in every signature: the runtime allocates one
  buffer per name and binds it to all of them); outputs the updated cache under the same
  names (the new rows written in the graph by DYNAMIC_UPDATE_SLICE; on CPU the runtime binds
  the output to the input's buffer) and, in `decode` only, `logits` [1, 1, V] (a prefill may
  output cache tensors only). The runtime pads a prefill chunk with token 0 at position 0,
  so the graph numbers the chunk's tokens from input_pos[0] (the real tokens come first)."""

  def __init__(self, model, with_logits: bool):
    super().__init__()
    self.model = model
    self.with_logits = with_logits

  def forward(self, tokens, input_pos, kv_cache):
    from litert_torch.generative.custom_ops import dynamic_update_slice as dus
    t = tokens.shape[1]
    pos = input_pos[:1] + torch.arange(t, dtype=input_pos.dtype)
    cache = layer_caches(kv_cache, self.model)
    last = torch.tensor([t - 1], dtype=torch.int32) if self.with_logits else None
    logits, new = self.model(tokens, pos, cache, last)
    out = {'logits': logits} if self.with_logits else {}
    zero, p0 = torch.zeros([], dtype=torch.int32), pos[0].reshape([])
    for i, (old, rows) in enumerate(zip(cache, new)):
      # Each tensor takes the new rows at slot p0 of its slot axis: k [1, K, S, Dh] axis 2,
      # v [1, K, Dh, S] axis 3, scales [1, K, S] axis 2 (rows [1, T, K, Dh] / [1, T, K]).
      rows = ((rows[0].transpose(1, 2), rows[1].permute(0, 2, 3, 1))
              + tuple(r.transpose(1, 2) for r in rows[2:]))
      for name, c, r in zip(CACHE_PARTS, old, rows):
        at = [zero] * c.dim()
        at[3 if name == 'v' else 2] = p0
        out[f'kv_cache_{name}_{i}'] = dus.dynamic_update_slice(c, r, at)
    return out


def empty_kv(cfg: dict, slots: int, dtype: str = 'f32') -> dict:
  """The cache inputs of a signature with `slots` past slots (torch_model's layouts:
  k [1, K, slots, Dh], v [1, K, Dh, slots]; int8: those in int8 and k_scale / v_scale
  [1, K, slots] f32)."""
  k = (1, cfg['n_kv_heads'], slots, cfg['head_dim'])
  v = (1, cfg['n_kv_heads'], cfg['head_dim'], slots)
  int8 = dtype == 'int8'
  out = {}
  for i in range(cfg['n_layers']):
    out[f'k_{i}'] = torch.zeros(k, dtype=torch.int8 if int8 else torch.float32)
    out[f'v_{i}'] = torch.zeros(v, dtype=torch.int8 if int8 else torch.float32)
    if int8:
      out[f'k_scale_{i}'], out[f'v_scale_{i}'] = torch.zeros(k[:3]), torch.zeros(k[:3])
  return out


def past_slots(kv_len: int, t: int) -> int:
  """Cache slots a prefill_<t> signature reads: a chunk starts at pos <= kv_len - t, so no
  later slot is ever visible to it (at least 1: a tensor needs a size)."""
  return max(kv_len - t, 1)


def convert_fp32(model, out_path: str, prefill_lens=(32, 128), kv_len: int = 0, log=print,
                 prefill_logits='all', convention='runner'):
  """Traces prefill_<T> for each T and decode, and writes the fp32 flatbuffer."""
  from export import keep_jax_x64
  if prefill_logits not in PREFILL_LOGITS:
    raise ValueError(f'unknown prefill_logits {prefill_logits!r}; choose from {PREFILL_LOGITS}')
  if convention not in CONVENTIONS:
    raise ValueError(f'unknown signature convention {convention!r}; choose from {CONVENTIONS}')
  with keep_jax_x64(inside=True):
    return _convert_fp32(model, out_path, prefill_lens, kv_len, log, prefill_logits, convention)


def _convert_fp32(model, out_path, prefill_lens, kv_len, log, prefill_logits, convention):
  import litert_torch
  cfg = model.cfg
  dtype = model.blocks[0].attn.cache_dtype          # torch_model.set_kv_cache_dtype
  kv_len = kv_len or cfg['max_seq_len']
  if kv_len > cfg['max_seq_len'] or max(prefill_lens) > kv_len:
    raise ValueError(f'kv_len={kv_len} must be <= max_seq_len={cfg["max_seq_len"]} and >= '
                     f'every prefill length {tuple(prefill_lens)}')
  conv = None
  if convention == 'litertlm':
    prefill = ExportableLiteRTLM(model, with_logits=False).eval()
    decode = ExportableLiteRTLM(model, with_logits=True).eval()
    for t in prefill_lens:
      kw = dict(tokens=torch.zeros((1, t), dtype=torch.int32),
                input_pos=torch.arange(t, dtype=torch.int32), kv_cache=empty_kv(cfg, kv_len, dtype))
      conv = (litert_torch if conv is None else conv).signature(f'prefill_{t}', prefill, sample_kwargs=kw)
    kw = dict(tokens=torch.zeros((1, 1), dtype=torch.int32),
              input_pos=torch.zeros((1,), dtype=torch.int32), kv_cache=empty_kv(cfg, kv_len, dtype))
    conv = conv.signature('decode', decode, sample_kwargs=kw)
    return _write(conv, out_path, len(prefill_lens) + 1, log)
  mod = Exportable(model).eval()
  for t in prefill_lens:
    kw = dict(tokens=torch.zeros((1, t), dtype=torch.int32),
              input_pos=torch.arange(t, dtype=torch.int32),
              kv_cache=empty_kv(cfg, past_slots(kv_len, t), dtype))
    if prefill_logits == 'last':
      kw['last_index'] = torch.tensor([t - 1], dtype=torch.int32)
    conv = (litert_torch if conv is None else conv).signature(f'prefill_{t}', mod, sample_kwargs=kw)
  # decode's cache inputs hold all kv_len slots: the runner keeps the cache in them.
  kw = dict(tokens=torch.zeros((1, 1), dtype=torch.int32),
            input_pos=torch.zeros((1,), dtype=torch.int32), kv_cache=empty_kv(cfg, kv_len, dtype))
  conv = conv.signature('decode', mod, sample_kwargs=kw)
  return _write(conv, out_path, len(prefill_lens) + 1, log)


def _write(conv, out_path, n_signatures, log):
  t0 = time.time()
  log(f'[export] tracing and lowering {n_signatures} signatures with litert-torch...')
  conv.convert().export(out_path)
  log(f'[export] fp32 flatbuffer written ({time.time() - t0:.0f}s)')
  return out_path


def recipe(quant: str, embedding: str, cfg: dict):
  """The ai-edge-quantizer recipe for a `--quant` choice (None for fp32)."""
  from ai_edge_quantizer import qtyping
  from ai_edge_quantizer import recipe as R
  if quant not in QUANTS:
    raise ValueError(f'unknown --quant {quant!r}; choose from {QUANTS}')
  if embedding not in EMBEDDINGS:
    raise ValueError(f'unknown embedding quantization {embedding!r}; choose from {EMBEDDINGS}')
  embedding = _AUTO_EMBEDDING[quant] if embedding == 'auto' else embedding
  fc = qtyping.TFLOperationName.FULLY_CONNECTED
  emb = qtyping.TFLOperationName.EMBEDDING_LOOKUP
  rules = []
  if quant != 'fp32':
    make = {'int4_g32': R.dynamic_wi4b32_afp32, 'int4_channel': R.dynamic_wi4c_afp32,
            'int8': R.dynamic_wi8c_afp32}[quant]
    rules += make(operation_name=fc)
    # The router [E, D] is the smallest FC weight; min_weight_elements keeps it in fp32
    # (a regex on its name does not reach it). Checked after quantization by check_router.
    router = cfg['moe']['n_experts'] * cfg['d_model']
    if router:
      for r in rules:
        r['op_config']['min_weight_elements'] = router + 1
  if embedding != 'fp32':
    make = {'int8': R.dynamic_wi8c_afp32, 'int4': R.dynamic_wi4c_afp32,
            'int4_g32': R.dynamic_wi4b32_afp32}[embedding]
    rules += make(operation_name=emb)
  return rules or None


def smallest_non_router_fc(cfg: dict) -> int:
  d, kv, dh = cfg['d_model'], cfg['n_kv_heads'], cfg['head_dim']
  sizes = [d * kv * dh, d * d if not cfg['moe']['n_experts'] else d * cfg['moe']['d_expert']]
  if cfg['moe']['n_shared']:
    sizes.append(d * cfg['moe']['n_shared'] * cfg['moe']['d_shared'])
  return min(sizes)


def quantize(fp32_path: str, out_path: str, quant: str, embedding: str, cfg: dict, log=print):
  rules = recipe(quant, embedding, cfg)
  if rules is None:
    if fp32_path != out_path:
      os.replace(fp32_path, out_path)
    return out_path
  if cfg['moe']['n_experts'] and smallest_non_router_fc(cfg) <= cfg['moe']['n_experts'] * cfg['d_model']:
    raise ValueError('cannot keep the router in fp32: another FC weight is as small as it '
                     '(min_weight_elements would skip that one too)')
  from ai_edge_quantizer import quantizer
  t0 = time.time()
  log(f'[export] quantizing weights ({quant}, embedding {embedding}) with ai-edge-quantizer...')
  # Its size report and bars are off: the export's own report gives the file's size and INT4 share.
  quantizer.Quantizer(fp32_path, rules).quantize(
      enable_progress_bar=False, enable_progress_report=False).export_model(out_path, overwrite=True)
  log(f'[export] quantized ({time.time() - t0:.0f}s)')
  return out_path


def export(model, out_path: str, *, quant='int4_g32', embedding='auto', moe='portable',
           attention='portable', prefill_lens=(32, 128), kv_len=0, prefill_logits='all',
           convention='runner', kv_cache='f32', log=print):
  """torch model -> out_path. Returns the report dict (see report()).
  moe / attention: 'portable' (stock builtins) or 'delegate' (MobileMoeBlock /
  MobileKvAttention custom ops, in every signature for attention: the file then needs
  export/delegate loaded, runner.needs_delegate).
  prefill_logits: 'all' (every position: scoring needs them) or 'last' (see the module doc).
  convention: 'runner' (export.runner) or 'litertlm' (the LiteRT-LM runtime, CONVENTIONS).
  kv_cache: 'f32' or 'int8' (torch_model.set_kv_cache_dtype: int8 cache tensors + f32
  scales per token and KV head)."""
  if kv_cache == 'int8' and attention == 'delegate':
    raise ValueError('an int8 KV cache needs --attention portable: the MobileKvAttention op '
                     'reads an f32 cache')
  if moe == 'delegate' and quant not in ('int4_g32', 'int4_channel') and model.cfg['moe']['n_experts']:
    log(f'[export] note: the MobileMoeBlock op holds INT4 block-32 experts, not {quant}')
  model.set_moe_lowering(moe, group_size=moe_group_size(quant))
  model.set_attention_lowering(attention)
  model.set_kv_cache_dtype(kv_cache)
  try:
    with tempfile.TemporaryDirectory() as tmp:
      fp32 = os.path.join(tmp, 'fp32.tflite')
      convert_fp32(model, fp32, prefill_lens, kv_len, log, prefill_logits, convention)
      quantize(fp32, out_path, quant, embedding, model.cfg, log)
    exact = write_grid(out_path, model, quant, embedding, log)
  finally:   # the caller's model comes back as it was given: the next export starts plain
    model.set_moe_lowering('portable')
    model.set_attention_lowering('portable')
    model.set_kv_cache_dtype('f32')
  return dict(report(out_path), exact_grid=exact)


def moe_group_size(quant: str) -> int:
  """The MobileMoeBlock op's expert group size for a file quantized as `quant`: channel-wise
  (0) for int4_channel, block-32 otherwise (int8/fp32 files still get INT4 experts)."""
  return 0 if quant == 'int4_channel' else 32


def _schemes(quant: str, embedding: str):
  """(FC scheme, embedding scheme) as quant.grid Schemes (None: float)."""
  from mobilemoe_jax.quant import grid
  embedding = _AUTO_EMBEDDING[quant] if embedding == 'auto' else embedding
  get = lambda s: None if s is None else grid.get_scheme(s)
  return get(FC_SCHEMES[quant]), get(EMBEDDING_SCHEMES[embedding])


def write_grid(path: str, model, quant: str, embedding: str, log=print) -> dict:
  """Overwrites the integers and scales ai-edge-quantizer computed (max-abs, from the float
  weights) with the QAT checkpoint's own (`module.grid`, see torch_model.from_flax) wherever
  the file uses the checkpoint's scheme, in place. Learned (LSQ) scales and their integers
  then reach the file exactly; for max-abs checkpoints nothing changes (checked).

  The quantizer's tensor of a weight is found by content: it is bit-exact with
  quant.grid.quantize of the float weight (tests/test_quant_grid.py). Every weight on the
  file's scheme must be found, or this raises."""
  from export import torch_model
  from mobilemoe_jax.quant import grid
  fc, emb = _schemes(quant, embedding)
  tied = model.head is None
  delegate = [f'{n}.' for n, m in model.named_modules()
              if isinstance(m, torch_model.MoE) and m.lowering == 'delegate']
  targets, expected = {}, set()
  for name, g in torch_model.grids(model).items():
    if any(name.startswith(p) for p in delegate):
      continue                       # inside the MobileMoeBlock op: moe_op packs these
    scheme = grid.get_scheme(g.scheme)
    if scheme not in ((emb, fc if tied else None) if name == 'embed.weight' else (fc,)):
      continue                       # the file uses another grid for it: left to the quantizer
    expected.add(name)
    w = model.get_parameter(name).detach().numpy()
    q, s = grid.quantize(w, scheme)
    key = (scheme, q.shape, q.tobytes(), s.tobytes())
    if key in targets and not _same_grid(targets[key][1], g):
      raise ValueError(f'{name} and {targets[key][0]} quantize to the same tensor but carry '
                       'different integers: cannot tell their tensors apart')
    targets[key] = (name, g)
  if not targets:
    return {'weights': 0, 'tensors': 0, 'changed': 0}
  model_fb, original = flatbuf.load(path)
  raw = bytearray(original)     # patched; tensors are read from the original (shared buffers)
  found, changed, tensors = set(), set(), 0
  for sg, t in flatbuf.quantized_constants(model_fb):
    q = flatbuf.tensor_value(model_fb, original, t)
    s, _, block = flatbuf.weight_quant(model_fb, original, sg, t)
    scheme = grid.Scheme(4 if t.type == flatbuf.T.INT4 else 8, block)
    hit = targets.get((scheme, q.shape, q.tobytes(), s.reshape(q.shape[0], -1).tobytes()))
    if hit is None:
      continue
    name, g = hit
    if not (np.isfinite(g.scales).all() and (g.scales > 0).all()):
      raise ValueError(f'{name}: its scales must be positive and finite to be stored')
    flatbuf.write_weight(raw, model_fb, sg, t, g.q, g.scales)
    found.add(name)
    tensors += 1
    if not _same_grid(g, torch_model.Grid(q, s.reshape(g.scales.shape), g.scheme)):
      changed.add(name)
  missing = sorted(expected - found)
  if missing:
    raise RuntimeError(f'{path}: no quantized tensor found for {missing[:5]}: the quantizer '
                       'did not write our grid, so the exact integers cannot be placed')
  with open(path, 'wb') as f:
    f.write(raw)
  log(f'[export] wrote the checkpoint\'s exact integers and scales of {len(found)} weights '
      f'({tensors} tensors; {len(changed)} weights differed from the max-abs grid)')
  return {'weights': len(found), 'tensors': tensors, 'changed': len(changed)}


def _same_grid(a, b) -> bool:
  return np.array_equal(a.q, b.q) and np.array_equal(a.scales, b.scales)


def report(path: str) -> dict:
  """File size, weight bytes per storage type (read from the schema), signatures, ops."""
  model, raw = flatbuf.load(path)
  by_type = flatbuf.weight_bytes_by_type(model, raw)
  total = sum(by_type.values())
  moe_q4 = 0
  if 'MobileMoeBlock' in flatbuf.op_names(model):
    from export import moe_op
    for _, ws in moe_op.read_ops(raw):
      moe_q4 += sum(v.nbytes for k, v in ws.items() if k.endswith('_q'))   # already packed
  sigs = flatbuf.signatures(model)
  return {
      'path': path,
      'file_bytes': len(raw),
      'weight_bytes': by_type,
      # Packed INT4 expert weights of the custom op are stored as uint8 bytes.
      'int4_fraction': (by_type.get('INT4', 0) + moe_q4) / total if total else 0.0,
      'signatures': sorted(sigs),
      'prefill_logits': prefill_logits(sigs),
      'ops': flatbuf.op_names(model),
  }


def prefill_logits(sigs: dict) -> str:
  """'last' if the prefill signatures take `last_index` (flatbuf.signatures' dict), else 'all'."""
  kinds = {'last' if 'last_index' in ins else 'all'
           for k, (ins, _) in sigs.items() if k.startswith('prefill_')}
  if len(kinds) > 1:
    raise ValueError(f'prefill signatures disagree on their logits: {sorted(sigs)}')
  return kinds.pop() if kinds else 'all'


def check_router(path: str):
  """Names of FC weights still in float (expected: only the routers)."""
  model, raw = flatbuf.load(path)
  sg = model.subgraphs[0]
  out = []
  for op in sg.operators:
    oc = model.operatorCodes[op.opcodeIndex]
    if max(oc.builtinCode, oc.deprecatedBuiltinCode) == 9:
      t = sg.tensors[op.inputs[1]]
      if t.type == flatbuf.T.FLOAT32:
        out.append(t.name.decode() if isinstance(t.name, bytes) else t.name)
  return out


def fake_quant(model, quant: str, embedding: str, moe: str = 'portable', xnnpack: bool = False):
  """A copy of the torch model whose weights are replaced by their dequantized grid values
  (quant.grid), i.e. what the quantized .tflite holds: every FC but the routers on `quant`,
  the embedding gather on `embedding`, a tied lm_head as its own FC weight. Activations
  stay float (the .tflite quantizes them dynamically on top). moe: the file's MoE lowering;
  'delegate' keeps the routed experts the MobileMoeBlock op holds exactly (a release
  checkpoint's out-axis integers, moe_op.exact_experts) at their values; 'portable' files
  re-grid them. xnnpack: the values XNNPACK computes with instead, which rounds the fp16
  scales of block-wise FC weights to bf16 (xnnpack_block_scales); the gather and the
  MobileMoeBlock op use the stored ones."""
  import copy
  from export import moe_op, torch_model
  from mobilemoe_jax.quant import grid
  fc, emb = _schemes(quant, embedding)
  exact, in_op = set(), set()
  if moe == 'delegate':
    for n, mod in model.named_modules():
      if isinstance(mod, torch_model.MoE):
        in_op |= {f'{n}.{c}' for c, sub in mod.named_modules() if isinstance(sub, torch.nn.Linear)}
        if moe_op.exact_experts(mod, moe_group_size(quant)):
          exact |= {f'{n}.gate_up'} | {f'{n}.down.{j}' for j in range(mod.e)}

  def fq(mod, scheme, bf16_scales=False):
    g = getattr(mod, 'grid', None)
    on_grid = g is not None and grid.get_scheme(g.scheme) == scheme
    bf16_scales = bf16_scales and scheme is not None and bool(scheme.group)
    if scheme is None or (on_grid and not bf16_scales):
      return mod.weight       # float, or already its checkpoint's grid values (write_grid)
    q, s = (g.q, g.scales) if on_grid else grid.quantize(mod.weight.detach().numpy(), scheme)
    return torch.from_numpy(grid.dequantize(q, xnnpack_block_scales(s) if bf16_scales else s))

  m = copy.deepcopy(model)
  with torch.no_grad():
    if m.head is None:
      m.head = torch.nn.Linear(m.cfg['d_model'], m.cfg['vocab_size'], bias=False)
      m.head.weight.copy_(m.embed.weight)
      m.head.grid = getattr(m.embed, 'grid', None)
    for name, mod in m.named_modules():
      if isinstance(mod, torch.nn.Linear) and not name.endswith('router') and name not in exact:
        mod.weight.copy_(fq(mod, fc, bf16_scales=xnnpack and name not in in_op))
    m.embed.weight.copy_(fq(m.embed, emb))
  return m


def xnnpack_block_scales(scales):
  """Block-wise INT4 scales as XNNPACK's FC computes with them: the file's fp16 values
  rounded to bf16 (to nearest even) when it packs the weights (export/README.md, "Agreement
  with JAX", has the evidence). Scales on the 'tflite' rule are bf16 values already
  (quant.grid.stored_scale); a released checkpoint's fp16 ones move by up to 2^-8."""
  import ml_dtypes
  return np.asarray(scales, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
