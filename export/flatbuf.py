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
      if t.buffer and t.buffer not in seen and (
          (model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data))
          or model.buffers[t.buffer].offset > 1):
        seen.add(t.buffer)
        yield sg, t


def weight_bytes_by_type(model, raw) -> dict:
  """Stored bytes of constant tensors per type name (INT4 counted at half a byte each)."""
  out = {}
  for _, t in constant_tensors(model):
    name = TYPE_NAMES.get(t.type, str(t.type))
    out[name] = out.get(name, 0) + len(buffer_bytes(model, raw, t.buffer))
  return out


def signatures(model) -> dict:
  """{signature key: ([input names], [output names])}."""
  out = {}
  for s in model.signatureDefs or []:
    key = s.signatureKey.decode() if isinstance(s.signatureKey, bytes) else s.signatureKey
    names = lambda ts: [x.name.decode() if isinstance(x.name, bytes) else x.name for x in ts or []]
    out[key] = (names(s.inputs), names(s.outputs))
  return out


def op_names(model) -> list:
  """Operator names (builtin or custom) used by the model, sorted."""
  names = set()
  ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith('_')}
  for oc in model.operatorCodes:
    code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
    if code == schema.BuiltinOperator.CUSTOM:
      c = oc.customCode
      names.add(c.decode() if isinstance(c, bytes) else c)
    else:
      names.add(ops.get(code, str(code)))
  return sorted(names)


def save(model, path=None) -> bytes:
  import flatbuffers
  b = flatbuffers.Builder(1 << 20)
  b.Finish(model.Pack(b), file_identifier=b'TFL3')
  data = bytes(b.Output())
  if path:
    with open(path, 'wb') as f:
      f.write(data)
  return data
