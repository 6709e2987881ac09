"""Running routed experts: how tokens reach the expert weights.

All functions compute  y[n] = sum_j w[n, j] * Expert_{e[n, j]}(x[n])  with SwiGLU experts
  Expert_e(x) = (silu(x @ gate[e]) * (x @ up[e])) @ down[e].

- `dense`:  every expert on every token, masked by the routing weights. O(E) work, but
  obviously correct: the reference the others are tested against.
- `sorted`: sort the N*k assignments by expert, scatter them into a [E, C, D] buffer
  (C = capacity; assignments past it are dropped and counted), batched einsums, gather
  back. Batched matmuls are what accelerators run fast (see bench/moe_dispatch.py).
- `gather`: the same buffer and einsums as `sorted`, but every [.., D]-wide move is a gather,
  forward and backward (custom VJPs): slots come from a cumsum of one-hot positions (no
  sort) and only small int32 index arrays are scattered. XLA's scatters of rows (and the
  scatter-adds autodiff makes of gathers) are what made `sorted` slow on GPU.
- `ragged`: the sorted assignments through `jax.lax.ragged_dot`, never dropping.
- `grouped`: dropless with `gather`'s row moves and batched matmuls: each expert's
  assignments fill whole tiles of `GROUP_TILE` rows (the last one padded), and every tile is
  one matmul against its expert's weights (gathered per tile; `tile_matmul`, whose backward
  pass sums the per-tile weight gradients with a matmul rather than a scatter-add). The
  buffer holds N*k rows plus at most E-1 tiles of padding, where `gather` without a capacity
  needs E*N.
- `expert_parallel`: `gather` inside shard_map over the mesh; the [E, C, D] buffer is
  exchanged with all-to-all along the 'expert' axis so each device runs only its own
  experts: tokens move, weights stay. It moves in slices of C so that the all-to-alls can
  overlap the matmuls of other slices.
"""
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mobilemoe_jax.sharding import RULES


def swiglu(x, gate, up, down):
  """x: [..., D]; gate/up: [D, F]; down: [F, D]."""
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def _same(h):
  return h


def dense(x, weights, experts, gate, up, down, act=_same):
  """x: [N, D]; weights/experts: [N, k]; gate/up: [E, D, F]; down: [E, F, D] -> [N, D], 0 dropped.
  act: applied to the hidden rows before `down` (QAT's activation grid, model/layers.act)."""
  n_experts = gate.shape[0]
  combine = jnp.zeros((x.shape[0], n_experts), weights.dtype)
  combine = combine.at[jnp.arange(x.shape[0])[:, None], experts].add(weights)   # [N, E]
  h = jax.nn.silu(jnp.einsum('nd,edf->enf', x, gate)) * jnp.einsum('nd,edf->enf', x, up)
  out = jnp.einsum('enf,efd->end', act(h), down)                                  # [E, N, D]
  y = jnp.einsum('end,ne->nd', out, combine.astype(out.dtype))
  return y, jnp.zeros((), jnp.int32)


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
  """Buffer rows per expert. Factor 0 means dropless: a token hits an expert at most once,
  so N rows always suffice."""
  if capacity_factor <= 0:
    return n_tokens
  return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts)))


def to_buffer(x, experts, n_experts: int, cap: int):
  """Scatters token copies into an expert-major buffer.

  Returns buf [E, C, D] and the slot of every assignment: (expert [N*k], pos [N*k]),
  pos >= C meaning dropped. Sorting is stable, so earlier tokens win capacity.
  """
  n, k = experts.shape
  flat = experts.reshape(-1)                                     # [N*k]
  order = jnp.argsort(flat, stable=True)
  sorted_e = flat[order]
  starts = jnp.searchsorted(sorted_e, jnp.arange(n_experts), side='left')
  rank = jnp.arange(n * k) - starts[sorted_e]                    # position inside its expert
  pos = jnp.zeros_like(rank).at[order].set(rank)                 # back to assignment order
  tok = jnp.arange(n * k) // k
  buf = jnp.zeros((n_experts, cap, x.shape[-1]), x.dtype)
  buf = buf.at[flat, pos].set(x[tok], mode='drop')               # pos >= cap: dropped
  return buf, flat, pos


def from_buffer(out, weights, flat, pos):
  """Inverse of to_buffer: out [E, C, D] -> y [N, D] = sum_k w * out[e, pos]; dropped -> 0."""
  n, k = weights.shape
  cap = out.shape[1]
  keep = pos < cap
  got = out.at[flat, jnp.minimum(pos, cap - 1)].get() * keep[:, None].astype(out.dtype)
  y = (got.reshape(n, k, -1) * weights[..., None].astype(out.dtype)).sum(1)
  return y, jnp.sum(~keep).astype(jnp.int32)


def swiglu_hidden(x, gate, up, spec: str):
  """silu(x @ gate) * (x @ up) for the einsum `spec` ('...d,...df->...f' shaped, e.g.
  'ecd,edf->ecf'): the SwiGLU hidden rows, before `down`.

  Both products are one matmul against gate and up stacked on a new axis next to F
  ([..., D, 2, F]; stacked rather than concatenated on F, so an F split over a mesh axis
  stays where it is): the input is read once, and the backward pass's input gradient is one
  matmul over 2F instead of two whose results are added. The same products and fp32
  accumulation as two matmuls.
  """
  ins, out = spec.split('->')
  lhs, rhs = ins.split(',')
  both = jnp.einsum(f'{lhs},{rhs[:-1]}g{rhs[-1]}->{out[:-1]}g{out[-1]}', x, gate_up(gate, up))
  return _glu(both)


def gate_up(gate, up):
  """The [..., D, 2, F] pair of a SwiGLU's gate and up: stacked here, or `gate` itself where
  the caller passes the pair already stacked and `up` empty (the trainer stacks once per
  step: a stack inside the micro-batch loop is a copy of the weights per micro-batch)."""
  return gate if up.size == 0 else jnp.stack([gate, up], -2)


def pair_apart(gate, up):
  """(gate, up) [..., D, F] each, from the pair as `gate_up` takes it."""
  return (gate[..., 0, :], gate[..., 1, :]) if up.size == 0 else (gate, up)


@jax.checkpoint
def _glu(both):
  """silu(gate) * up from the pair [..., 2, F]. Rematerialised: the backward pass keeps only
  the pair (the matmul's output) and recomputes silu and the product, instead of keeping
  their [..., F] intermediates. Autodiff of the two slices: XLA writes the pair's gradient in
  one fusion (pad + add), which was faster than a hand-written VJP stacking the two halves."""
  return jax.nn.silu(both[..., 0, :]) * both[..., 1, :]


def batched_experts(buf, gate, up, down, act=_same):
  """buf [E, C, D] -> [E, C, D], batched matmuls (gate and up in one)."""
  h = swiglu_hidden(buf, gate, up, 'ecd,edf->ecf')
  return jnp.einsum('ecf,efd->ecd', act(h), down)


def sorted_capacity(x, weights, experts, gate, up, down, capacity_factor=0.0, act=_same):
  cap = capacity(x.shape[0], experts.shape[1], gate.shape[0], capacity_factor)
  buf, flat, pos = to_buffer(x, experts, gate.shape[0], cap)
  return from_buffer(batched_experts(buf, gate, up, down, act), weights, flat, pos)


def _rank_in_expert(flat, n_experts: int):
  """(rank [N*k]: how many earlier assignments went to the same expert, count [E] per expert)
  from a cumsum of one-hot rows (no sort)."""
  onehot = jax.nn.one_hot(flat, n_experts, dtype=jnp.int32)                  # [N*k, E]
  rank = jnp.take_along_axis(jnp.cumsum(onehot, 0), flat[:, None], 1)[:, 0] - 1
  return rank, onehot.sum(0)


def slots(experts, n_experts: int, cap: int):
  """Index math of `gather` (int32 only, no row data moves).

  Returns src [E*C]: the assignment (n*k + j) each buffer row holds, N*k when empty, and
  dst [N, k]: the buffer row e*C + pos of each assignment, E*C when dropped. Positions
  count earlier assignments to the same expert, so earlier tokens win capacity (as in
  `to_buffer`).
  """
  n, k = experts.shape
  flat = experts.reshape(-1)
  pos, _ = _rank_in_expert(flat, n_experts)
  dst = jnp.where(pos < cap, flat * cap + pos, n_experts * cap)
  src = jnp.full((n_experts * cap,), n * k, jnp.int32).at[dst].set(
      jnp.arange(n * k, dtype=jnp.int32), mode='drop')
  return src, dst.reshape(n, k)


def _rows(a, idx):
  """a[idx] along axis 0; out-of-range idx (the 'none' sentinels) -> zero rows."""
  return jnp.take(a, idx, axis=0, mode='fill', fill_value=0)


def _rows_clamped(a, idx):
  """a[idx] along axis 0 with out-of-range idx clamped to the last row: XLA's own gather,
  without the extra pass over the rows that zeroing them takes. For rows that are unused
  or multiplied by a zero weight afterwards."""
  return jnp.take(a, idx, axis=0, mode='clip')


@jax.custom_vjp
def _dispatch_rows(x, src, dst):
  """x [N, D] -> buf [E*C, D], buf[r] = x[src[r] // k]; its transpose is a gather too.
  Empty rows (src = N*k) hold some token's copy: no assignment reads their outputs, and
  their cotangent is zero (their routing weight is), so they need no zeroing."""
  return _rows_clamped(x, src // dst.shape[1])


def _dispatch_fwd(x, src, dst):
  return _dispatch_rows(x, src, dst), (src, dst, x.shape[0])


def _dispatch_bwd(res, g):
  src, dst, n = res
  dx = _rows(g, dst.reshape(-1)).reshape(n, dst.shape[1], -1).astype(jnp.float32).sum(1)
  return dx.astype(g.dtype), None, None


_dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _combine_rows(out, weights, src, dst):
  """out [E*C, D] -> y [N, D] = sum_j weights[n, j] * out[dst[n, j]] (dropped -> 0).
  A dropped assignment (dst = E*C) reads a clamped row and gets weight 0."""
  got = _rows_clamped(out, dst.reshape(-1)).reshape(*dst.shape, -1)         # [N, k, D]
  y = jnp.einsum('nkd,nk->nd', got, _kept(weights, dst, out.shape[0]).astype(out.dtype),
                 preferred_element_type=jnp.float32)
  return y.astype(out.dtype)


def _kept(weights, dst, rows: int):
  """weights [N, k] with those of dropped assignments (dst >= rows) set to 0."""
  return jnp.where(dst < rows, weights, jnp.zeros_like(weights))


def _combine_fwd(out, weights, src, dst):
  return _combine_rows(out, weights, src, dst), (out, weights, src, dst)


def _combine_bwd(res, g):
  out, weights, src, dst = res
  k = dst.shape[1]
  w_row = _rows(weights.reshape(-1).astype(g.dtype), src)                   # [E*C], 0 if empty
  d_out = (_rows_clamped(g, src // k) * w_row[:, None]).astype(out.dtype)
  got = _rows_clamped(out, dst.reshape(-1)).reshape(*dst.shape, -1)
  d_w = jnp.einsum('nkd,nd->nk', got, g, preferred_element_type=jnp.float32)
  return d_out, _kept(d_w, dst, out.shape[0]).astype(weights.dtype), None, None


_combine_rows.defvjp(_combine_fwd, _combine_bwd)


def gather_capacity(x, weights, experts, gate, up, down, capacity_factor=0.0, act=_same):
  """`sorted_capacity` with gathers only for row data (see the module docstring)."""
  n_experts = gate.shape[0]
  cap = capacity(x.shape[0], experts.shape[1], n_experts, capacity_factor)
  src, dst = slots(experts, n_experts, cap)
  buf = _dispatch_rows(x, src, dst).reshape(n_experts, cap, -1)
  out = batched_experts(buf, gate, up, down, act).reshape(n_experts * cap, -1)
  y = _combine_rows(out, weights, src, dst)
  return y, jnp.sum(dst == n_experts * cap).astype(jnp.int32)


def ragged(x, weights, experts, gate, up, down, act=_same):
  """Dropless grouped matmul with jax.lax.ragged_dot."""
  n, k = experts.shape
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  xs = x[order // k]                                             # [N*k, D] grouped by expert
  sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
  h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
  out = jax.lax.ragged_dot(act(h), down, sizes)
  unsorted = jnp.zeros_like(out).at[order].set(out)
  y = (unsorted.reshape(n, k, -1) * weights[..., None].astype(out.dtype)).sum(1)
  return y, jnp.zeros((), jnp.int32)


# Rows per tile in `grouped`: more rows mean fewer per-tile weight copies (read and written
# in the forward and backward passes) but up to E-1 tiles of padding computed; the choice
# rests on bench/moe_dispatch.py's 'released S' shape, which times 128 / 256 / 512.
GROUP_TILE = 512


def group_slots(experts, n_experts: int, tile: int):
  """Index math of `grouped` (int32 only). Each expert's assignments, in assignment order,
  take consecutive rows from the start of its first tile; its rows end on a tile boundary.

  Returns src [R] (the assignment n*k + j in each row, N*k for padding), dst [N, k] (the
  row of each assignment) and tile_expert [R / tile] (the expert whose weights each tile
  uses; tiles past the last expert's repeat it and hold only padding). R = tile *
  (ceil(N*k / tile) + E - 1) bounds the rows any routing needs.
  """
  n, k = experts.shape
  flat = experts.reshape(-1)
  rank, counts = _rank_in_expert(flat, n_experts)
  tiles = -(-counts // tile)                                                # [E] per expert
  first = jnp.cumsum(tiles) - tiles                                         # its first tile
  dst = first[flat] * tile + rank
  n_tiles = -(-n * k // tile) + n_experts - 1
  src = jnp.full((n_tiles * tile,), n * k, jnp.int32).at[dst].set(
      jnp.arange(n * k, dtype=jnp.int32), mode='drop')
  tile_expert = jnp.minimum(
      jnp.searchsorted(jnp.cumsum(tiles), jnp.arange(n_tiles), side='right'), n_experts - 1)
  return src, dst.reshape(n, k), tile_expert.astype(jnp.int32)


@jax.custom_vjp
def tile_matmul(x, w, tile_expert):
  """x [T, C, K], w [E, K, ...] -> [T, C, ...]: tile t times its expert's w[tile_expert[t]].

  One batched matmul over tiles against the weights gathered per tile. Autodiff would
  scatter-add the [T, K, ...] per-tile weight gradients into [E, K, ...] (atomic, slow on
  GPU). Here the backward pass sums them with a matmul
  against the one-hot [T, E] tile-to-expert matrix (fp32 accumulation), and gathers the
  weights again for the input gradient instead of keeping the [T, K, ...] copy for it.
  """
  return jnp.einsum('tck,tkm->tcm', x, _flat_tiles(w, tile_expert)).reshape(
      *x.shape[:2], *w.shape[2:])


def _flat_tiles(w, tile_expert):
  """w [E, K, ...] gathered per tile -> [T, K, M]."""
  return jnp.take(w.reshape(*w.shape[:2], -1), tile_expert, axis=0, mode='clip')   # in range


def _tile_matmul_fwd(x, w, tile_expert):
  return tile_matmul(x, w, tile_expert), (x, w, tile_expert)


def _tile_matmul_bwd(res, g):
  x, w, tile_expert = res
  g = g.reshape(*g.shape[:2], -1)                                           # [T, C, M]
  dx = jnp.einsum('tcm,tkm->tck', g, _flat_tiles(w, tile_expert))
  dw_tiles = jnp.einsum('tck,tcm->tkm', x, g)                               # per tile
  onehot = jax.nn.one_hot(tile_expert, w.shape[0], dtype=dw_tiles.dtype)    # [T, E]
  dw = jnp.einsum('te,tkm->ekm', onehot, dw_tiles, preferred_element_type=jnp.float32)
  return dx, dw.astype(w.dtype).reshape(w.shape), None


tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)


def grouped(x, weights, experts, gate, up, down, act=_same, tile=None):
  """Dropless routed experts over tiles of one expert each (see the module docstring).
  tile: rows per tile, GROUP_TILE unless given."""
  n_experts = gate.shape[0]
  tile = tile or GROUP_TILE
  src, dst, tile_expert = group_slots(experts, n_experts, tile)
  buf = _dispatch_rows(x, src, dst).reshape(tile_expert.shape[0], tile, -1)   # [T, tile, D]
  # gate and up stacked per expert (as in swiglu_hidden): one matmul, gathered once per tile
  h = _glu(tile_matmul(buf, gate_up(gate, up), tile_expert))                 # [T, tile, F]
  out = tile_matmul(act(h), down, tile_expert).reshape(src.shape[0], -1)
  return _combine_rows(out, weights, src, dst), jnp.zeros((), jnp.int32)


def chunk_bounds(cap: int, chunks: int):
  """[(lo, hi)]: `chunks` slices of the C capacity slots, as even as C allows (at most C)."""
  cuts = [round(i * cap / min(chunks, cap)) for i in range(min(chunks, cap) + 1)]
  return list(zip(cuts[:-1], cuts[1:]))


def expert_parallel(x, weights, experts, gate, up, down, capacity_factor=0.0, act=_same, chunks=1):
  """`gather` with the experts split over the ambient mesh's 'expert' axis.

  x: [N, D] split over the token axes; gate/up/down split over 'expert' on E and over
  'tensor' on F. Each device fills a [E, C, D] buffer from its own tokens, all-to-all
  sends buffer block j to the holder of experts block j, experts run, and a second
  all-to-all brings results home.

  chunks > 1 moves the buffer in that many slices of its C slots, each through its own
  all-to-all, expert matmuls and all-to-all back. The slices share no data, so XLA's
  scheduler can run slice k+1's all-to-all while slice k's matmuls run (and slice k's
  return while k+1's run). Rows of the buffer are independent, so outputs, gradients and
  drops are those of chunks=1; only the size of each collective and matmul changes.
  """
  mesh = jax.sharding.get_abstract_mesh()
  n_ep = mesh.shape['expert']
  n_experts = gate.shape[0]
  tok_axes = tuple(a for a in RULES['batch'] if mesh.shape[a] > 1)
  tensor = 'tensor' if mesh.shape['tensor'] > 1 and gate.shape[2] % mesh.shape['tensor'] == 0 else None
  n_tok_shards = math.prod(mesh.shape[a] for a in tok_axes)
  cap = capacity(x.shape[0] // n_tok_shards, experts.shape[1], n_experts, capacity_factor)
  tok = P(tok_axes or None)

  def experts_remote(buf, gate, up, down):
    """[n_ep, E/n_ep, c, D] rows for every expert block -> their outputs, same layout."""
    buf = jax.lax.all_to_all(buf, 'expert', 0, 0)                # [src, E/n, c, D]
    with jax.named_scope('expert_matmuls'):   # their name in profiles and in the HLO
      h = swiglu_hidden(buf, gate, up, 'secd,edf->secf')
      out = jnp.einsum('secf,efd->secd', act(h), down)
    if tensor:
      out = jax.lax.psum(out, tensor)                            # F was split over 'tensor'
    return jax.lax.all_to_all(out, 'expert', 0, 0)

  def local(x, weights, experts, gate, up, down):
    src, dst = slots(experts, n_experts, cap)
    buf = _dispatch_rows(x, src, dst)                            # [E*C, D], gathers only
    buf = buf.reshape(n_ep, n_experts // n_ep, cap, -1)
    out = jnp.concatenate([experts_remote(buf[:, :, lo:hi], gate, up, down)
                           for lo, hi in chunk_bounds(cap, chunks)], axis=2)
    y = _combine_rows(out.reshape(n_experts * cap, -1), weights, src, dst)
    dropped = jnp.sum(dst == n_experts * cap).astype(jnp.int32)
    return y, jax.lax.psum(dropped, tok_axes) if tok_axes else dropped

  w_in = P('expert', None, tensor)
  w_out = P('expert', tensor, None)
  return jax.shard_map(local, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                       out_specs=(tok, P()), check_vma=False)(x, weights, experts, gate, up, down)


def can_expert_parallel(n_tokens: int, n_experts: int) -> bool:
  """True when an ambient mesh has an 'expert' axis the tokens and experts both split over."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or 'expert' not in (mesh.axis_names or ()) or mesh.shape['expert'] == 1:
    return False
  n_tok = math.prod(mesh.shape[a] for a in RULES['batch'])
  return n_experts % mesh.shape['expert'] == 0 and n_tokens % n_tok == 0


def run_experts(x, weights, experts, gate, up, down, *, method: str, capacity_factor: float,
                act=_same, ep_chunks: int = 1):
  """Dispatches to one of the implementations above; returns (y [N, D], dropped).
  act(h) is applied to each expert's hidden rows before `down`; ep_chunks: `expert_parallel`.
  gate and up [E, D, F], or stacked in gate [E, D, 2, F] with up empty (`gate_up`)."""
  if can_expert_parallel(x.shape[0], gate.shape[0]):
    return expert_parallel(x, weights, experts, *pair_apart(gate, up), down, capacity_factor,
                           act, ep_chunks)
  if method == 'auto':
    # bench/moe_dispatch.py: `gather` was the fastest of ours at every
    # shape on an H200, with or without a capacity, and on CPU at the tiny preset's shape.
    # TPU is unmeasured: it keeps `sorted`. Without a capacity both size every expert's
    # buffer for all N tokens; on a GPU (training-sized N) `grouped` needs about N*k rows
    # instead. The CPU keeps `gather`: at the few tokens of tests and eval, grouped's
    # GROUP_TILE-row tiles would be mostly padding.
    backend = jax.default_backend()
    method = 'gather' if backend in ('gpu', 'cpu') else 'sorted'
    if capacity_factor <= 0 and backend == 'gpu':
      method = 'grouped'
  if method not in ('gather', 'grouped'):   # those two multiply by the pair (gate_up)
    gate, up = pair_apart(gate, up)
  if method == 'dense':
    return dense(x, weights, experts, gate, up, down, act)
  if method == 'sorted':
    return sorted_capacity(x, weights, experts, gate, up, down, capacity_factor, act)
  if method == 'gather':
    return gather_capacity(x, weights, experts, gate, up, down, capacity_factor, act)
  if method == 'ragged':
    return ragged(x, weights, experts, gate, up, down, act)
  if method == 'grouped':
    return grouped(x, weights, experts, gate, up, down, act)
  raise ValueError(f'unknown MoE dispatch {method!r}')
