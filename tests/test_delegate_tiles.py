"""The delegate on MobileMoeBlock nodes with weight_tiles=16 (the 16-row tiled INT4 layout,
export/moe_op.py's docstring and export/delegate/README.md, "The op contract").

The C++ side of weight_tiles: ops/options.cc reads the option, kernels/moe.cc and
kernels/kernels*.cc read the tiles; a delegate that ignored it would compute with scrambled
rows and claim the refusal cases, so these would fail. The weight_tiles=0 cases pass either way.

Every case compares a tiled model with the same weights in row layout (weight_tiles=0,
what tests/test_delegate.py checks against the numpy reference) and the reference."""

import zlib

import numpy as np
import pytest

from export import delegate as dl
from export.delegate import tflite_builder as tb
from tests.support.delegate import assert_close, graph_with_builtins, opts, run, tokens, weights

# The refusal message must contain this (plus the reason): see test_untileable_*.
REFUSAL = "weight_tiles"


def _run_both(w, o, x, delegate_kw, x_shape=None, **kw):
  """(tiled output, row-layout output), each from a fresh delegate that claimed its node."""
  x_shape = list(x_shape or x.shape)
  outs = []
  for tiles in (16, 0):
    d = dl.load(**delegate_kw)
    (y,), _ = run(tb.moe_block_model(w, o, x_shape, weight_tiles=tiles, **kw), x, d)
    s = dl.stats(d)
    assert (s["claimed"], s["refused"]) == (1, 0), s
    outs.append(y)
  return outs


@pytest.mark.parametrize("case", [
    # (E, k, D, F, Fs, G, T, extra options): every matrix has rows % 16 == 0, K % 128 == 0
    (8, 2, 256, 128, 0, 32, 1, {}),
    (8, 2, 256, 128, 128, 32, 5, {}),
    (16, 4, 384, 256, 128, 64, 33, dict(score_func="sigmoid")),
    (8, 1, 256, 128, 0, 128, 7, dict(norm_topk_prob=False, routed_scale=2.5)),
    (8, 2, 256, 128, 128, 0, 1, {}),                         # channel-wise
    (6, 2, 768, 512, 512, 0, 1, {}),
    (16, 4, 384, 256, 128, 0, 33, dict(score_func="sigmoid")),
])
@pytest.mark.parametrize("kernel", ["auto", "avx2", "scalar"])
@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_tiled_matches_rows(case, kernel, activations):
  E, k, D, F, Fs, G, T, extra = case
  rng = np.random.default_rng(zlib.crc32(repr((case, kernel, "tiles")).encode()))
  o = opts(E, k, D, F, Fs, G, **extra)
  w = weights(rng, o)
  assert tb.tiles_problem(w) is None
  x = tokens(rng, w, o, T)
  y16, y0 = _run_both(w, o, x, dict(activations=activations, kernel=kernel))
  assert_close(y16, y0, 1e-5)
  if activations == "fp32":
    assert_close(y16, dl.reference_moe(x, w, o), 1e-5)


def test_tiled_int4_type_rank3_tokens_and_threads():
  rng = np.random.default_rng(21)
  o = opts(E=16, k=4, Fs=128)
  w = weights(rng, o)
  x = tokens(rng, w, o, 6).reshape(2, 3, 256)
  ref = dl.reference_moe(x, w, o)
  for n in (1, 3):
    y16, y0 = _run_both(w, o, x, dict(activations="fp32", num_threads=n), int4_type=True)
    assert y16.shape == (2, 3, 256)
    assert_close(y16, y0, 1e-5)
    assert_close(y16, ref, 1e-5)


def test_tiled_resize_token_count():
  # decode-shaped tiled model resized to a prefill chunk: the delegate re-prepares
  rng = np.random.default_rng(22)
  o = opts(Fs=128)
  w = weights(rng, o)
  x = tokens(rng, w, o, 19)
  model = tb.moe_block_model(w, o, [1, 256], weight_tiles=16)
  (y,), _ = run(model, x, dl.load(activations="fp32"), resize=[19, 256])
  assert_close(y, dl.reference_moe(x, w, o), 1e-5)


@pytest.mark.parametrize("chain, tiles", [(False, (16, 0)), (True, (16, 16)), (False, (0, 16))])
def test_every_node_claimed_in_a_graph_with_builtins(chain, tiles):
  # x -> FC -> MoE -> (+h) -> MoE -> + -> y with tiled and row-layout MoE nodes mixed
  rng = np.random.default_rng(23)
  o = opts(Fs=128)
  model, reference = graph_with_builtins(rng, o, chain, weight_tiles=tiles)
  x = rng.standard_normal((4, 256)).astype(np.float32)
  d = dl.load(activations="fp32")
  (y,), _ = run(model, x, d)
  s = dl.stats(d)
  assert (s["claimed"], s["refused"], s["invokes"]) == (2, 0, 1 if chain else 2), s
  assert_close(y, reference(x), 1e-4)


def test_explicit_weight_tiles_0_is_the_row_layout():
  # options saying weight_tiles=0 (what the exporter writes for shapes that cannot tile)
  rng = np.random.default_rng(24)
  o = opts(F=64, Fs=64, weight_tiles=0)
  w = weights(rng, o)
  x = tokens(rng, w, o, 3)
  d = dl.load(activations="fp32")
  (y,), _ = run(tb.moe_block_model(w, o, [3, 256]), x, d)
  assert dl.stats(d)["claimed"] == 1
  assert_close(y, dl.reference_moe(x, w, o), 1e-5)


@pytest.mark.parametrize("change, note", [
    (dict(F=64), "down_q: K = d_expert = 64 is not a multiple of 128"),
    (dict(Fs=64), "shared_down_q: K = d_shared = 64"),
    (dict(F=68, G=4), "gate_up_q: 2F = 136 rows, not a multiple of 16 (down_q: K = 68)"),
    (dict(D=192, G=64), "gate_up_q: K = d_model = 192"),
    (dict(weight_tiles=8), "weight_tiles must be 0 or 16"),
    (dict(weight_tiles=1), "weight_tiles must be 0 or 16"),
])
def test_untileable_shapes_or_bad_value_are_refused_with_reason(change, note):
  # The options claim a tiled layout the shapes cannot have: the node is refused with a
  # message naming weight_tiles (the weights are written in rows; they are never read).
  change = dict(change)
  tiles = change.pop("weight_tiles", 16)
  base = dict(E=8, k=2, D=256, F=128, Fs=128, G=32)
  base.update(change)
  o = opts(**base)
  w = weights(np.random.default_rng(25), o)
  if tiles == 16:
    assert tb.tiles_problem(w) is not None, note
  model = tb.moe_block_model(w, dict(o, weight_tiles=tiles), [2, o["d_model"]])
  d = dl.load()
  with pytest.raises(RuntimeError) as e:
    run(model, np.zeros((2, o["d_model"]), np.float32), d)
  assert "MobileMoE delegate: not claiming" in str(e.value)
  assert REFUSAL in str(e.value), str(e.value)
  s = dl.stats(d)
  assert (s["claimed"], s["refused"]) == (0, 1)
  assert REFUSAL in s["messages"]
