"""The delegate's `profile` option (export.delegate.profile): wall time per claimed op and
between its partitions, labelled by op and output shape."""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from export import delegate as dl
from export.delegate import tflite_builder as tb


def two_partitions(rng):
  """x [1, 256] -> FC -> ADD (builtin: ends the first partition) -> FC -> y [1, 96]."""
  g = tb.GraphBuilder()
  x = g.tensor("x", [1, 256])
  w0, _ = tb.int4_channelwise(g, "w0", rng, 128, 256)
  w1, _ = tb.int4_channelwise(g, "w1", rng, 96, 128)
  h = tb.fully_connected(g, x, w0, [1, 128], "h")
  h2 = tb.add(g, h, h, [1, 128], "h2")
  y = tb.fully_connected(g, h2, w1, [1, 96], "y")
  g.inputs, g.outputs = [x], [y]
  return g.build()


def invoke(model, delegate, times):
  it = Interpreter(model_content=model, num_threads=1, experimental_delegates=[delegate])
  it.allocate_tensors()
  x = np.ones((1, 256), np.float32)
  for _ in range(times):
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()


def test_profile_counts_every_op_and_gap():
  model = two_partitions(np.random.default_rng(0))
  d = dl.load(num_threads=1, fully_connected=True, profile=True)
  invoke(model, d, 3)
  p = dl.profile(d)
  assert p["FULLY_CONNECTED [1,128]"][0] == 3 and p["FULLY_CONNECTED [1,96]"][0] == 3, p
  # inside each invoke: the ADD between the two partitions
  assert p["outside, FULLY_CONNECTED [1,128] -> FULLY_CONNECTED [1,96]"][0] == 3, p
  # between invokes: the app's time, as a gap from the last op to the first (or idle)
  between = [c for k, (c, _) in p.items() if k == "idle (gap > 1 ms)"
             or k == "outside, FULLY_CONNECTED [1,96] -> FULLY_CONNECTED [1,128]"]
  assert sum(between) == 2, p
  assert all(us >= 0 for _, us in p.values()) and p["FULLY_CONNECTED [1,128]"][1] > 0


def test_no_profile_without_the_option():
  d = dl.load(num_threads=1, fully_connected=True)
  invoke(two_partitions(np.random.default_rng(0)), d, 2)
  assert dl.profile(d) == {}


def test_profile_option_value_checked():
  from ai_edge_litert.interpreter import load_delegate
  with pytest.raises(ValueError, match="profile must be 0 or 1"):
    load_delegate(dl.library_path(), {"profile": "yes"})
