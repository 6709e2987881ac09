"""The .tflite export: fp32 == PyTorch == JAX, prefill + decode == full forward, weights
really INT4 and exactly the checkpoint's integers and learned scales (read from the schema),
and the delegate lowering (structure + the delegate).

One small MoE QAT model (a windowed dense layer, then a global MoE layer; LSQ scales, int8
KV cache) is converted once per lowering; quantized variants are made from the fp32
flatbuffer, which is fast.
"""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('litert_torch')

from export import flatbuf, litert, moe_op
from export import torch_model as tm
from export.runner import LiteRTLM
from mobilemoe_jax.quant import grid
from tests.support.models import lsq_model, make

pytestmark = pytest.mark.slow   # a .tflite conversion per lowering

KV_LEN = 96
TOK = np.random.default_rng(1).integers(0, 2048, 88)      # past the 64-token window


@pytest.fixture(scope='module')
def qat_model():
  """A QAT checkpoint with learned (LSQ) scales moved off max-abs: the hardest case for an
  exact export (ai-edge-quantizer alone would recompute max-abs scales); and an int8 KV
  cache (its quantize-dequantize is in the graph, the cache tensors stay f32)."""
  cfg, m = make('moe')
  cfg.n_layers = 2
  cfg.sliding_window = 64
  cfg.quant.kv_cache = 'int8'
  from flax import nnx
  from mobilemoe_jax.model import Transformer
  m = Transformer(cfg, rngs=nnx.Rngs(3))
  for b in m.blocks:
    if hasattr(b.ffn, 'router'):
      b.ffn.router[...] = b.ffn.router[...] * 30.0
  return lsq_model(cfg, m)


@pytest.fixture(scope='module')
def small(qat_model):
  """Its PyTorch twin: weights = the dequantized integers, the integers in `module.grid`."""
  return tm.from_flax(qat_model[1], qat_model[0])


@pytest.fixture(scope='module')
def jax_logits(qat_model):
  return np.asarray(qat_model[1](TOK[None])[0][0])


@pytest.fixture(scope='module')
def fp32_path(small, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('litert') / 'fp32.tflite')
  small.set_moe_lowering('portable')
  litert.convert_fp32(small, path, prefill_lens=(8, 32), kv_len=KV_LEN, log=lambda _: None)
  return path


def torch_logits(model):
  with torch.no_grad():
    return model(torch.from_numpy(TOK[None]).long())[0].numpy()


def load_delegate(activations):
  """(the export.delegate module, a loaded delegate). Skips only where no C++ compiler is
  installed, outside CI (.ci/run sets CI and has one); any other delegate error fails."""
  export_delegate = pytest.importorskip('export.delegate')
  if not (shutil.which('g++') and shutil.which('make')):
    (pytest.fail if os.environ.get('CI') else pytest.skip)('no g++/make to build the delegate')
  return export_delegate, export_delegate.load(activations=activations)


def run(path, n_prompt=70, delegate=None, decode_delegate=None):
  """Prefill (chunks of 32 and a padded 8) then decode the rest."""
  lm = LiteRTLM(path, delegate=delegate, decode_delegate=decode_delegate)
  out = [lm.prefill(TOK[:n_prompt])]
  out += [lm.decode(t)[None] for t in TOK[n_prompt:]]
  return np.concatenate(out)


def test_fp32_equals_torch_and_cache_equals_full_forward(small, fp32_path, jax_logits):
  want = torch_logits(small)
  np.testing.assert_allclose(want, jax_logits, atol=1e-4, rtol=0)   # the JAX QAT forward
  # Prefill-only, prefill+decode and decode-only all reproduce the full forward.
  for n_prompt in (88, 70, 1):
    np.testing.assert_allclose(run(fp32_path, n_prompt), want, atol=1e-4, rtol=0)
  model, _ = flatbuf.load(fp32_path)
  assert sorted(flatbuf.signatures(model)) == ['decode', 'prefill_32', 'prefill_8']
  # The graph never writes the cache (the runner writes the returned rows in place).
  assert 'DYNAMIC_UPDATE_SLICE' not in flatbuf.op_names(model)


def test_signatures_return_only_the_new_rows(small, fp32_path):
  """Each signature outputs the logits and its T tokens' K/V [1, T, K, Dh] per layer, no
  cache; decode's cache inputs hold all KV_LEN slots, a prefill_<T>'s the KV_LEN - T it
  can see."""
  c = small.cfg
  k, dh, n = c['n_kv_heads'], c['head_dim'], c['n_layers']
  lm = LiteRTLM(fp32_path)
  for sig, t in (('decode', 1), ('prefill_8', 8), ('prefill_32', 32)):
    outs = {name: list(d['shape']) for name, d in lm.runners[sig].get_output_details().items()}
    assert outs == {'logits': [1, t, c['vocab_size']],
                    **{f'new_{kv}_{i}': [1, t, k, dh] for i in range(n) for kv in 'kv'}}
    ins = {name: list(d['shape']) for name, d in lm.runners[sig].get_input_details().items()}
    slots = KV_LEN if sig == 'decode' else KV_LEN - t
    assert ins == {'tokens': [1, t], 'input_pos': [t],
                   **{f'kv_cache_k_{i}': [1, k, slots, dh] for i in range(n)},
                   **{f'kv_cache_v_{i}': [1, k, dh, slots] for i in range(n)}}


def test_runner_cache_holds_the_rows_in_place(small, fp32_path):
  """After a prefill (two chunks) and decode steps, the runner's cache (the decode
  signature's own input buffers) holds exactly PyTorch's K/V rows at slots < pos: the
  writes persist across invocations of every signature; later slots are untouched zeros.
  A saved cache assigned back restores the context (what the lm_eval backend does).
  The logits a step returns are the caller's: later steps leave them as they were."""
  lm = LiteRTLM(fp32_path)
  lm.prefill(TOK[:40])                            # prefill_32 + a padded prefill_8
  for t in TOK[40:50]:
    lm.decode(t)
  assert lm.pos == 50
  with torch.no_grad():
    _, new = small(torch.from_numpy(TOK[None, :50]).long(), torch.arange(50, dtype=torch.int32),
                   small.empty_cache(1, 1))
  want = small.empty_cache(1, KV_LEN)
  for layer, kv in zip(want, new):
    tm.write_cache(layer, kv, 0)
  for i, (k, v) in enumerate(want):
    for name, ref in ((f'kv_cache_k_{i}', k), (f'kv_cache_v_{i}', v)):
      np.testing.assert_allclose(lm.kv[name], ref.numpy(), atol=1e-5, rtol=0)
      assert not lm.kv[name][..., 50:, :].any() if 'k_' in name else not lm.kv[name][..., 50:].any()
  saved, logits = {n: v.copy() for n, v in lm.kv.items()}, lm.decode(TOK[50])
  lm.reset()
  assert not any(v.any() for v in lm.kv.values())
  lm.kv, lm.pos = saved, 50
  np.testing.assert_array_equal(lm.decode(TOK[50]), logits)
  kept = logits.copy()
  assert not np.array_equal(lm.decode(TOK[51]), kept)
  np.testing.assert_array_equal(logits, kept)


@pytest.mark.parametrize('quant,emb', [('int4_g32', 'auto'), ('int4_channel', 'int8')])
def test_int4_weights_are_int4_on_our_grid(small, fp32_path, tmp_path, quant, emb, jax_logits):
  """The exported file holds the checkpoint's own integers and learned scales where it uses
  the checkpoint's grid (int4_g32), and the max-abs grid of the weights elsewhere."""
  out = str(tmp_path / f'{quant}.tflite')
  litert.quantize(fp32_path, out, quant, emb, small.cfg, log=lambda _: None)
  exact = litert.write_grid(out, small, quant, emb, log=lambda _: None)
  model, raw = flatbuf.load(out)
  scheme = grid.get_scheme(quant)
  # Every FC weight but the router, and the (tied) lm_head: (weight, the checkpoint's grid).
  ours = {}
  for name, mod in small.named_modules():
    if isinstance(mod, torch.nn.Linear) and not name.endswith('router'):
      ours[name] = (mod.weight.detach().numpy(), mod.grid)
  ours['lm_head'] = (small.embed.weight.detach().numpy(), small.embed.grid)
  expected = {}
  for name, (w, g) in ours.items():
    q, s = (g.q, g.scales) if grid.get_scheme(g.scheme) == scheme else grid.quantize(w, scheme)
    expected[q.tobytes()] = (name, s)
  if quant == 'int4_g32':   # every weight placed (in every signature); all but the
    assert exact['weights'] == len(ours) and exact['changed'] == len(ours) - 1  # embedding learned
    assert exact['tensors'] == len(list(flatbuf.quantized_constants(flatbuf.load(out)[0])))
  else:
    assert exact['weights'] == 0
  n_fc, n_int4 = 0, 0
  for sg in model.subgraphs[:1]:
    for op in sg.operators:
      if max(model.operatorCodes[op.opcodeIndex].builtinCode,
             model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) != 9:
        continue
      t = sg.tensors[op.inputs[1]]
      n_fc += 1
      if t.type == flatbuf.T.FLOAT32:
        assert t.shape[0] == small.cfg['moe']['n_experts'], 'only the router stays fp32'
        continue
      assert flatbuf.TYPE_NAMES[t.type] == 'INT4'
      n_int4 += 1
      q = flatbuf.tensor_value(model, raw, t)
      assert q.tobytes() in expected, f'{t.name}: integers not on our grid'
      s, qdim, block = flatbuf.weight_quant(model, raw, sg, t)
      assert block == scheme.group and qdim == 0
      np.testing.assert_array_equal(s.reshape(expected[q.tobytes()][1].shape), expected[q.tobytes()][1])
  assert n_int4 >= len(ours) - 1 and n_fc > n_int4
  rep = litert.report(out)
  # All those weights are stored at half a byte each (read from the schema).
  assert rep['weight_bytes']['INT4'] >= sum(w.size for w, _ in ours.values()) // 2
  assert rep['int4_fraction'] > 0.4
  # And the model still computes the fake-quantized network (dynamic int8 activations on top).
  ref = torch_logits(litert.fake_quant(small, quant, emb))
  got = run(out)
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert err < 0.05, err
  assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
  if quant == 'int4_g32':   # the checkpoint's grid: the JAX QAT forward itself
    err = np.abs(got - jax_logits).max() / np.abs(jax_logits).max()
    assert err < 0.05, err
    assert (got.argmax(-1) == jax_logits.argmax(-1)).mean() >= 0.9


def test_write_grid_per_channel(small, fp32_path, tmp_path):
  """write_grid on channel-wise INT4 FCs and an INT8 embedding, whose scales live in each
  tensor's table once per signature (not in a shared buffer): every signature gets them."""
  import copy
  out = str(tmp_path / 'channel.tflite')
  litert.quantize(fp32_path, out, 'int4_channel', 'int8', small.cfg, log=lambda _: None)
  m = copy.deepcopy(small)
  for name in tm.grid_names(m):   # any integers and scales: this checks the file mechanics
    scheme = 'int8_channel' if name == 'embed.weight' else 'int4_channel'
    q, s = grid.quantize(m.get_parameter(name).detach().numpy(), scheme)
    tm.set_grid(m, name, tm.Grid(np.clip(-q, -7, 7).astype(np.int8), s * 1.5, scheme))
  rep = litert.write_grid(out, m, 'int4_channel', 'int8', log=lambda _: None)
  n = len(tm.grid_names(m))
  assert rep['weights'] == rep['changed'] == n
  given = {g.q.tobytes(): g for g in tm.grids(m).values()}
  model, raw = flatbuf.load(out)
  placed = 0
  for sg, t in flatbuf.quantized_constants(model):
    g = given.get(flatbuf.tensor_value(model, raw, t).tobytes())
    if g is not None:           # (the tied lm_head's INT4 copy of the embedding has none)
      np.testing.assert_array_equal(flatbuf.weight_quant(model, raw, sg, t)[0], g.scales.ravel())
      placed += 1
  assert placed == rep['tensors'] == n * len(model.subgraphs)


def test_int8_and_embedding(small, fp32_path, tmp_path):
  out = str(tmp_path / 'int8.tflite')
  litert.quantize(fp32_path, out, 'int8', 'int8', small.cfg, log=lambda _: None)
  by_type = litert.report(out)['weight_bytes']
  assert by_type.get('INT8', 0) > 0 and 'INT4' not in by_type
  ref = torch_logits(litert.fake_quant(small, 'int8', 'int8'))
  np.testing.assert_allclose(run(out), ref, atol=0.02 * np.abs(ref).max(), rtol=0)


def test_bad_quant_is_refused(small):
  with pytest.raises(ValueError, match='unknown --quant'):
    litert.recipe('int3', 'int8', small.cfg)


@pytest.fixture(scope='module')
def delegate_dir(small, tmp_path_factory):
  """The CLI on a saved PyTorch dir with --moe delegate --attention delegate."""
  from export import __main__ as cli
  d = tmp_path_factory.mktemp('cli')
  tm.save(small, str(d / 'torch'))
  out = str(d / 'moe_delegate.tflite')
  cli.main(['--checkpoint', str(d / 'torch'), '--out', out, '--quant', 'fp32', '--embedding', 'fp32', '--moe', 'delegate',
            '--attention', 'delegate', '--prefill', '8,32', '--kv-len', str(KV_LEN), '--no-verify'])
  small.set_moe_lowering('portable')
  return out


def test_delegate_op_structure(small, delegate_dir):
  model, _ = flatbuf.load(delegate_dir)
  assert 'MobileMoeBlock' in flatbuf.op_names(model)
  assert 'TOPK_V2' not in flatbuf.op_names(model)        # routing lives inside the op
  # --attention delegate: every signature's attention, one op per layer.
  counts = flatbuf.signature_op_counts(model)
  assert {k: c.get('MobileKvAttention', 0) for k, c in counts.items()} == {
      'decode': 2, 'prefill_8': 2, 'prefill_32': 2}
  ops = moe_op.read_ops(delegate_dir)
  assert len(ops) == 1                                     # one MoE layer (per signature)
  opts, ws = ops[0]
  m = small.cfg['moe']
  assert opts == {'num_experts': 8, 'top_k': 2, 'd_model': 128, 'd_expert': 64, 'd_shared': 64,
                  'group_size': 32, 'score_func': 'softmax', 'norm_topk_prob': True,
                  'routed_scale': 1.0, 'act': 'silu', 'expert_group_axis': 'in',
                  'weight_tiles': 0}   # d_expert = d_shared = 64: down's K cannot tile (test_moe_op)
  moe = small.blocks[1].ffn
  e, f, d = m['n_experts'], m['d_expert'], small.cfg['d_model']
  assert ws['gate_up_q'].shape == (e, 2 * f, d // 2) and ws['gate_up_s'].shape == (e, 2 * f, d // 32)
  assert ws['down_q'].shape == (e, d, f // 2) and ws['down_s'].shape == (e, d, f // 32)
  # Packed tensors hold the checkpoint's own integers and learned scales (through the saved
  # PyTorch dir): they decode to the weights exactly (the weights are those dequantized
  # integers), and the scales are not the max-abs ones the weights would give.
  gu = moe.gate_up.weight.detach().numpy().reshape(e, 2 * f, d)   # expert-major, gate rows first
  down = np.stack([l.weight.detach().numpy() for l in moe.down])
  sh = np.concatenate([moe.shared.gate.weight.detach().numpy(), moe.shared.up.weight.detach().numpy()])
  for slot, w in (('gate_up', gu), ('down', down), ('shared_gate_up', sh)):
    np.testing.assert_array_equal(moe_op.unpack(ws[f'{slot}_q'], ws[f'{slot}_s']), w)
    assert not np.array_equal(ws[f'{slot}_s'], grid.quantize(w)[1])
  np.testing.assert_array_equal(ws['router_w'], moe.router.weight.detach().numpy())
  # The report counts the op's packed bytes as INT4 (the rest of this model is fp32).
  rep = litert.report(delegate_dir)
  packed = sum(v.nbytes for k, v in ws.items() if k.endswith('_q'))
  assert rep['int4_fraction'] == pytest.approx(packed / sum(rep['weight_bytes'].values()))


def test_delegate_runs_the_op(small, delegate_dir):
  export_delegate, dlg = load_delegate('fp32')
  got = run(delegate_dir, delegate=dlg)
  st = export_delegate.stats(dlg)
  # Every custom node of every signature: the MoE layer's 3, the attention's 2 per signature.
  assert st['claimed'] == 9 and st['refused'] == 0 and st['invokes'] > 0, st
  small.set_moe_lowering('delegate')
  try:
    ref = torch_logits(small)           # the op's dequantized reference inside PyTorch
  finally:
    small.set_moe_lowering('portable')
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_runner_greedy_generation_matches_torch(small, fp32_path):
  lm = LiteRTLM(fp32_path)
  prompt = list(TOK[:5])
  got = lm.generate(prompt, 20)
  seq = list(prompt)
  with torch.no_grad():
    for _ in range(20):
      seq.append(int(small(torch.tensor([seq]))[0, -1].argmax()))
  assert got == seq[5:]
  # Sampling is seeded: the same seed gives the same tokens.
  a, b = lm.generate(prompt, 12, temperature=1.0, seed=1), lm.generate(prompt, 12, temperature=1.0, seed=1)
  assert a == b and len(a) == 12


@pytest.fixture(scope='module')
def last_fp32_path(small, tmp_path_factory):
  """The same model with prefill_logits='last': prefill returns the last real token's row."""
  path = str(tmp_path_factory.mktemp('litert_last') / 'fp32_last.tflite')
  small.set_moe_lowering('portable')
  litert.convert_fp32(small, path, prefill_lens=(8, 32), kv_len=KV_LEN, log=lambda _: None,
                      prefill_logits='last')
  return path


@pytest.mark.parametrize('quant', ['fp32', 'int4_g32'])
def test_prefill_logits_last(small, fp32_path, last_fp32_path, tmp_path, quant):
  """A 'last' file's prefill gives the 'all' file's last row (padded chunks included: the
  row of the last real token), continues the same KV cache, and generates the same tokens."""
  paths = {}
  for kind, src in (('all', fp32_path), ('last', last_fp32_path)):
    paths[kind] = src
    if quant != 'fp32':
      paths[kind] = str(tmp_path / f'{kind}.tflite')
      litert.quantize(src, paths[kind], quant, 'auto', small.cfg, log=lambda _: None)
      litert.write_grid(paths[kind], small, quant, 'auto', log=lambda _: None)
  assert litert.report(paths['all'])['prefill_logits'] == 'all'
  assert litert.report(paths['last'])['prefill_logits'] == 'last'
  full, last = LiteRTLM(paths['all']), LiteRTLM(paths['last'])
  assert (full.prefill_logits, last.prefill_logits) == ('all', 'last')
  out = last.runners['prefill_32'].get_output_details()['logits']['shape']
  assert list(out) == [1, 1, small.cfg['vocab_size']]
  # 5 and 70 end in a padded prefill_8 chunk, 32 fills one chunk, 1 token is padded too.
  for n in (5, 32, 70, 1):
    full.reset(), last.reset()
    want = full.prefill(TOK[:n])[-1]
    got = last.prefill_last(TOK[:n])
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    full.reset()
    assert np.array_equal(full.prefill_last(TOK[:n]), want)    # prefill_last on an 'all' file
    # Same cache: the next decode step agrees too.
    np.testing.assert_allclose(last.decode(TOK[n]), full.decode(TOK[n]),
                               atol=1e-5 * np.abs(want).max(), rtol=0)
  assert full.generate(list(TOK[:37]), 16) == last.generate(list(TOK[:37]), 16)
  with pytest.raises(ValueError, match='prefill-logits last'):
    last.prefill(TOK[:5])


def test_prefill_logits_last_verify_and_eval(small, last_fp32_path):
  """The CLI's verification runs on a 'last' file; the lm_eval backend refuses one (scoring
  needs every position) with an error naming the option."""
  from export.__main__ import verify
  r = verify(small, last_fp32_path, 'fp32', 'fp32', n_greedy=8)
  assert r['max_abs_logit_err'] < 1e-4 * r['logit_scale'] and r['argmax_agree'] == 1.0
  with pytest.raises(ValueError, match='unknown prefill_logits'):
    litert.convert_fp32(small, 'x.tflite', prefill_logits='first')
  pytest.importorskip('lm_eval')
  from export.tflite_lm import TFLiteLM
  with pytest.raises(ValueError, match='--prefill-logits all'):
    TFLiteLM(tokenizer=object(), runner=LiteRTLM(last_fp32_path))


def test_int4_channel_delegate_export_holds_channelwise_experts(small, fp32_path, tmp_path):
  """--quant int4_channel --moe delegate: the MobileMoeBlock op's experts are on the file's
  grid too (group_size 0, one scale per row), and with int8 activations the delegate
  computes what the portable int4_channel file computes with XNNPACK's FCs. Both files run
  attention as the MobileKvAttention op (--attention delegate: the quantizer passes it
  through), so the MoE lowering is their only difference: int8 activations turn fp32
  summation-order differences near a rounding boundary into a whole int8 step."""
  paths = {moe: str(tmp_path / f'{moe}.tflite') for moe in ('delegate', 'portable')}
  for moe, path in paths.items():
    litert.export(small, path, quant='int4_channel', embedding='int8', moe=moe,
                  attention='delegate', prefill_lens=(8, 32), kv_len=KV_LEN, log=lambda _: None)
  (opts, ws), = moe_op.read_ops(paths['delegate'])
  assert opts['group_size'] == 0
  moe = small.blocks[1].ffn
  e, f, d = small.cfg['moe']['n_experts'], small.cfg['moe']['d_expert'], small.cfg['d_model']
  assert ws['gate_up_s'].shape == (e, 2 * f, 1) and ws['down_s'].shape == (e, d, 1)
  down = np.stack([l.weight.detach().numpy() for l in moe.down])
  q, s = grid.quantize(down, grid.Scheme(4, 0))
  np.testing.assert_array_equal(moe_op.unpack(ws['down_q'], ws['down_s']), q * s)
  export_delegate, dlg = load_delegate('int8')
  got = run(paths['delegate'], delegate=dlg)
  assert export_delegate.stats(dlg)['claimed'] >= 1 and export_delegate.stats(dlg)['refused'] == 0
  want = run(paths['portable'], delegate=export_delegate.load(activations='int8'))
  assert 'MobileMoeBlock' not in flatbuf.op_names(flatbuf.load(paths['portable'])[0])
  print('max |dlogit|', np.abs(got - want).max(), np.abs(want).max())
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
  # Decode on its own interpreter with every INT4 FC on the delegate's pool too
  # (fully_connected): the same int8 grid as XNNPACK's FCs, so the same logits; every FC
  # of the decode signature is claimed, and the prefill interpreter's cache rows carry over.
  dec = export_delegate.load(activations='int8', fully_connected=True)
  split = run(paths['delegate'], delegate=export_delegate.load(activations='int8'),
              decode_delegate=dec)
  s = export_delegate.stats(dec)
  fcs = flatbuf.signature_op_counts(flatbuf.load(paths['delegate'])[0])['decode']['FULLY_CONNECTED']
  assert s['refused'] == 0 and s['claimed'] >= fcs, (s, fcs)
  np.testing.assert_allclose(split, got, atol=1e-4, rtol=0)


def test_tiled_experts_export_runs_like_the_portable_file(tmp_path):
  """Experts whose shapes tile (d_model, d_expert, d_shared multiples of 128): the exporter
  stores the op's INT4 matrices in 16-row tiles (weight_tiles 16, export/moe_op.py), read_ops
  gives back the row layout (the weights' own integers), and the delegate running that file
  computes what the portable int4_channel file computes with XNNPACK's FCs, prefill and
  decode, with and without its fully_connected option."""
  cfg, m = make('moe', d_expert=128, d_shared=128, n_layers=2)   # one dense, one MoE layer
  model = tm.from_flax(m, cfg)
  paths = {moe: str(tmp_path / f'{moe}.tflite') for moe in ('delegate', 'portable')}
  try:
    for moe, path in paths.items():
      litert.export(model, path, quant='int4_channel', embedding='int8', moe=moe,
                    prefill_lens=(8, 32), kv_len=KV_LEN, log=lambda _: None)
  finally:
    model.set_moe_lowering('portable')
  ops = moe_op.read_ops(paths['delegate'])
  assert len(ops) == cfg.n_layers - cfg.moe.first_dense
  for (opts, ws), b in zip(ops, [b for b in model.blocks if isinstance(b.ffn, tm.MoE)]):
    assert opts['weight_tiles'] == 16 and opts['group_size'] == 0
    down = np.stack([l.weight.detach().numpy() for l in b.ffn.down])
    q, s = grid.quantize(down, grid.Scheme(4, 0))
    np.testing.assert_array_equal(moe_op.unpack(ws['down_q'], ws['down_s']), q * s)
  # The file itself holds the tiles: its raw down_q bytes are read_ops' rows, tiled.
  from export.delegate import tflite_builder as tb
  raw = flatbuf.load(paths['delegate'])
  sg = raw[0].subgraphs[0]
  code = next(i for i, oc in enumerate(raw[0].operatorCodes) if oc.customCode == b'MobileMoeBlock')
  op = next(o for o in sg.operators if o.opcodeIndex == code)
  down_raw = flatbuf.tensor_value(raw[0], raw[1], sg.tensors[list(op.inputs)[5]]).view(np.uint8)
  np.testing.assert_array_equal(down_raw, tb.tile_rows(ops[0][1]['down_q']))
  export_delegate, dlg = load_delegate('int8')
  got = run(paths['delegate'], delegate=dlg)
  st = export_delegate.stats(dlg)
  assert st['claimed'] >= 1 and st['refused'] == 0, st
  want = run(paths['portable'], delegate=export_delegate.load(activations='int8'))
  assert 'MobileMoeBlock' not in flatbuf.op_names(flatbuf.load(paths['portable'])[0])
  print('max |dlogit|', np.abs(got - want).max(), np.abs(want).max())
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
  split = run(paths['delegate'], delegate=export_delegate.load(activations='int8'),
              decode_delegate=export_delegate.load(activations='int8', fully_connected=True))
  np.testing.assert_allclose(split, got, atol=1e-4, rtol=0)


@pytest.fixture(scope='module')
def attention_path(small, tmp_path_factory):
  """attention='delegate': every signature's attention as MobileKvAttention ops."""
  path = str(tmp_path_factory.mktemp('attention') / 'attention_delegate.tflite')
  try:
    litert.export(small, path, quant='fp32', embedding='fp32', attention='delegate',
                  prefill_lens=(32,), kv_len=KV_LEN, log=lambda _: None)
  finally:
    small.set_attention_lowering('portable')
  return path


def test_attention_delegate_op_in_every_signature(small, attention_path, fp32_path):
  from flatbuffers import flexbuffers
  from export import attention_op
  from export.runner import delegate_ops, needs_delegate
  model, _ = flatbuf.load(attention_path)
  counts = flatbuf.signature_op_counts(model)
  n = small.cfg['n_layers']
  # Every signature's attention is the op: no BATCH_MATMUL is left (the portable file's
  # are all attention's).
  portable = flatbuf.signature_op_counts(flatbuf.load(fp32_path)[0])
  for sig in ('decode', 'prefill_32'):
    assert counts[sig].get('MobileKvAttention') == n
    assert portable[sig].get('BATCH_MATMUL', 0) > 0 and 'BATCH_MATMUL' not in counts[sig]
  # Options per layer (in each of the two signatures): layer 0 windowed (64), layer 1 global.
  code = next(i for i, oc in enumerate(model.operatorCodes) if oc.customCode == b'MobileKvAttention')
  opts = [flexbuffers.Loads(bytes(bytearray(op.customOptions)))
          for sg in model.subgraphs for op in sg.operators if op.opcodeIndex == code]
  c = small.cfg
  assert opts == 2 * [attention_op.options(c['n_heads'], c['n_kv_heads'], c['head_dim'],
                                           tm.layer_window(c, i)) for i in range(n)]
  assert [tm.layer_window(c, i) for i in range(n)] == [64, 0]
  assert delegate_ops(attention_path) == ['MobileKvAttention'] and needs_delegate(attention_path)
  assert not needs_delegate(fp32_path)
  with pytest.raises(ValueError, match='MobileKvAttention custom ops, which only export/delegate'):
    LiteRTLM(attention_path)


def test_attention_delegate_runs_the_op(small, attention_path, fp32_path):
  """The delegate claims every MobileKvAttention node and gives the portable file's logits:
  prefill in chunks of 32 (the later ones over the cache, across the 64-token window) +
  decode, and decode from position 0 over the window."""
  export_delegate, dlg = load_delegate('fp32')
  lm = LiteRTLM(attention_path, delegate=dlg)
  st = export_delegate.stats(dlg)
  # the layers' ops in both signatures
  assert st['claimed'] == 2 * small.cfg['n_layers'] and st['refused'] == 0, st
  got = np.concatenate([lm.prefill(TOK[:70])] + [lm.decode(t)[None] for t in TOK[70:]])
  want = run(fp32_path)
  print('max |dlogit|', np.abs(got - want).max(), np.abs(want).max())
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  lm.reset()
  got = np.stack([lm.decode(t) for t in TOK])              # every position through the op
  np.testing.assert_allclose(got, torch_logits(small), atol=1e-4, rtol=0)
  assert export_delegate.stats(dlg)['invokes'] > 0


@pytest.fixture(scope='module')
def int8_kv_path(small, tmp_path_factory):
  """The fp32 file with an int8 KV cache (set_kv_cache_dtype: int8 tensors + f32 scales)."""
  path = str(tmp_path_factory.mktemp('int8kv') / 'int8kv.tflite')
  small.set_moe_lowering('portable')
  small.set_kv_cache_dtype('int8')
  try:
    litert.convert_fp32(small, path, prefill_lens=(8, 32), kv_len=KV_LEN, log=lambda _: None)
  finally:
    small.set_kv_cache_dtype('f32')
  return path


def test_int8_kv_cache_equals_jax_int8_cache_decoding(qat_model, int8_kv_path):
  """--kv-cache int8: the runner's cache tensors are int8 with f32 scales [1, K, S], and
  prefill (chunks of 32 and a padded 8) + decode give JAX's logits when JAX decodes with
  its own int8 cache (init_cache), whose integers and scales the file's cache then holds."""
  import jax.numpy as jnp
  from mobilemoe_jax.model.transformer import init_cache
  cfg, m = qat_model
  cache = init_cache(cfg, 1, KV_LEN)
  logits, _, cache = m(jnp.asarray(TOK[None, :70]), cache=cache)
  want = [np.asarray(logits[0])]
  for t in TOK[70:]:
    logits, _, cache = m(jnp.asarray([[t]]), cache=cache)
    want.append(np.asarray(logits[0]))
  lm = LiteRTLM(int8_kv_path)
  got = [lm.prefill(TOK[:70])] + [lm.decode(t)[None] for t in TOK[70:]]
  np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-4, rtol=0)
  k, dh, n = cfg.n_kv_heads, cfg.head_dim, len(TOK)
  for i, layer in enumerate(cache['layers']):
    assert lm.kv[f'kv_cache_k_{i}'].dtype == np.int8 and lm.kv[f'kv_cache_v_{i}'].dtype == np.int8
    assert lm.kv[f'kv_cache_k_scale_{i}'].shape == (1, k, KV_LEN)
    ours = {'k': lm.kv[f'kv_cache_k_{i}'][0, :, :n].transpose(1, 0, 2),       # [S, K, Dh]
            'v': lm.kv[f'kv_cache_v_{i}'][0, :, :, :n].transpose(2, 0, 1),
            'k_scale': lm.kv[f'kv_cache_k_scale_{i}'][0, :, :n].T[..., None],
            'v_scale': lm.kv[f'kv_cache_v_scale_{i}'][0, :, :n].T[..., None]}
    for name, x in ours.items():
      ref = np.asarray(layer[name][0, :n])
      if name.endswith('scale'):
        np.testing.assert_allclose(x, ref, rtol=1e-5, atol=0)
      else:   # a value within an ulp of a rounding boundary may land on the next integer
        diff = np.abs(x.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (name, i, (diff > 0).mean())
    assert lm.kv[f'kv_cache_v_{i}'].shape == (1, k, dh, KV_LEN)


def test_litertlm_refuses_our_custom_ops_and_the_runner_convention(delegate_dir, fp32_path,
                                                                    data_dir, tmp_path):
  """LiteRT-LM cannot run MobileMoeBlock / MobileKvAttention (it takes no delegate or custom
  op kernel) nor export.runner's signatures: bundle() refuses both with the reason, and a
  bundle written around our check is refused before the runtime sees it."""
  from export import litertlm
  spm = f'{data_dir}/tokenizer/spm.model'
  with pytest.raises(litertlm.NotRunnable, match='MobileKvAttention, MobileMoeBlock|MobileMoeBlock, MobileKvAttention'):
    litertlm.bundle(delegate_dir, str(tmp_path), spm, KV_LEN)
  with pytest.raises(litertlm.NotRunnable, match="export.runner's convention"):
    litertlm.bundle(fp32_path, str(tmp_path), spm, KV_LEN)
  from export import keep_jax_x64
  with keep_jax_x64():
    from litert_torch.generative.utilities import litertlm_builder
  litertlm_builder.build_litertlm(delegate_dir, str(tmp_path), str(tmp_path), KV_LEN,
                                  tokenizer_model_path=spm)
  raw = str(tmp_path / 'moe_delegate.litertlm')
  assert litertlm.delegate_ops(litertlm.tflite_of(raw))
  with pytest.raises(litertlm.NotRunnable, match='custom ops'):
    litertlm.Engine(raw)
