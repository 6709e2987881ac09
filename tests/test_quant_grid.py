"""The quantization grid is bit-identical to what ai-edge-quantizer / litert-torch write.

Each test quantizes one known weight with the real tool, reads the int values and scales
back from the flatbuffer (schema, not the interpreter) and compares with `grid.quantize`.
"""
import numpy as np
import pytest

from mobilemoe_jax.quant import grid
from export import import_litert_torch, keep_jax_x64

torch = pytest.importorskip('torch')


def _weight(seed=0, out=16, k=96):
  """A weight with awkward groups: zeros, a tiny group, a huge one, exact .5 ties."""
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal((out, k)) * rng.uniform(0.01, 2.0, (out, 1))).astype(np.float32)
  w[0, :32] = 0.0
  w[1, 32:64] *= 1e-6
  w[2, 64:] *= 1e3
  w[3, :32] = np.arange(32, dtype=np.float32) - 16.5   # values landing on .5 after scaling
  w[3, 0] = 7.0 * 3.0 / 2.0
  return w


def _fp32_linear_tflite(w, path):
  litert_torch = import_litert_torch()
  lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
  with torch.no_grad():
    lin.weight.copy_(torch.from_numpy(w))
  with keep_jax_x64(inside=True):
    litert_torch.convert(lin.eval(), (torch.zeros(2, w.shape[1]),)).export(str(path))
  return path


def _read_fc_weight(path):
  from export import flatbuf
  model, raw = flatbuf.load(str(path))
  sg = model.subgraphs[0]
  fcs = [op for op in sg.operators
         if model.operatorCodes[op.opcodeIndex].builtinCode == 9]  # FULLY_CONNECTED
  assert len(fcs) == 1
  t = sg.tensors[fcs[0].inputs[1]]
  scales, qdim, block = flatbuf.weight_quant(model, raw, sg, t)
  return t.type, flatbuf.tensor_value(model, raw, t), scales, qdim, block


def _check(path, w, scheme, want_type):
  from export import flatbuf
  ttype, q, s, qdim, block = _read_fc_weight(path)
  assert flatbuf.TYPE_NAMES[ttype] == want_type
  assert qdim == 0
  assert block == grid.get_scheme(scheme).group
  q_ref, s_ref = grid.quantize(w, scheme)
  s = s.reshape(s_ref.shape)
  np.testing.assert_array_equal(s, s_ref)
  # Where a block scale underflowed fp16 to 0 the tool's integers are undefined (0/0).
  defined = np.repeat(s_ref, w.shape[1] // s_ref.shape[1], 1) > 0
  np.testing.assert_array_equal(q[defined], q_ref[defined])
  # The jnp version agrees bit for bit with numpy, eagerly and under jit/vmap (XLA would
  # otherwise turn the divisions into reciprocal multiplies, 1 ulp off).
  import jax
  import jax.numpy as jnp
  for f in (lambda a: grid.quantize(a, scheme), jax.jit(lambda a: grid.quantize(a, scheme))):
    q_j, s_j = f(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(q_j), q_ref)
    np.testing.assert_array_equal(np.asarray(s_j), s_ref)
  q_v, s_v = jax.jit(jax.vmap(lambda a: grid.quantize(a, scheme)))(jnp.asarray(w)[None].repeat(2, 0))
  np.testing.assert_array_equal(np.asarray(q_v[1]), q_ref)
  np.testing.assert_array_equal(np.asarray(s_v[1]), s_ref)


# _weight's all-zero group: the tools divide it by its zero scale (0 / 0), numpy warns, and
# _check compares only the scale there (the integers are undefined).
ZERO_GROUP_WARNINGS = pytest.mark.filterwarnings(
    'ignore:invalid value encountered in (divide|cast):RuntimeWarning')


@ZERO_GROUP_WARNINGS
def test_litert_torch_int4_block32_recipe(tmp_path):
  litert_torch = import_litert_torch()
  from litert_torch.generative.quantize import quant_attrs, quant_recipes
  w = _weight()
  lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
  with torch.no_grad():
    lin.weight.copy_(torch.from_numpy(w))
  qc = quant_recipes.full_dynamic_recipe(weight_dtype=quant_attrs.Dtype.INT4,
                                         granularity=quant_attrs.Granularity.BLOCKWISE_32)
  path = tmp_path / 'b32.tflite'
  with keep_jax_x64(inside=True):
    litert_torch.convert(lin.eval(), (torch.zeros(2, w.shape[1]),), quant_config=qc).export(str(path))
  _check(path, w, 'int4_g32', 'INT4')


@ZERO_GROUP_WARNINGS
@pytest.mark.parametrize('scheme,recipe_name,want_type', [
    ('int4_g32', 'dynamic_wi4b32_afp32', 'INT4'),
    ('int4_channel', 'dynamic_wi4c_afp32', 'INT4'),
    ('int8_channel', 'dynamic_wi8c_afp32', 'INT8'),
])
def test_ai_edge_quantizer_recipes(tmp_path, scheme, recipe_name, want_type):
  from ai_edge_quantizer import quantizer, recipe
  w = _weight(seed=1)
  fp32 = _fp32_linear_tflite(w, tmp_path / 'fp32.tflite')
  qt = quantizer.Quantizer(str(fp32), getattr(recipe, recipe_name)())
  out = tmp_path / f'{scheme}.tflite'
  qt.quantize().export_model(str(out))
  _check(out, w, scheme, want_type)


def test_roundtrip_and_ranges():
  w = _weight(seed=2)
  for scheme in ('int4_g32', 'int4_channel', 'int8_channel'):
    q, s = grid.quantize(w, scheme)
    sch = grid.get_scheme(scheme)
    assert q.dtype == np.int8 and q.min() >= sch.qmin and q.max() <= sch.qmax
    assert np.all(np.isfinite(s)) and np.all(s >= 0)
    # Only the all-zero group of a block-wise scheme has a zero (fp16-underflowed) scale.
    assert (s == 0).sum() == (1 if sch.group else 0)
    # Dequantized weights lie on the grid: quantizing them again gives the same integers.
    q2, s2 = grid.quantize(grid.dequantize(q, s), scheme)
    np.testing.assert_array_equal(q2, q)
    err = np.abs(grid.dequantize(q, s) - w)
    assert np.all(err <= np.repeat(s, w.shape[1] // s.shape[1], 1) * 0.5 + 1e-6)


def test_in_axis_matches_transpose():
  w = _weight(seed=3)
  q, s = grid.quantize(w, 'int4_g32')
  qt, st = grid.quantize(w.T.copy(), 'int4_g32', in_axis=0)   # Flax layout [in, out]
  np.testing.assert_array_equal(qt, q.T)
  np.testing.assert_array_equal(st, s.T)


def test_pack_roundtrip():
  q = np.random.default_rng(0).integers(-8, 8, (3, 10)).astype(np.int8)
  np.testing.assert_array_equal(grid.unpack_int4(grid.pack_int4(q)), q)
  assert grid.pack_int4(np.array([1, -1], np.int8))[0] == 0xF1  # low nibble first


def test_act_int8_matches_delegate_reference():
  # The delegate's int8 mode is on the .tflite FCs' grid ('int8_dynamic', as QAT), not the
  # symmetric one; tests/test_delegate*.py check the C++ op against this reference.
  from export.delegate import _quant_rows_int8
  x = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
  x[2] = 0
  x[3], x[4] = np.abs(x[3]), -np.abs(x[4])  # zero point at either end
  np.testing.assert_array_equal(grid.fake_quant_act(x, 'int8_dynamic'), _quant_rows_int8(x))
  assert not np.array_equal(grid.fake_quant_act_int8(x), _quant_rows_int8(x))


def _run_fc(path, x, resolver=None):
  """Runs the one-FC model on the rows of x (two at a time: its input shape is [2, K])."""
  from ai_edge_litert.interpreter import Interpreter, OpResolverType
  kw = {} if resolver is None else {'experimental_op_resolver_type': getattr(OpResolverType, resolver)}
  it = Interpreter(model_path=str(path), num_threads=1, **kw)
  it.allocate_tensors()
  inp, out = it.get_input_details()[0]['index'], it.get_output_details()[0]['index']
  ys = []
  for i in range(0, len(x), 2):
    it.set_tensor(inp, x[i:i + 2])
    it.invoke()
    ys.append(it.get_tensor(out).astype(np.float64))
  return np.concatenate(ys)


def _act_probe_inputs(k):
  rng = np.random.default_rng(5)
  x = rng.standard_normal((120, k)) * rng.uniform(0.01, 30, (120, 1)) + rng.uniform(-2, 2, (120, 1))
  x[:20] = np.abs(x[:20])                     # one-sided rows: the zero point matters
  x[20:30] = -np.abs(x[20:30])
  x[30:40] = np.round(x[30:40] * 4) / 4       # values landing on ties
  x[40] = 0.0
  return x.astype(np.float32)


@pytest.mark.parametrize('scheme,recipe_name', [('int4_g32', 'dynamic_wi4b32_afp32'),
                                                ('int4_channel', 'dynamic_wi4c_afp32')])
def test_activation_grid_matches_litert(tmp_path, scheme, recipe_name):
  """The .tflite's FC quantizes its input per row on grid 'int8_dynamic' (XNNPACK, the
  default interpreter), bit for bit: an invertible weight exactly on the grid lets the
  activations the kernel used be solved for from its output."""
  from ai_edge_quantizer import quantizer, recipe
  k = 64
  rng = np.random.default_rng(0)
  q = rng.integers(-7, 7, (k, k)).astype(np.float32)
  for g in range(0, k, 32):      # every group's max |q| is 7 at a different column per row
    q[np.arange(k), g + np.arange(k) % 32] = 7
  w = q * (rng.integers(16, 64, (k, 1)) / 2048).astype(np.float32)   # scales exact in bf16
  np.testing.assert_array_equal(grid.fake_quant(w, scheme), w)     # w is on the grid
  fp32 = _fp32_linear_tflite(w, tmp_path / 'fp32.tflite')
  out = tmp_path / f'{scheme}.tflite'
  quantizer.Quantizer(str(fp32), getattr(recipe, recipe_name)()).quantize().export_model(str(out))
  x = _act_probe_inputs(k)
  y = _run_fc(out, x)
  used = np.linalg.solve(w.astype(np.float64), y.T).T               # the kernel's activations
  q_a, zp, inv = grid.quantize_act_int8_asym(x)
  np.testing.assert_allclose(used * inv, np.rint(used * inv), atol=0.01)  # on an int grid
  np.testing.assert_array_equal(np.rint(used * inv), q_a.astype(np.float64) - zp)
  scale = np.abs(y).max()
  err = lambda a: np.abs(a.astype(np.float64) @ w.T.astype(np.float64) - y).max() / scale
  assert err(grid.fake_quant_act(x, 'int8_dynamic')) < 1e-6
  assert err(grid.fake_quant_act(x, 'int8_dynamic_sym')) > 1e-3     # the other grid is off
  assert err(x) > 1e-3                                             # and so is no grid
  # The same from jax.numpy, under jit.
  import jax
  import jax.numpy as jnp
  got = jax.jit(lambda a: grid.fake_quant_act(a, 'int8_dynamic'))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(got), grid.fake_quant_act(x, 'int8_dynamic'))
  if scheme == 'int4_channel':
    # Without XNNPACK, TFLite's own channel-wise kernel quantizes rows symmetrically.
    y_builtin = _run_fc(out, x, 'BUILTIN_WITHOUT_DEFAULT_DELEGATES')
    np.testing.assert_allclose(grid.fake_quant_act(x, 'int8_dynamic_sym').astype(np.float64)
                               @ w.T.astype(np.float64), y_builtin, atol=1e-6 * scale)


def test_errors():
  with pytest.raises(ValueError, match='does not divide the input dimension 96'):
    grid.quantize(np.zeros((4, 96), np.float32), 'int4_g64')
  with pytest.raises(ValueError, match='unknown quantization scheme'):
    grid.quantize(np.zeros((4, 64), np.float32), 'int3')
  with pytest.raises(ValueError, match='unknown activation quantization'):
    grid.fake_quant_act(np.zeros((4, 64), np.float32), 'int4_dynamic')


def test_act_fake_quant_in_the_model():
  """layers.act: the grid's values forward, a straight-through gradient, and float activations
  unless weights and activations are both quantized; a bad grid name is a ConfigError."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  from mobilemoe_jax import config as config_lib
  from mobilemoe_jax.model.layers import act
  quant = config_lib.model_config().quant
  quant.weights, quant.activations = 'int4_g32', 'int8_dynamic'
  x = jnp.asarray(_act_probe_inputs(64)[:8].reshape(2, 4, 2, 32))    # [B, T, H, Dh]
  rows = np.asarray(x).reshape(2, 4, 64)
  np.testing.assert_array_equal(np.asarray(act(x, quant, n_in=2)).reshape(2, 4, 64),
                                grid.fake_quant_act(rows))
  g = jax.grad(lambda a: jnp.sum(act(a, quant, n_in=2) * 3.0))(x)
  np.testing.assert_array_equal(np.asarray(g), 3.0)
  teacher = ml_collections.ConfigDict(dict(quant.to_dict(), weights=None))
  assert act(x, teacher) is x
  model = config_lib.model_config()
  model.quant.weights, model.quant.activations = 'int4_g32', 'int4'
  with pytest.raises(config_lib.ConfigError, match='model.quant.activations'):
    config_lib.validate(model)
