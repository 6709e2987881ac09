"""The 'delegate' MoE lowering: one `MobileMoeBlock` custom op per MoE layer.

Inputs and flexbuffer options follow export/delegate's contract (export/delegate/contract.py):
  x [N, D] f32, router_w [E, D] f32, router_bias [E] f32 (zeros without an expert bias),
  gate_up_q [E, 2F, D/2] int8 bytes (rows: F gate then F up; int4 two per byte, low nibble
  first) + gate_up_s [E, 2F, D/G] f32, down_q [E, D, F/2] + down_s [E, D, F/G] (group_size
  0: channel-wise, the scales [..., 1]),
  and for the fused shared expert (hidden Fs = n_shared * d_shared) the same two pairs
  without the E axis. Options: num_experts, top_k, d_model, d_expert, d_shared,
  group_size, score_func, norm_topk_prob, routed_scale, act='silu', weight_tiles.

weight_tiles (int, always written; absent reads as 0): the byte layout of the four INT4 `_q`
inputs. 0: row layout as above. 16: "16-row tiled", what the delegate's one-token GEMV
streams fastest: each matrix [M rows, K inputs] (K = D for gate/up, F or Fs for down; every
expert's on its own, E outermost) is M/16 tiles, each one sequential run of K/128 blocks of
[16 rows][64 bytes]: row-layout byte (m, j), j < K/2, lies at
(m // 16) * 16 * (K/2) + (j // 64) * 1024 + (m % 16) * 64 + j % 64
(tile_rows / untile_rows). It needs M % 16 == 0 and K % 128 == 0 for all four matrices.
Scales keep their row layout. MoeBlockOp / moe_tensors tile by default ('auto') whenever the
block's shapes allow it, else write rows; 0 / 16 force one (16 on shapes that cannot tile:
ValueError).

expert_group_axis ('in' | 'out'): the routed experts' layout. A released MobileMoE QAT
checkpoint's experts (model.quant.expert_group_axis='out', the MoE's `expert_grid`, see
torch_model.from_flax) are written unchanged as 'out' when their groups are group_size:
gate_up_q [E, D, 2F/2] (columns F gate then F up), gate_up_s [E, D, 2F/G], down_q
[E, F, D/2], down_s [E, F, D/G]; weight_tiles then tiles only the shared expert's matrices.

The integers and scales come from quant.grid (block-wise, G=group_size), i.e. the grid the
rest of the exported model uses; a QAT checkpoint's own integers and scales (learned ones
included) are packed unchanged when it was trained on that grid. litert-torch emits the op through a torch custom op with a
lowering to `tfl.custom` (the way litert-torch's own `moe` op is emitted); in PyTorch the op
runs a dequantized reference so the module stays testable.
"""
import json

import numpy as np
import torch
import torch.nn.functional as F
from flatbuffers import flexbuffers

from export.delegate import contract
# The tiled layout's one definition (numpy only; tile_rows is re-exported from here).
from export.delegate.tflite_builder import (  # noqa: F401
    Q_SLOTS, WEIGHT_TILES, tile_rows, tile_weights, tiled_slots, tiles_problem, untile_rows)
from mobilemoe_jax.quant import grid

OP_NAME = contract.MOE.name
WEIGHT_SLOTS = contract.MOE.input_names[1:]   # the op's inputs after x, in slot order


def pack(w, group_size):
  """w [..., out, in] f32 -> (packed uint8 [..., out, in/2], scales f32 [..., out, in/G]).
  group_size 0: channel-wise (grid.Scheme(4, 0), 'int4_channel'), scales [..., out, 1]."""
  q, s = grid.quantize(np.asarray(w, np.float32), grid.Scheme(4, group_size))
  return grid.pack_int4(q), s.astype(np.float32)


def pack_modules(mods, group_size: int, combine):
  """Packs Linear modules' weights joined by `combine` (a list of [out, in] arrays -> the
  op's layout; applied to integers and scales alike). A QAT checkpoint's modules carry their
  exact integers and scales (`module.grid`, torch_model.from_flax): those are packed as they
  are when they are block-`group_size` INT4, otherwise the weights get the max-abs grid."""
  exact = [getattr(m, 'grid', None) for m in mods]
  if all(g is not None and grid.get_scheme(g.scheme) == grid.Scheme(4, group_size) for g in exact):
    return (grid.pack_int4(combine([g.q for g in exact])),
            combine([g.scales for g in exact]).astype(np.float32))
  return pack(combine([m.weight.detach().float().numpy() for m in mods]), group_size)


def unpack(packed, scales):
  """Inverse of pack: the dequantized f32 weight."""
  return grid.dequantize(grid.unpack_int4(packed), scales)


def options_bytes(options: dict) -> bytes:
  return bytes(flexbuffers.Dumps(options))


def resolve_weight_tiles(weights: dict, weight_tiles='auto', slots=Q_SLOTS) -> int:
  """The weight_tiles option for a block's packed weights (row layout): 'auto' (or None) is
  16 when there are `_q` matrices in `slots` and all can tile, else 0; 0 and 16 are kept as
  they are (tile_weights then refuses 16 on shapes that cannot tile, and other values)."""
  if weight_tiles is None or weight_tiles == 'auto':
    any_q = any(weights.get(k) is not None for k in slots)
    return WEIGHT_TILES if any_q and not tiles_problem(weights, slots=slots) else 0
  return weight_tiles


def exact_experts(moe, group_size: int):
  """The MoE's out-axis expert integers (torch_model.ExpertGrid) when the op can hold them
  as they are (block-`group_size` INT4), else None (the experts get re-gridded)."""
  eg = getattr(moe, 'expert_grid', None)
  if eg is not None and group_size and grid.get_scheme(eg.scheme) == grid.Scheme(4, group_size):
    return eg
  return None


def moe_tensors(moe, group_size: int, weight_tiles='auto'):
  """(numpy weights by slot name, options) of an export.torch_model.MoE module, the `_q`
  slots in the layout of options['weight_tiles'] (resolve_weight_tiles)."""
  m, e, f = moe.m, moe.e, moe.f
  d = moe.router.weight.shape[1]
  fs = m['n_shared'] * m['d_shared'] if moe.shared is not None else 0
  for name, dim in (('d_model', d), ('d_expert', f), ('d_shared', fs)):
    if group_size and dim % group_size:   # 0: channel-wise, any input length
      raise ValueError(f'delegate MoE lowering: group_size {group_size} does not divide '
                       f'{name}={dim}')
  np_ = lambda t: t.detach().float().numpy()
  w = {'router_w': np_(moe.router.weight),
       'router_bias': np_(moe.expert_bias) if moe.expert_bias is not None else np.zeros(e, np.float32)}
  exact = exact_experts(moe, group_size)
  if exact is not None:   # the release's [E, in, out] integers and scales, unchanged
    w['gate_up_q'], w['gate_up_s'] = grid.pack_int4(exact.gate_up_q), exact.gate_up_s
    w['down_q'], w['down_s'] = grid.pack_int4(exact.down_q), exact.down_s
  else:
    w['gate_up_q'], w['gate_up_s'] = pack_modules(
        [moe.gate_up], group_size, lambda a: a[0].reshape(e, 2 * f, -1))
    w['down_q'], w['down_s'] = pack_modules(list(moe.down), group_size, np.stack)
  if fs:
    sh = moe.shared
    w['shared_gate_up_q'], w['shared_gate_up_s'] = pack_modules([sh.gate, sh.up], group_size,
                                                                np.concatenate)
    w['shared_down_q'], w['shared_down_s'] = pack_modules([sh.down], group_size, lambda a: a[0])
  axis = 'in' if exact is None else 'out'
  slots = tiled_slots(axis)
  tiles = resolve_weight_tiles(w, weight_tiles, slots)
  options = {'num_experts': e, 'top_k': m['top_k'], 'd_model': d, 'd_expert': f,
             'd_shared': fs, 'group_size': group_size, 'score_func': m['score_func'],
             'norm_topk_prob': bool(m['norm_topk_prob']),
             'routed_scale': float(m['routed_scale']), 'act': 'silu', 'weight_tiles': tiles,
             'expert_group_axis': axis}
  return tile_weights(w, tiles, slots), options


class MoeBlockOp(torch.nn.Module):
  """Holds one layer's packed weights as buffers (they become the op's constant inputs)."""

  def __init__(self, moe, group_size: int = 32, weight_tiles='auto'):
    """group_size: 32 (the op's block-32 format) or another block size; 0 packs the experts
    channel-wise (one fp32 scale per output row, like the dense FCs' int4_channel).
    weight_tiles: 'auto' (16-row tiled when the shapes allow it, else rows), 0 or 16."""
    super().__init__()
    weights, self.options = moe_tensors(moe, group_size, weight_tiles)
    self.slots = [k for k in WEIGHT_SLOTS if k in weights]
    for k in self.slots:
      # Packed bytes travel as int8: MLIR constants must be signless (the delegate reads
      # int8 and uint8 bytes alike).
      a = weights[k].view(np.int8) if weights[k].dtype == np.uint8 else weights[k]
      self.register_buffer(k, torch.from_numpy(np.ascontiguousarray(a)))

  def forward(self, x):
    return moe_block(x, [getattr(self, k) for k in self.slots], json.dumps(self.options))


@torch.library.custom_op('mobilemoe::moe_block', mutates_args=())
def moe_block(x: torch.Tensor, weights: list[torch.Tensor], options: str) -> torch.Tensor:
  """Reference math (fp32, dequantized weights): what the delegate computes."""
  from export.torch_model import route
  o = json.loads(options)
  w = dict(zip(WEIGHT_SLOTS, weights))
  tiles = o.get('weight_tiles', 0)
  rows = lambda q: untile_rows(q, tiles) if tiles else q
  deq = lambda q, s: torch.from_numpy(unpack(rows(q.numpy().view(np.uint8)), s.numpy()))
  if o.get('expert_group_axis', 'in') == 'out':   # routed [E, in, out], never tiled
    deq_routed = lambda q, s: torch.from_numpy(unpack(q.numpy().view(np.uint8), s.numpy())).transpose(-1, -2)
  else:
    deq_routed = deq

  def ffn(xin, gu, dn):
    g, u = (xin @ gu.T).chunk(2, -1)
    return (F.silu(g) * u) @ dn.T

  m = {'top_k': o['top_k'], 'score_func': o['score_func'], 'norm_topk_prob': o['norm_topk_prob'],
       'routed_scale': o['routed_scale']}
  bias = w['router_bias'] if torch.any(w['router_bias'] != 0) else None
  comb = route(x @ w['router_w'].T, bias, m)                          # [N, E]
  gu, dn = deq_routed(w['gate_up_q'], w['gate_up_s']), deq_routed(w['down_q'], w['down_s'])
  y = sum(ffn(x, gu[e], dn[e]) * comb[:, e:e + 1] for e in range(o['num_experts']))
  if o['d_shared']:
    y = y + ffn(x, deq(w['shared_gate_up_q'], w['shared_gate_up_s']),
                deq(w['shared_down_q'], w['shared_down_s']))
  return y


@moe_block.register_fake
def _(x, weights, options):
  return torch.empty_like(x)


def lower_to_custom(torch_op, custom_code: str):
  """Registers a litert-torch lowering of torch_op to `tfl.custom` with that custom code.
  The op's last argument is its options as JSON (stored as the flexbuffer map); its tensor
  arguments (a list counts as its tensors in order) become the node's inputs, in order."""
  from litert_converter.mlir import ir
  from export import keep_jax_x64
  with keep_jax_x64():   # importing the lowerings turns on jax_enable_x64 process-wide
    from litert_torch.backend import lowerings
    from litert_torch.backend.lowerings import utils as lowering_utils

  @lowerings.lower(torch_op)
  def _lower(lctx, *args):
    *tensors, options = args
    data = options_bytes(json.loads(options))
    op = ir.Operation.create(
        'tfl.custom',
        results=lowering_utils.node_meta_to_ir_types(lctx.node),
        operands=[t for a in tensors for t in (a if isinstance(a, (list, tuple)) else [a])],
        attributes={
            'custom_code': ir.StringAttr.get(custom_code),
            'custom_option': ir.Attribute.parse(f'#tfl<const_bytes: "0x{data.hex()}">'),
        })
    return op.results[0]


lower_to_custom(torch.ops.mobilemoe.moe_block, OP_NAME)


# ---- reading the op back from a flatbuffer ----------------------------------------------

def read_ops(path_or_bytes):
  """[(options dict, {slot: numpy array})] for every MobileMoeBlock node (first subgraph
  that has them; signatures share the constants). The `_q` arrays come back as uint8 in row
  layout whatever the file stores (tiled ones are untiled); the options are the file's, so
  options.get('weight_tiles', 0) says how the file holds them."""
  from export import flatbuf
  model, raw = flatbuf.load(path_or_bytes)
  codes = [i for i, oc in enumerate(model.operatorCodes)
           if oc.customCode in (OP_NAME, OP_NAME.encode())]
  where = path_or_bytes if isinstance(path_or_bytes, str) else 'model bytes'
  found = []
  for sg in model.subgraphs:
    for n, op in enumerate(sg.operators):
      if op.opcodeIndex in codes:
        try:  # the file's bytes: anything can fail
          opts = flexbuffers.Loads(bytes(bytearray(op.customOptions)))
        except Exception as e:  # noqa: BLE001
          opts = e
        if not isinstance(opts, dict):
          raise ValueError(f'{where}: {OP_NAME} operator {n}: custom_options are not a '
                           f'flexbuffer map ({opts!r:.200})')
        ws = {}
        for slot, t in zip(WEIGHT_SLOTS, list(op.inputs)[1:]):
          if t >= 0:
            v = flatbuf.tensor_value(model, raw, sg.tensors[t])
            ws[slot] = v.view(np.uint8) if slot.endswith('_q') else v
        tiles = opts.get('weight_tiles', 0)
        tiled = tiled_slots(opts.get('expert_group_axis', 'in'))
        found.append((opts, {k: untile_rows(v, tiles) if tiles and k in tiled else v
                             for k, v in ws.items()}))
    if found:
      return found
  return found
