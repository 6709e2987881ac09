"""Reading (and rewriting) .tflite flatbuffers through the schema's object API.

`Interpreter.get_tensor_details()` reports INT4 tensors as int8, so everything that must
know the real storage type (the INT4 checks, the report, the delegate lowering) reads the
schema here instead.
"""
import numpy as np
from ai_edge_litert import schema_py_generated as schema

T = schema.TensorType
TYPE_NAMES = {v: k for k, v in vars(T).items() if not k.startswith('_')}
_NP = {T.FLOAT32: np.float32, T.FLOAT16: np.float16, T.INT32: np.int32, T.INT8: np.int8,
       T.UINT8: np.uint8, T.INT64: np.int64, T.INT16: np.int16, T.BOOL: np.bool_}


def load(path_or_bytes):
  """-> (ModelT, raw bytes). Buffers past 2 GB live after the flatbuffer (offset/size)."""
  raw = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else \
      open(path_or_bytes, 'rb').read()
  return schema.ModelT.InitFromPackedBuf(raw, 0), raw


def buffer_bytes(model, raw, index: int) -> np.ndarray:
  b = model.buffers[index]
  if b.data is not None and len(b.data):
    return np.asarray(b.data, np.uint8)
  if b.offset > 1:
    return np.frombuffer(raw, np.uint8, b.size, b.offset)
  return np.zeros((0,), np.uint8)


def tensor_value(model, raw, tensor) -> np.ndarray:
  """The constant data of a tensor in its stored integer/float type; INT4 is unpacked to
  int8 values in [-8, 7] (two per byte, low nibble first)."""
  from mobilemoe_jax.quant import grid
  data = buffer_bytes(model, raw, tensor.buffer)
  shape = [int(d) for d in tensor.shape]
  n = int(np.prod(shape))
  if tensor.type == T.INT4:
    return grid.unpack_int4(data, n).reshape(shape)
  return data.view(_NP[tensor.type]).reshape(shape)


def weight_quant(model, raw, sg, tensor):
  """(scales, quantized_dim, block_size) of a quantized constant; block_size 0 = per channel.
  Block-wise scales live in a separate fp16 tensor [out, in/block]."""
  q = tensor.quantization
  if q is None:
    return None
  if q.detailsType == schema.QuantizationDetails.BlockwiseQuantization:
    s = tensor_value(model, raw, sg.tensors[q.details.scales]).astype(np.float32)
    return s, q.quantizedDimension, q.details.blockSize
  if q.scale is None:
    return None
  return np.asarray(q.scale, np.float32), q.quantizedDimension, 0


def constant_tensors(model):
  """Yields (subgraph, tensor) for every tensor with data, once per buffer (tensors shared
  between signatures point at the same buffer)."""
  seen = set()
  for sg in model.subgraphs:
    for t in sg.tensors:
      if t.buffer not in seen and _has_data(model, t.buffer):
        seen.add(t.buffer)
        yield sg, t


def _has_data(model, index: int) -> bool:
  b = model.buffers[index]
  return bool(index) and ((b.data is not None and len(b.data) > 0) or b.offset > 1)


def weight_bytes_by_type(model, raw) -> dict:
  """Stored bytes of constant tensors per type name (INT4 counted at half a byte each)."""
  out = {}
  for _, t in constant_tensors(model):
    name = TYPE_NAMES.get(t.type, str(t.type))
    out[name] = out.get(name, 0) + len(buffer_bytes(model, raw, t.buffer))
  return out


def _str(b) -> str:
  """A string of the file (names, keys): any bytes, so undecodable ones are replaced."""
  return b.decode(errors='replace') if isinstance(b, bytes) else b


def signatures(model) -> dict:
  """{signature key: ([input names], [output names])}."""
  out = {}
  for s in model.signatureDefs or []:
    key = _str(s.signatureKey)
    names = lambda ts: [_str(x.name) for x in ts or []]
    out[key] = (names(s.inputs), names(s.outputs))
  return out


def _code_names(model) -> list:
  """The name (builtin, or a custom op's code) of each entry of model.operatorCodes."""
  ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith('_')}
  out = []
  for oc in model.operatorCodes:
    code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
    if code == schema.BuiltinOperator.CUSTOM:
      out.append(_str(oc.customCode))
    else:
      out.append(ops.get(code, str(code)))
  return out


def op_names(model) -> list:
  """Operator names (builtin or custom) used by the model, sorted."""
  return sorted(set(_code_names(model)))


def signature_op_counts(model) -> dict:
  """{signature key: {operator name: nodes in its subgraph}}."""
  names = _code_names(model)
  out = {}
  for s in model.signatureDefs or []:
    key = _str(s.signatureKey)
    counts = out.setdefault(key, {})
    for op in model.subgraphs[s.subgraphIndex].operators or []:
      counts[names[op.opcodeIndex]] = counts.get(names[op.opcodeIndex], 0) + 1
  return out


def quantized_constants(model):
  """Yields (subgraph, tensor) for every INT4/INT8 constant with scales (a quantized weight;
  the delegate op's packed bytes are int8 without), in every subgraph (per-channel scales
  live in each tensor's table, once per signature)."""
  for sg in model.subgraphs:
    for t in sg.tensors:
      q = t.quantization
      if t.type in (T.INT4, T.INT8) and q is not None and _has_data(model, t.buffer) and (
          q.scale is not None or q.detailsType == schema.QuantizationDetails.BlockwiseQuantization):
        yield sg, t


def write_weight(raw: bytearray, model, sg, tensor, q, scales):
  """Overwrites, in place in `raw` (the file's bytes, parsed as `model`), a quantized
  constant's integers q [shape] and its scales (block-wise [out, in/block] stored fp16, or
  per-channel [out] f32). Same shapes, dtypes and sizes: a byte patch, the layout is kept."""
  q = np.asarray(q).reshape(-1)
  if tensor.type == T.INT4:
    from mobilemoe_jax.quant import grid
    data = grid.pack_int4(np.concatenate([q, np.zeros(len(q) % 2, q.dtype)]))
  else:
    data = q.astype(np.int8).view(np.uint8)
  _buffer_view(raw, model, tensor.buffer)[:] = _same_size(data, _buffer_view(raw, model, tensor.buffer))
  scales = np.asarray(scales, np.float32).reshape(-1)
  quant = tensor.quantization
  if quant.detailsType == schema.QuantizationDetails.BlockwiseQuantization:
    stored = scales.astype(np.float16)
    if not np.array_equal(stored.astype(np.float32), scales):
      raise ValueError(f'{_name(tensor)}: block-wise scales must be fp16 values (the file stores fp16)')
    view = _buffer_view(raw, model, sg.tensors[quant.details.scales].buffer)
    view[:] = _same_size(stored.view(np.uint8), view)
  else:
    root = schema.Model.GetRootAs(raw, 0)
    sg_i = next(i for i, g in enumerate(model.subgraphs) if g is sg)
    t_i = next(i for i, t in enumerate(sg.tensors) if t is tensor)
    view = root.Subgraphs(sg_i).Tensors(t_i).Quantization().ScaleAsNumpy()
    view[:] = _same_size(scales, view)


def _buffer_view(raw: bytearray, model, index: int) -> np.ndarray:
  """A writable uint8 view of buffer `index` inside raw."""
  b = model.buffers[index]
  if b.offset > 1:
    return np.frombuffer(raw, np.uint8, b.size, b.offset)
  return schema.Model.GetRootAs(raw, 0).Buffers(index).DataAsNumpy()


def _same_size(new, old):
  if new.nbytes != old.nbytes:
    raise ValueError(f'byte patch of {old.nbytes} bytes got {new.nbytes}: shapes differ')
  return new


def _name(tensor) -> str:
  return str(_str(tensor.name))


def save(model, path=None) -> bytes:
  import flatbuffers
  b = flatbuffers.Builder(1 << 20)
  b.Finish(model.Pack(b), file_identifier=b'TFL3')
  data = bytes(b.Output())
  if path:
    with open(path, 'wb') as f:
      f.write(data)
  return data
