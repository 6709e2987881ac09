"""A small hand-written .tflite builder (flatbuffers object API).

Used by the delegate tests and the on-device benchmark to make models that
contain the MobileMoeBlock custom op, optionally surrounded by builtin ops,
without depending on the exporter.
"""

from __future__ import annotations

import numpy as np
import flatbuffers
from flatbuffers import flexbuffers
from ai_edge_litert import schema_py_generated as schema

from export.delegate import contract

OP_NAME = contract.MOE.name

_DTYPES = {
    np.dtype(np.float32): schema.TensorType.FLOAT32,
    np.dtype(np.float16): schema.TensorType.FLOAT16,
    np.dtype(np.int32): schema.TensorType.INT32,
    np.dtype(np.uint8): schema.TensorType.UINT8,
    np.dtype(np.int8): schema.TensorType.INT8,
    np.dtype(np.int64): schema.TensorType.INT64,
    np.dtype(np.bool_): schema.TensorType.BOOL,
}


class GraphBuilder:
  """One-subgraph model: add tensors and ops in execution order, then build()."""

  def __init__(self):
    self.tensors, self.ops, self.opcodes = [], [], []
    self.buffers = [schema.BufferT()]  # buffer 0 is the empty sentinel
    self.inputs, self.outputs = [], []

  def tensor(self, name, shape, dtype=np.float32, data=None, tensor_type=None,
             quantization=None) -> int:
    """Adds a tensor; `data` makes it a constant. Returns its index."""
    t = schema.TensorT()
    t.name, t.shape = name, list(shape)
    t.type = tensor_type if tensor_type is not None else _DTYPES[np.dtype(dtype)]
    t.quantization = quantization
    if data is not None:
      b = schema.BufferT()
      b.data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
      self.buffers.append(b)
      t.buffer = len(self.buffers) - 1
    self.tensors.append(t)
    return len(self.tensors) - 1

  def const(self, name, array) -> int:
    array = np.asarray(array)
    return self.tensor(name, array.shape, array.dtype, array)

  def _opcode(self, builtin, custom=None) -> int:
    key = (builtin, custom)
    for i, oc in enumerate(self.opcodes):
      if (oc.builtinCode, oc.customCode) == key:
        return i
    oc = schema.OperatorCodeT()
    oc.builtinCode, oc.customCode = builtin, custom
    oc.deprecatedBuiltinCode = min(builtin, 127)
    self.opcodes.append(oc)
    return len(self.opcodes) - 1

  def op(self, builtin, inputs, outputs, options_type=0, options=None):
    o = schema.OperatorT()
    o.opcodeIndex = self._opcode(builtin)
    o.inputs, o.outputs = list(inputs), list(outputs)
    o.builtinOptionsType, o.builtinOptions = options_type, options
    self.ops.append(o)

  def custom_op(self, name, inputs, outputs, custom_options: bytes):
    o = schema.OperatorT()
    o.opcodeIndex = self._opcode(schema.BuiltinOperator.CUSTOM, name)
    o.inputs, o.outputs = list(inputs), list(outputs)
    o.customOptions = list(custom_options)
    o.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS
    self.ops.append(o)

  def build(self) -> bytes:
    sg = schema.SubGraphT()
    sg.tensors, sg.operators = self.tensors, self.ops
    sg.inputs, sg.outputs = self.inputs, self.outputs
    m = schema.ModelT()
    m.version = 3
    m.operatorCodes, m.subgraphs, m.buffers = self.opcodes, [sg], self.buffers
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


# ----------------------------------------------------------------------------
# Builtin-op helpers.

def fully_connected(g: GraphBuilder, x: int, w: int, out_shape, name, bias=-1,
                    activation=schema.ActivationFunctionType.NONE) -> int:
  opts = schema.FullyConnectedOptionsT()
  opts.keepNumDims = True
  opts.fusedActivationFunction = activation
  y = g.tensor(name, out_shape)
  g.op(schema.BuiltinOperator.FULLY_CONNECTED, [x, w, bias], [y],
       schema.BuiltinOptions.FullyConnectedOptions, opts)
  return y


def int4_channelwise(g: GraphBuilder, name, rng, rows, cols):
  """A random INT4 weight [rows, cols] with one scale per row (what ai-edge-quantizer writes
  for int4_channel: XNNPACK's qc4w FC). Returns (tensor, its fp32 values)."""
  from export.delegate import pack_int4
  q = rng.integers(-8, 8, size=(rows, cols), dtype=np.int8)
  s = (rng.random(rows) * 0.5 + 0.5).astype(np.float32) / np.sqrt(cols * 10)
  qp = schema.QuantizationParametersT()
  qp.scale, qp.zeroPoint, qp.quantizedDimension = s.tolist(), [0] * rows, 0
  t = g.tensor(name, [rows, cols], tensor_type=schema.TensorType.INT4, data=pack_int4(q),
               quantization=qp)
  return t, q.astype(np.float32) * s[:, None]


def int4_blockwise(g: GraphBuilder, name, rng, rows, cols, block=32, q=None, scales=None):
  """An INT4 weight [rows, cols] with fp16 scales [rows, cols / block] in their own constant
  tensor (LiteRT's block-wise INT4, what the exporter writes for int4_g32): random integers
  and fp16 scales (most not bf16 values) unless `q` / `scales` are given. Returns (tensor,
  the int8 values [rows, cols], the fp16 scales): W = q * s, each scale over `block` inputs."""
  from export.delegate import pack_int4
  if q is None:
    q = rng.integers(-8, 8, size=(rows, cols), dtype=np.int8)
  if scales is None:
    scales = (rng.random((rows, cols // block)) * 0.5 + 0.5) / np.sqrt(cols * 10)
  s = np.asarray(scales).astype(np.float16)
  details = schema.BlockwiseQuantizationT()
  details.scales = g.const(f"{name}_scales", s)
  details.zeroPoints, details.blockSize = -1, block
  qp = schema.QuantizationParametersT()
  qp.detailsType, qp.details = schema.QuantizationDetails.BlockwiseQuantization, details
  t = g.tensor(name, [rows, cols], tensor_type=schema.TensorType.INT4, data=pack_int4(q),
               quantization=qp)
  return t, q, s


def add(g: GraphBuilder, a: int, b: int, shape, name) -> int:
  y = g.tensor(name, shape)
  g.op(schema.BuiltinOperator.ADD, [a, b], [y], schema.BuiltinOptions.AddOptions,
       schema.AddOptionsT())
  return y


# ----------------------------------------------------------------------------
# MobileMoeBlock.

# The op's "16-row tiled" INT4 weight layout (option weight_tiles=16; README.md, "The op
# contract"): a matrix of M rows and K inputs (K/2 bytes a row) is stored as M/16 tiles, each
# one sequential stream of K/128 blocks of [16 rows][64 bytes]: row-layout byte (m, j) goes
# to (m // 16) * 16 * (K/2) + (j // 64) * 1024 + (m % 16) * 64 + j % 64. Leading axes (the
# experts) stay outermost; scales keep their row layout.
WEIGHT_TILES = 16     # the tiled layout's rows per tile (the option's only non-zero value)
TILE_BYTES = 64       # bytes of one row inside a tile block: 128 INT4 inputs
Q_SLOTS = ("gate_up_q", "down_q", "shared_gate_up_q", "shared_down_q")


def _tile_shape(shape, tile):
  """(M, K/2) of a [..., M, K/2] byte matrix that tiles by `tile` rows, else ValueError."""
  if len(shape) < 2 or shape[-2] % tile or shape[-1] % TILE_BYTES:
    raise ValueError(f"{tile}-row tiled INT4 layout needs bytes [..., M, K/2] with "
                     f"M % {tile} == 0 and K % {2 * TILE_BYTES} == 0; got shape "
                     f"{tuple(shape)}")
  return shape[-2], shape[-1]


def tile_rows(q, tile=WEIGHT_TILES):
  """Packed INT4 bytes [..., M, K/2] in row layout -> the same shape in the tiled layout."""
  q = np.asarray(q)
  m, kb = _tile_shape(q.shape, tile)
  t = q.reshape(*q.shape[:-2], m // tile, tile, kb // TILE_BYTES, TILE_BYTES)
  return np.ascontiguousarray(t.swapaxes(-3, -2)).reshape(q.shape)


def untile_rows(q, tile=WEIGHT_TILES):
  """Inverse of tile_rows: tiled bytes [..., M, K/2] -> row layout."""
  q = np.asarray(q)
  m, kb = _tile_shape(q.shape, tile)
  t = q.reshape(*q.shape[:-2], m // tile, kb // TILE_BYTES, tile, TILE_BYTES)
  return np.ascontiguousarray(t.swapaxes(-3, -2)).reshape(q.shape)


def tiled_slots(expert_group_axis="in"):
  """The `_q` slots weight_tiles applies to: all four, or with routed experts [E, in, out]
  ('out') only the shared expert's (the routed ones keep their rows)."""
  return Q_SLOTS if expert_group_axis == "in" else Q_SLOTS[2:]


def tiles_problem(weights: dict, tile=WEIGHT_TILES, slots=Q_SLOTS):
  """Why a block's packed weights (row layout, by slot name; absent shared slots skipped)
  cannot be tiled, or None when all of them can."""
  for k in slots:
    if weights.get(k) is not None:
      try:
        _tile_shape(np.shape(weights[k]), tile)
      except ValueError as e:
        return f"{k}: {e}"
  return None


def tile_weights(weights: dict, weight_tiles: int, slots=Q_SLOTS) -> dict:
  """The weights (row layout) as the op stores them for the option weight_tiles (0: as
  they are; 16: the `_q` slots in `slots` tiled, ValueError naming the slot if one cannot
  be)."""
  if weight_tiles not in (0, WEIGHT_TILES):
    raise ValueError(f"weight_tiles must be 0 (rows) or {WEIGHT_TILES} (tiled), "
                     f"got {weight_tiles!r}")
  if not weight_tiles:
    return dict(weights)
  why = tiles_problem(weights, weight_tiles, slots)
  if why:
    raise ValueError(f"weight_tiles={weight_tiles}: {why}")
  return {k: tile_rows(v, weight_tiles) if k in slots and v is not None else v
          for k, v in weights.items()}


def moe_options_bytes(options: dict) -> bytes:
  """The op's custom_options: a flexbuffer map (ints, floats, bools, strings)."""
  return bytes(flexbuffers.Dumps(dict(options)))


def add_moe_block(g: GraphBuilder, x: int, x_shape, weights: dict, options: dict,
                  name="moe", int4_type=False, drop_inputs=(), weight_tiles=0) -> int:
  """Appends a MobileMoeBlock node reading x; returns its output tensor.

  weights: packed INT4 `_q` slots in row layout. weight_tiles=16 stores them tiled and
  sets the option (tile_weights); 0 leaves both as they are (options may still carry a
  weight_tiles of their own, for negative tests).
  int4_type: store the packed weights as TensorType.INT4 with logical shapes
  instead of uint8 bytes (the delegate accepts both).
  drop_inputs: slot numbers to pass as -1 (absent), for negative tests.
  """
  if weight_tiles:
    weights = tile_weights(weights, weight_tiles,
                           tiled_slots(options.get("expert_group_axis", "in")))
    options = dict(options, weight_tiles=weight_tiles)
  def q4(key):
    packed = weights[key]
    if not int4_type:
      return g.const(f"{name}/{key}", packed)
    shape = list(packed.shape[:-1]) + [packed.shape[-1] * 2]
    return g.tensor(f"{name}/{key}", shape, tensor_type=schema.TensorType.INT4, data=packed)

  ins = [x, g.const(f"{name}/router_w", weights["router_w"])]
  ins.append(g.const(f"{name}/router_bias", weights["router_bias"])
             if weights.get("router_bias") is not None else -1)
  ins += [q4("gate_up_q"), g.const(f"{name}/gate_up_s", weights["gate_up_s"]),
          q4("down_q"), g.const(f"{name}/down_s", weights["down_s"])]
  if options.get("d_shared", 0):
    ins += [q4("shared_gate_up_q"), g.const(f"{name}/shared_gate_up_s", weights["shared_gate_up_s"]),
            q4("shared_down_q"), g.const(f"{name}/shared_down_s", weights["shared_down_s"])]
  ins = [-1 if i in drop_inputs else t for i, t in enumerate(ins)]
  y = g.tensor(f"{name}/y", x_shape)
  g.custom_op(OP_NAME, ins, [y], moe_options_bytes(options))
  return y


def moe_block_model(weights: dict, options: dict, x_shape, **kw) -> bytes:
  """A model whose only op is one MobileMoeBlock: x -> y (kw: add_moe_block's, e.g.
  weight_tiles=16)."""
  g = GraphBuilder()
  x = g.tensor("x", x_shape)
  y = add_moe_block(g, x, x_shape, weights, options, **kw)
  g.inputs, g.outputs = [x], [y]
  return g.build()


# ----------------------------------------------------------------------------
# MobileKvAttention.

ATTENTION_OP_NAME = contract.ATTENTION.name


def kv_attention_model(H, K, Dh, T, P, options: dict, pos_type=np.int32) -> bytes:
  """A model whose only op is one MobileKvAttention; inputs q, k_new, v_new, k_cache,
  v_cache, input_pos (in that order), output y [1, T, H*Dh]."""
  g = GraphBuilder()
  shapes = [("q", [1, T, H, Dh]), ("k_new", [1, T, K, Dh]), ("v_new", [1, T, K, Dh]),
            ("k_cache", [1, K, P, Dh]), ("v_cache", [1, K, Dh, P])]
  ins = [g.tensor(n, s) for n, s in shapes] + [g.tensor("input_pos", [T], pos_type)]
  y = g.tensor("y", [1, T, H * Dh])
  g.custom_op(ATTENTION_OP_NAME, ins, [y], moe_options_bytes(options))
  g.inputs, g.outputs = ins, [y]
  return g.build()
