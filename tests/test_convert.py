"""Import of released MobileMoE snapshots and export back (mobilemoe_jax/convert), on
synthetic snapshots in exactly the released layout (tests/support/release_snapshot.py)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mobilemoe_jax.convert import __main__ as cli
from mobilemoe_jax.convert import release, snapshot
from mobilemoe_jax.convert.safetensors_file import FormatError
from mobilemoe_jax.train.loading import load_checkpoint, read_meta
from mobilemoe_jax.model import Transformer
from mobilemoe_jax.quant import grid
from mobilemoe_jax.quant.extract import integer_weights
from tests.support.release_snapshot import TINY, dequantized, pack_nibbles, write_snapshot
from tests.support.release import reference_logits

TOKENS = np.random.default_rng(3).integers(0, TINY['vocab'], 12)
NO_LOG = lambda *a: None


@pytest.fixture(scope='module')
def qat(tmp_path_factory):
  """A synthetic QAT snapshot and its import: (snapshot dir, checkpoints dir)."""
  root = tmp_path_factory.mktemp('qat')
  write_snapshot(str(root / 'snap'), layout='qat', **TINY)
  snapshot.import_snapshot(str(root / 'snap'), str(root / 'imported'), log=NO_LOG)
  return str(root / 'snap'), str(root / 'imported' / 'checkpoints')


@pytest.fixture(scope='module')
def bf16(tmp_path_factory):
  root = tmp_path_factory.mktemp('bf16')
  write_snapshot(str(root / 'snap'), layout='bf16', seed=1, **TINY)
  snapshot.import_snapshot(str(root / 'snap'), str(root / 'imported'), log=NO_LOG)
  return str(root / 'snap'), str(root / 'imported' / 'checkpoints')


def fp32(model):
  """The same weights in a model computing in float32."""
  cfg = model.cfg.copy_and_resolve_references()
  cfg.dtype = 'float32'
  graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]
  return nnx.merge(graphdef, nnx.state(model))


# ---- the packing contract on hand-built bytes ---------------------------------------------

def test_nibbles_decode_the_notes_embedding_row():
  """Notes §3.2: embedding row 9906 of the real S-QAT file starts with q = (4, 5, 4, 0, 5,
  -7, 0, 3) x fp16 scale 0.005565643310546875; low nibble = even element, two's complement."""
  packed = np.array([[0x54, 0x04, 0x95, 0x30]], np.uint8)
  np.testing.assert_array_equal(release.unpack(packed), [[4, 5, 4, 0, 5, -7, 0, 3]])
  np.testing.assert_array_equal(release.pack(np.array([[4, 5, 4, 0, 5, -7, 0, 3]])), packed)
  scale = np.float16(0.005565643310546875)
  assert float(scale) == 0.005565643310546875                  # exactly an fp16
  values = release.unpack(packed).astype(np.float32) * np.float32(scale)
  np.testing.assert_allclose(values[0], [0.0222625732, 0.0278282166, 0.0222625732, 0,
                                         0.0278282166, -0.0389595032, 0, 0.0166969299], atol=1e-10)
  assert release.unpack(np.array([0x8F], np.uint8)).tolist() == [-1, -8]


def test_import_places_the_notes_row_and_groups_along_the_last_axis(tmp_path):
  """Hand-built tensors: the embedding row pattern lands in our table exactly; every other
  weight is all ones (q = 1), so the imported value is its group's scale: linears group
  along their input axis, experts along their output axis, gate | up split at I."""
  snap = str(tmp_path / 'snap')
  cfg = write_snapshot(snap, **TINY)
  t = load_file(os.path.join(snap, 'model.safetensors'))
  for name in t:
    if name.endswith('qweight'):
      t[name] = np.full_like(t[name], 0x11)                     # every nibble = 1
  row = np.zeros(TINY['hidden'], np.int64)
  row[:8] = [4, 5, 4, 0, 5, -7, 0, 3]
  t['model.embed_tokens.qweight'][7] = pack_nibbles(row)
  t['model.embed_tokens.weight_scale'][7, 0] = np.float16(0.005565643310546875)
  rng = np.random.default_rng(0)
  for name in t:                     # distinct scales everywhere, so a wrong group shows
    if name.endswith('scale'):
      t[name] = rng.uniform(0.001, 0.01, t[name].shape).astype(np.float16)
  t['model.embed_tokens.weight_scale'][7, 0] = np.float16(0.005565643310546875)
  save_file(t, os.path.join(snap, 'model.safetensors'), metadata={'format': 'pt'})
  snapshot.import_snapshot(snap, str(tmp_path / 'imp'), log=NO_LOG)
  model = load_checkpoint(str(tmp_path / 'imp' / 'checkpoints'), need_tokenizer=False).model
  np.testing.assert_array_equal(np.asarray(model.embed[...])[7, :8], np.float32(
      np.array([4, 5, 4, 0, 5, -7, 0, 3], np.float32) * np.float32(0.005565643310546875)))
  blk = model.blocks[0]
  # v_proj [K, H] (rows not permuted): our v [H, kv, dh] at (in, out) = scale[out, in // 32]
  s = t['model.layers.0.self_attn.v_proj.weight_scale'].astype(np.float32)
  v = np.asarray(blk.attn.v[...]).reshape(TINY['hidden'], -1)
  np.testing.assert_array_equal(v, np.repeat(s, 32, axis=1).T)
  # experts [E, H, 2I]: our gate[e, i, j] = scale[e, i, j // 32], up the columns from I on
  s = t['model.layers.0.feed_forward.experts.gate_up_scale'].astype(np.float32)
  full = np.repeat(s, 32, axis=-1)
  np.testing.assert_array_equal(np.asarray(blk.ffn.gate[...]), full[..., :TINY['d_expert']])
  np.testing.assert_array_equal(np.asarray(blk.ffn.up[...]), full[..., TINY['d_expert']:])
  s = t['model.layers.0.feed_forward.experts.down_scale'].astype(np.float32)
  np.testing.assert_array_equal(np.asarray(blk.ffn.down[...]), np.repeat(s, 32, axis=-1))
  # the learned scales are the file's: out-axis for experts, in-axis elsewhere
  np.testing.assert_array_equal(np.asarray(blk.ffn.down_scale[...]), s)
  np.testing.assert_array_equal(np.asarray(blk.attn.v_scale[...]),
                                t['model.layers.0.self_attn.v_proj.weight_scale'].astype(np.float32).T)
  assert cfg['quantization']['format'] == 'mobilemoe-int4-g32'


# ---- config --------------------------------------------------------------------------------

def test_config_json_maps_to_our_fields(qat):
  model = load_checkpoint(qat[1], need_tokenizer=False).model
  meta = read_meta(qat[1])
  c = model.cfg
  assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (96, 64, 3, 4, 2, 16)
  assert c.qk_norm and tuple(c.nope_layers) == (1,) and c.tie_embeddings and c.sliding_window == 0
  assert dict(c.rope_scaling) == dict(kind='llama3', factor=4.0, original_max_len=16,
                                      low_freq_factor=1.0, high_freq_factor=1.0)
  m = c.moe
  assert (m.n_experts, m.top_k, m.d_expert, m.n_shared, m.d_shared, m.every, m.first_dense) == (6, 2, 32, 1, 64, 1, 0)
  assert m.score_func == 'sigmoid' and m.routed_scale == 2.5 and m.expert_bias and m.norm_topk_prob
  assert {k: c.quant[k] for k in release.QAT_QUANT} == release.QAT_QUANT
  assert meta['lineage'][0]['stage'] == 'import' and meta['lineage'][0]['layout'] == 'qat'


# ---- numerics ------------------------------------------------------------------------------

@pytest.mark.parametrize('which', ['qat', 'bf16'])
def test_logits_equal_the_numpy_reference_on_the_files(which, qat, bf16):
  """Our fp32 logits of the imported checkpoint = the notes' numpy forward on the weights
  read straight from model.safetensors (tests/support/release_snapshot.dequantized)."""
  snap, ckpt = {'qat': qat, 'bf16': bf16}[which]
  model = load_checkpoint(ckpt, need_tokenizer=False).model
  want = reference_logits(dequantized(snap), model.cfg, TOKENS, np.arange(len(TOKENS), dtype=np.float64))
  got = np.asarray(nnx.jit(lambda m, x: m(x)[0])(fp32(model), jnp.asarray(TOKENS)[None])[0])
  assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_qat_stage_from_the_import_keeps_the_released_integers(qat, tmp_path):
  """What train.init_from does (load_for_init into the QAT stage's state, the release grid
  with learned scales and int8 activations) gives exactly the file's integers and scales."""
  from configs.stages import qat as qat_stage
  from mobilemoe_jax.train import checkpoint as ckpt_lib
  from mobilemoe_jax.train.trainer import make_init_fn, model_graphdef
  import jax
  import optax
  model = load_checkpoint(qat[1], need_tokenizer=False).model
  config = qat_stage.get_config('tiny')
  config.model = model.cfg.copy_and_resolve_references()
  config.model.quant.activations = 'int8_dynamic'          # as the QAT stage trains
  abstract = jax.eval_shape(make_init_fn(config, optax.sgd(0.0)))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded, _, _ = ckpt_lib.load_for_init(qat[1], abstract, jax.tree.map(lambda _: one, abstract),
                                        ('params', 'rest'))
  stage_model = nnx.merge(model_graphdef(config), loaded['params'], loaded['rest'])
  ints = integer_weights(stage_model)
  t = load_file(os.path.join(qat[0], 'model.safetensors'))
  # the embedding and one expert tensor against the file, directly
  np.testing.assert_array_equal(release.pack(np.asarray(ints[('embed',)]['q']).T),
                                t['model.embed_tokens.qweight'])
  np.testing.assert_array_equal(np.asarray(ints[('embed',)]['scales']).T.astype(np.float16),
                                t['model.embed_tokens.weight_scale'])
  down = ints[('blocks', 2, 'ffn', 'down')]
  np.testing.assert_array_equal(release.pack(np.asarray(down['q'])),
                                t['model.layers.2.feed_forward.experts.down_qweight'])
  # and every tensor, through the exporter (which reads integer_weights)
  out = snapshot.release_tensors(stage_model, 'qat')
  for name, a in t.items():
    np.testing.assert_array_equal(out[name].view(np.uint8), a.view(np.uint8), err_msg=name)


# ---- round trips ----------------------------------------------------------------------------

def _bytes(path):
  with open(path, 'rb') as f:
    return f.read()


def test_qat_import_export_is_byte_identical(qat, tmp_path):
  snapshot.export_checkpoint(qat[1], str(tmp_path / 'a'), log=NO_LOG)
  snapshot.export_checkpoint(qat[1], str(tmp_path / 'b'), log=NO_LOG)
  src = _bytes(os.path.join(qat[0], 'model.safetensors'))
  assert _bytes(str(tmp_path / 'a' / 'model.safetensors')) == src      # header included
  assert _bytes(str(tmp_path / 'b' / 'model.safetensors')) == src      # deterministic
  with open(os.path.join(qat[0], 'config.json')) as f, open(tmp_path / 'a' / 'config.json') as g:
    assert json.load(f) == json.load(g)
  for name in ('tokenizer_config.json', 'generation_config.json'):
    assert _bytes(os.path.join(qat[0], name)) == _bytes(str(tmp_path / 'a' / name))


def test_qat_checkpoint_exports_bf16_of_the_weights_it_computes_with(qat, tmp_path):
  """bf16 of a QAT model = its dequantized integers, not its latent float weights (moved
  here by 0.1%, as training moves them, without changing an integer)."""
  from mobilemoe_jax.model.layers import QuantScale
  model = load_checkpoint(qat[1], need_tokenizer=False).model
  weights = nnx.state(model, nnx.All(nnx.Param, nnx.Not(QuantScale)))
  nnx.update(model, jax.tree.map(lambda w: w * 1.001, weights))
  got = snapshot.release_tensors(model, 'bf16')
  want = dequantized(qat[0])
  assert set(got) == set(want)
  for name, a in want.items():
    dtype = np.float32 if name.endswith('router.weight') else got['model.norm.weight'].dtype
    if release.is_quantized(name):
      np.testing.assert_array_equal(got[name], a.astype(np.float32).astype(dtype), err_msg=name)
  snapshot.export_checkpoint(qat[1], str(tmp_path / 'out'), 'bf16', log=NO_LOG)
  snapshot.import_snapshot(str(tmp_path / 'out'), str(tmp_path / 'back'), log=NO_LOG)


def test_bf16_import_export_is_byte_identical(bf16, tmp_path):
  snapshot.export_checkpoint(bf16[1], str(tmp_path / 'out'), log=NO_LOG)
  assert _bytes(str(tmp_path / 'out' / 'model.safetensors')) == \
      _bytes(os.path.join(bf16[0], 'model.safetensors'))
  with open(tmp_path / 'out' / 'config.json') as f:
    assert 'quantization' not in json.load(f)


def test_float_checkpoint_exports_post_training_int4_on_the_release_grid(bf16, tmp_path):
  """--format qat of a float model: scales fp16(2 max|w| / 15) per group (notes §2.5),
  q = round(w / s); the file imports back."""
  snapshot.export_checkpoint(bf16[1], str(tmp_path / 'q'), 'qat', log=NO_LOG)
  t = load_file(str(tmp_path / 'q' / 'model.safetensors'))
  w = load_file(os.path.join(bf16[0], 'model.safetensors'))['model.layers.1.feed_forward.experts.down_proj']
  w = w.astype(np.float32)
  groups = w.reshape(*w.shape[:-1], -1, 32)
  s = (2 * np.abs(groups).max(-1) / 15).astype(np.float16)
  np.testing.assert_array_equal(t['model.layers.1.feed_forward.experts.down_scale'], s)
  q = np.clip(np.round(groups / s.astype(np.float32)[..., None]), -8, 7).reshape(w.shape)
  np.testing.assert_array_equal(t['model.layers.1.feed_forward.experts.down_qweight'], pack_nibbles(q))
  np.testing.assert_array_equal(s.astype(np.float32), grid.scales(w, 'int4_g32', -1, 'release'))
  snapshot.import_snapshot(str(tmp_path / 'q'), str(tmp_path / 'back'), log=NO_LOG)


def test_cli_round_trip(qat, tmp_path, capsys):
  assert cli.main(['import', qat[0], str(tmp_path / 'imp')]) == 0
  assert cli.main(['export', str(tmp_path / 'imp' / 'checkpoints'), str(tmp_path / 'out')]) == 0
  assert _bytes(str(tmp_path / 'out' / 'model.safetensors')) == \
      _bytes(os.path.join(qat[0], 'model.safetensors'))


# ---- bad input -------------------------------------------------------------------------------

def _edit_config(snap, fn):
  p = os.path.join(snap, 'config.json')
  with open(p) as f:
    c = json.load(f)
  fn(c)
  with open(p, 'w') as f:
    json.dump(c, f)


def _edit_tensors(snap, fn):
  p = os.path.join(snap, 'model.safetensors')
  t = load_file(p)
  fn(t)
  save_file(t, p)


def _truncate(snap):
  p = os.path.join(snap, 'model.safetensors')
  data = _bytes(p)
  with open(p, 'wb') as f:
    f.write(data[:-10])


def _hostile_header(snap):
  header = json.dumps({'model.norm.weight': {'dtype': ['BF16'], 'shape': [64], 'data_offsets': [0, 128]}})
  header = header.encode() + b' ' * (-len(header) % 8)
  with open(os.path.join(snap, 'model.safetensors'), 'wb') as f:
    f.write(len(header).to_bytes(8, 'little') + header + bytes(128))


def _garbage_header(snap):
  with open(os.path.join(snap, 'model.safetensors'), 'wb') as f:
    f.write((40).to_bytes(8, 'little') + b'{"not json' + b' ' * 40)


L0 = 'model.layers.0.'
BAD = {
    'format string': (lambda s: _edit_config(s, lambda c: c['quantization'].update(format='int4-offset8')),
                      r'quantization\.format'),
    'quantization field missing': (lambda s: _edit_config(s, lambda c: c['quantization'].pop('packed')),
                                   r'quantization\.packed'),
    'expert axis': (lambda s: _edit_config(s, lambda c: c['quantization'].update(expert_group_axis='in')),
                    r'quantization\.expert_group_axis'),
    'model_type': (lambda s: _edit_config(s, lambda c: c.update(model_type='llama')), r'model_type'),
    'sliding layers': (lambda s: _edit_config(s, lambda c: c['layer_types'].__setitem__(0, 'sliding_attention')),
                       r'layer_types'),
    'missing field': (lambda s: _edit_config(s, lambda c: c.pop('routed_scaling_factor')),
                      r'routed_scaling_factor'),
    'missing tensor': (lambda s: _edit_tensors(s, lambda t: t.pop(L0 + 'self_attn.k_proj.weight_scale')),
                       r'missing 1 \[.model\.layers\.0\.self_attn\.k_proj\.weight_scale.\]'),
    'unexpected tensor': (lambda s: _edit_tensors(s, lambda t: t.update({'lm_head.weight': np.zeros((2, 2), np.float32)})),
                          r'unexpected 1 \[.lm_head\.weight.\]'),
    'wrong shape': (lambda s: _edit_tensors(s, lambda t: t.update({L0 + 'self_attn.q_proj.weight_scale': np.zeros((64, 3), np.float16)})),
                    r'self_attn\.q_proj\.weight_scale: F16 \[64, 3\], expected F16 \[64, 2\]'),
    'wrong dtype': (lambda s: _edit_tensors(s, lambda t: t.update({'model.norm.weight': np.ones(64, np.float32)})),
                    r'model\.norm\.weight: F32 \[64\], expected BF16 \[64\]'),
    'odd nibble count': (lambda s: _edit_tensors(s, lambda t: t.update({L0 + 'self_attn.o_proj.qweight': np.zeros((64, 31), np.uint8)})),
                         r'self_attn\.o_proj\.qweight: U8 \[64, 31\], expected U8 \[64, 32\]'),
    'non-finite scale': (lambda s: _edit_tensors(s, lambda t: t[L0 + 'feed_forward.experts.down_scale'].__setitem__((0, 0, 0), np.inf)),
                         r'experts\.down_scale: non-finite'),
    'truncated': (_truncate, r'tensor model\.\S+: data ends at byte \d+ but the file holds only'),
    'garbage header': (_garbage_header, r'model\.safetensors: the header is not valid JSON'),
    'hostile header': (_hostile_header, r"tensor model\.norm\.weight: unknown dtype \['BF16'\]"),
    'absurd size': (lambda s: _edit_config(s, lambda c: c.update(num_hidden_layers=10 ** 9)),
                    r'`num_hidden_layers` = 1000000000 is out of range'),
    'quantization block without packed tensors': (
        lambda s: _edit_tensors(s, lambda t: [t.pop(n) for n in list(t) if n.endswith(('qweight', 'scale'))]),
        r'nothing is packed'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_names_the_field_or_tensor(case, qat, tmp_path):
  snap = str(tmp_path / 'snap')
  shutil.copytree(qat[0], snap)
  damage, message = BAD[case]
  damage(snap)
  with pytest.raises(FormatError, match=message):
    snapshot.import_snapshot(snap, str(tmp_path / 'out'), log=NO_LOG)
  assert not os.path.exists(tmp_path / 'out' / 'checkpoints')


def test_packed_tensors_without_a_quantization_block_are_refused(qat, tmp_path):
  snap = str(tmp_path / 'snap')
  shutil.copytree(qat[0], snap)
  _edit_config(snap, lambda c: c.pop('quantization'))
  with pytest.raises(FormatError, match=r'packed INT4 tensors, but config.json has no `quantization`'
                                        r'.*missing \d+ \[.model\.embed_tokens\.weight'):
    snapshot.import_snapshot(snap, str(tmp_path / 'out'), log=NO_LOG)


def test_cli_reports_bad_input(qat, tmp_path, capsys):
  snap = str(tmp_path / 'snap')
  shutil.copytree(qat[0], snap)
  _edit_config(snap, lambda c: c['quantization'].update(qmin=-7))
  assert cli.main(['import', snap, str(tmp_path / 'out')]) == 1
  assert 'quantization.qmin' in capsys.readouterr().err
  assert cli.main(['import', qat[0], os.path.dirname(qat[1])]) == 1    # never over an import
  assert 'already exists' in capsys.readouterr().err


def test_qat_export_refuses_a_grid_the_format_cannot_hold():
  """Our own QAT grid (experts grouped along their input) cannot be written as the
  release's packed experts: refused with the field named."""
  from tests.support.release import release_like
  cfg = release_like()
  cfg.quant.weights = 'int4_g32'
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"model\.quant\.expert_group_axis='in'"):
    snapshot.release_tensors(model, 'qat')


def test_release_scale_rule_and_config_validation():
  w = np.array([[0.3, -0.75] + [0.0] * 30], np.float32)
  np.testing.assert_array_equal(grid.scales(w, 'int4_g32', -1, 'release'),
                                [[np.float32(np.float16(2 * 0.75 / 15))]])
  from mobilemoe_jax import config as config_lib
  for field, value in (('expert_group_axis', 'rows'), ('scale_rule', 'paper')):
    cfg = config_lib.model_config()
    cfg.quant[field] = value
    with pytest.raises(config_lib.ConfigError, match=f'model.quant.{field}'):
      config_lib.validate(cfg)


def test_a_qat_stage_run_from_the_import_exports_the_same_bytes(data_dir, tmp_path):
  """The trainer itself: a QAT stage (int8 activations, self-distillation) initialised from an
  imported QAT snapshot, run one step whose update is far below half an ulp of every weight
  and scale (lr 1e-30: the config refuses lr 0), exports the released file again, byte for
  byte (every integer and scale, the expert biases, the header)."""
  from configs.stages import qat as qat_stage
  from mobilemoe_jax.train import train_and_evaluate
  snap = str(tmp_path / 'snap')
  write_snapshot(snap, **{**TINY, 'vocab': 512, 'layers': 1, 'nope': ()})   # the bundled vocabulary
  snapshot.import_snapshot(snap, str(tmp_path / 'imp'), log=NO_LOG)
  model = load_checkpoint(str(tmp_path / 'imp' / 'checkpoints'), need_tokenizer=False).model
  config = qat_stage.get_config(f'tiny,data_dir={data_dir}')
  config.model = model.cfg.copy_and_resolve_references()
  config.model.quant.activations = 'int8_dynamic'
  config.update_from_flattened_dict({
      'train.init_from': str(tmp_path / 'imp' / 'checkpoints'), 'train.steps': 1, 'train.warmup_steps': 0, 'train.lr': 1e-30,
      'train.batch_size': 8, 'train.seq_len': 16, 'train.eval_batches': 0, 'train.progress': False,
      'model.moe.bias_update_rate': 0.0})
  train_and_evaluate(config, str(tmp_path / 'stage'))
  snapshot.export_checkpoint(str(tmp_path / 'stage' / 'checkpoints'), str(tmp_path / 'out'), log=NO_LOG)
  assert _bytes(str(tmp_path / 'out' / 'model.safetensors')) == _bytes(os.path.join(snap, 'model.safetensors'))


def test_eval_scores_the_import_with_the_snapshots_tokenizer(tmp_path):
  """The snapshot's tokenizer.json travels with the import, and eval's loader scores with it."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from mobilemoe_jax.eval.jax_lm import token_logprobs
  snap = str(tmp_path / 'snap')
  write_snapshot(snap, **TINY)
  words = ['<|begin_of_text|>', '<|end_of_text|>', '[UNK]'] + [chr(97 + i) for i in range(26)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(snap, 'tokenizer.json'))
  snapshot.import_snapshot(snap, str(tmp_path / 'imp'), log=NO_LOG)
  assert _bytes(str(tmp_path / 'imp' / 'release' / 'tokenizer.json')) == _bytes(os.path.join(snap, 'tokenizer.json'))
  model, _, tokenizer = load_checkpoint(str(tmp_path / 'imp' / 'checkpoints'))
  ids = [tokenizer.bos_id] + tokenizer.encode('a b c d')
  assert ids == [0, 3, 4, 5, 6]
  logp, _ = token_logprobs(model, jnp.asarray([ids[:-1]]), jnp.asarray([ids[1:]]))
  assert np.isfinite(np.asarray(logp)).all() and (np.asarray(logp) < 0).all()
  snapshot.export_checkpoint(str(tmp_path / 'imp' / 'checkpoints'), str(tmp_path / 'out'), log=NO_LOG)
  assert _bytes(str(tmp_path / 'out' / 'tokenizer.json')) == _bytes(os.path.join(snap, 'tokenizer.json'))


def test_our_own_model_round_trips_through_the_bf16_format(tmp_path):
  """A model that never came from a snapshot (no config.json to start from): written with a
  fresh config.json, it imports back to the same config and the bf16-rounded weights."""
  from mobilemoe_jax.convert import layout
  from tests.support.release import release_like
  cfg = release_like(nope_layers=(0,), **{'moe.every': 1})
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  out = tmp_path / 'snap'
  out.mkdir()
  save_file(snapshot.release_tensors(model, 'bf16'), str(out / 'model.safetensors'))
  with open(out / 'config.json', 'w') as f:
    json.dump(release.config_json(cfg), f)
  back, layout_name, weights, _, _ = snapshot.read_snapshot(str(out))
  assert layout_name == 'bf16'
  for key in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'qk_norm',
              'rope_theta', 'norm_eps', 'max_seq_len', 'tie_embeddings'):
    assert back[key] == cfg[key], key
  assert tuple(back.nope_layers) == (0,) and dict(back.rope_scaling) == dict(cfg.rope_scaling)
  assert back.moe.to_dict() == {**cfg.moe.to_dict(), 'dispatch': back.moe.dispatch,
                                'capacity_factor': back.moe.capacity_factor}
  ours = layout.to_ours(weights, back)
  for path, w in layout.from_model(model).items():
    want = w.astype(np.float32) if path[-1] == 'router' else w.astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(ours[path], want, err_msg=str(path))
  with pytest.raises(ValueError, match=r"score_func.*'softmax'"):
    release.config_json(release_like(**{'moe.score_func': 'softmax'}))
