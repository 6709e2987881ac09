"""A released-MobileMoE QAT snapshot on device: import -> INT4 `.tflite` on our delegate.

A synthetic snapshot with the released S's structure at tiny dims (QK-norm, Llama-3 RoPE
scaling, sigmoid routing with the expert bias, a shared expert, tied embedding, every layer
an MoE; tests/support/release_snapshot.py writes it in exactly the released layout) is imported
(python -m mobilemoe_jax.convert import), exported with the MoE blocks and attention
as the delegate's ops, and run by export.runner.LiteRTLM with the delegate in its int8 mode.
Its greedy tokens are compared with the imported JAX model's on the QAT stage's grid (the
released integers, int8 dynamic activations: what XNNPACK and the delegate compute on):
with the delegate also running the block-wise FCs (fully_connected: their fp16 scales as
stored) the file equals JAX on all prompts; on XNNPACK, which rounds those scales to bf16,
a few prompts part at near-ties, and the file equals PyTorch computing with bf16-rounded
scales instead. The experts reach the file as the released integers (MobileMoeBlock's
expert_group_axis 'out'; export/README.md).
"""
import os

import numpy as np
import pytest

pytest.importorskip('litert_torch')

from tests.support.release_snapshot import write_snapshot
from tests.support.models import jax_next_logits

# The released S's structure at tiny dims: no NoPE layer (S has none), RoPE scaling that
# bites at head_dim 16 (wavelengths over 64 are scaled), 8 experts top-4 of 32 (one output
# group each), shared 64; max_position_embeddings (64) = the KV cache.
S_LIKE = dict(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=8,
              top_k=4, d_expert=32, d_shared=64, nope=(), rope_original=64, rope_factor=4.0)
N_PROMPTS, N_STEPS, KV_LEN = 8, 16, 64
# Against JAX with XNNPACK running the FCs, measured: 6 of 8 prompts agree for 16 steps, 2
# part at 15 / 0 steps at near-ties (both sides' margins <= 0.013 logits); teacher-forced
# |dlogit| per position:
# median 0.02-0.041 over each prompt, single positions up to 0.31 (logits ~3; a random-integer
# model's sigmoid routing has near-ties, where a tiny difference flips an expert). All of it
# is XNNPACK rounding the released fp16 block scales of the FCs it runs to bf16: PyTorch with
# those scales (fake_quant(xnnpack=True)) equals the file to 1e-6 (export/README.md).
NEAR_TIE, MAX_PARTED, MAX_LOGIT_ERR, MEDIAN_LOGIT_ERR = 0.02, 2, 0.4, 0.05
# Against a reference computing what the kernels compute (JAX with the FCs on the delegate,
# PyTorch with bf16 scales on XNNPACK): measured 1e-6 (fp32 rounding), teacher-forced through
# prefill.
EXACT_MAX_ERR, EXACT_MEDIAN_ERR = 1e-3, 1e-4
# Room for one FC input that fp32 rounds one int8 step the other way, at the odd position
# (test_decode_outliers_are_int8_roundings_below_fp32_resolution).
ONE_INT8_STEP_ERR = 0.05


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  from mobilemoe_jax.convert import __main__ as convert
  root = tmp_path_factory.mktemp('release_s')
  write_snapshot(str(root / 'snap'), layout='qat', **S_LIKE)
  assert convert.main(['import', str(root / 'snap'), str(root / 'imported')]) == 0
  return str(root), str(root / 'imported' / 'checkpoints')


def qat_forward_model(ckpt):
  """The imported model on the QAT stage's grid: its integers, int8 dynamic activations."""
  from flax import nnx
  from mobilemoe_jax.model import Transformer
  from mobilemoe_jax.train.loading import load_checkpoint
  model = load_checkpoint(ckpt, need_tokenizer=False).model
  cfg = model.cfg.copy_and_resolve_references()
  cfg.dtype = 'float32'
  cfg.quant.activations = 'int8_dynamic'
  graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]
  return nnx.merge(graphdef, nnx.state(model))


@pytest.fixture(scope='module')
def exported(imported):
  """The import as an INT4 .tflite with the MoE blocks and attention on the delegate."""
  from export import checkpoint, litert
  root, ckpt = imported
  path = os.path.join(root, 'release_s.tflite')
  litert.export(checkpoint.load_any(ckpt), path, quant='int4_g32', embedding='int4_g32', moe='delegate',
                attention='delegate', prefill_lens=(32,), kv_len=KV_LEN, log=lambda *a: None)
  return path


def check_against(path, logits, max_parted: int, max_logit_err: float, max_median: float,
                  fully_connected: bool = False):
  """The file (delegate, int8 activations) greedily continues 8 random-token prompts for 16
  steps next to `logits` (ids -> logits [len(ids), V]): at most `max_parted` prompts part,
  each at a near-tie; teacher-forced over the reference's continuation, |dlogit| per
  position below `max_logit_err`, its median over each prompt below `max_median`.
  fully_connected: the delegate also runs the INT4 FCs (else XNNPACK does)."""
  from export import delegate
  from export.runner import LiteRTLM, greedy_agreement
  dlg = delegate.load(activations='int8', fully_connected=fully_connected)
  lm = LiteRTLM(path, delegate=dlg)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(0, S_LIKE['vocab'], 8)) for _ in range(N_PROMPTS)]
  results = [greedy_agreement(lm, lambda ids: logits(ids)[-1], p, N_STEPS) for p in prompts]
  assert delegate.stats(dlg)['claimed'] > 0 and delegate.stats(dlg)['refused'] == 0
  report = [(r['agree'], r.get('ref_margin'), r.get('tflite_margin')) for r in results]
  print('agreeing steps, margins where they part:', report)
  parted = [r for r in results if r['agree'] < N_STEPS]
  assert all(max(r['ref_margin'], r['tflite_margin']) < NEAR_TIE for r in parted), report
  assert len(parted) <= max_parted, report
  err, median = [], []
  for p, r in zip(prompts, results):
    seq = p + r['reference']
    lm.reset()
    d = np.abs(lm.prefill(seq) - logits(seq)).max(-1)     # per position
    err.append(d.max())
    median.append(np.median(d))
  print('max |dlogit| per prompt:', [f'{e:.2g}' for e in err],
        'median:', [f'{m:.2g}' for m in median])
  assert max(err) < max_logit_err, err
  assert max(median) < max_median, median


def test_experts_are_the_released_integers(exported, imported):
  """The file's MobileMoeBlocks hold the snapshot's expert bytes and scales unchanged: the
  [E, in, out] nibbles, gate | up concatenated along out, scales per 32 outputs."""
  import json
  from safetensors.numpy import load_file
  from export import moe_op
  snap = os.path.join(imported[0], 'snap')
  tensors = load_file(os.path.join(snap, 'model.safetensors'))
  with open(os.path.join(snap, 'config.json')) as f:
    assert json.load(f)['quantization']['expert_group_axis'].startswith('out')
  ops = moe_op.read_ops(exported)
  assert len(ops) == S_LIKE['layers']
  for layer, (o, w) in enumerate(ops):
    assert o['expert_group_axis'] == 'out' and o['group_size'] == 32
    p = f'model.layers.{layer}.feed_forward.experts.'
    for kind in ('gate_up', 'down'):
      np.testing.assert_array_equal(w[f'{kind}_q'], tensors[p + f'{kind}_qweight'], err_msg=p + kind)
      np.testing.assert_array_equal(w[f'{kind}_s'], tensors[p + f'{kind}_scale'].astype(np.float32),
                                    err_msg=p + kind)


def test_expert_integers_survive_the_torch_checkpoint_files(imported, tmp_path):
  """torch_model.save / load keep a MoE's ExpertGrid (the exporter can start from either)."""
  from export import checkpoint, torch_model
  model = checkpoint.load_any(imported[1])
  want = torch_model.expert_grids(model)
  assert len(want) == S_LIKE['layers']
  torch_model.save(model, str(tmp_path))
  got = torch_model.expert_grids(torch_model.load(str(tmp_path)))
  assert got.keys() == want.keys()
  for name in want:
    for a, b in zip(got[name], want[name]):
      np.testing.assert_array_equal(a, b)


def test_greedy_tokens_against_the_imported_jax_model_on_xnnpack(exported, imported):
  """Against the imported JAX model on the released grid, XNNPACK running the FCs: the
  linears, the embedding and the experts carry the released integers exactly, but XNNPACK
  computes with the FCs' block scales rounded to bf16; tokens may part only at near-ties."""
  from export import moe_op
  ops = [o for o, _ in moe_op.read_ops(exported)]
  assert len(ops) == S_LIKE['layers']          # every layer's MoE is a MobileMoeBlock
  assert {o['score_func'] for o in ops} == {'sigmoid'}
  check_against(exported, jax_next_logits(qat_forward_model(imported[1]), length=KV_LEN),
                max_parted=MAX_PARTED, max_logit_err=MAX_LOGIT_ERR, max_median=MEDIAN_LOGIT_ERR)


def test_greedy_tokens_against_pytorch_as_xnnpack_computes(exported, imported):
  """Against PyTorch computing what the file's kernels compute (the released integers, FC
  inputs int8, the FCs' block scales as XNNPACK rounds them): the same tokens, the same
  logits to fp32 rounding."""
  import torch
  from export import checkpoint, litert
  from export.__main__ import quantize_fc_inputs
  ref = quantize_fc_inputs(litert.fake_quant(checkpoint.load_any(imported[1]), 'int4_g32',
                                             'int4_g32', moe='delegate', xnnpack=True))

  def logits(ids):
    with torch.no_grad():
      return ref(torch.tensor([ids]).long())[0].numpy()
  check_against(exported, logits, max_parted=0, max_logit_err=EXACT_MAX_ERR,
                max_median=EXACT_MEDIAN_ERR)


def test_greedy_tokens_equal_jax_with_the_fcs_on_the_delegate(exported, imported):
  """With the delegate running the block-wise FCs too (fully_connected: the attention
  projections and the tied lm_head, their fp16 scales as stored), every kernel computes on
  the released grid exactly: the file and the imported JAX model agree."""
  check_against(exported, jax_next_logits(qat_forward_model(imported[1]), length=KV_LEN),
                max_parted=0, max_logit_err=EXACT_MAX_ERR, max_median=EXACT_MEDIAN_ERR,
                fully_connected=True)



def test_export_verify_runs_the_fcs_on_the_delegate(exported, imported):
  """`python -m export`'s verification of a file with the delegate's ops runs its INT4 FCs on
  the delegate and compares with the stored block scales: every prompt's greedy tokens agree.
  Its logit error is teacher-forced through decode, where one FC input may round one int8
  step the other way (next test)."""
  from export import checkpoint
  from export.__main__ import verify
  rep = verify(checkpoint.load_any(imported[1]), exported, 'int4_g32', 'int4_g32', moe='delegate')
  print({k: rep[k] for k in ('reference', 'greedy_tokens_agreeing', 'max_abs_logit_err',
                             'argmax_agree', 'delegate')})
  assert rep['delegate']['claimed'] > 0 and rep['delegate']['refused'] == 0, rep
  assert 'FCs on the delegate' in rep['reference']
  assert not rep['divergences'] and rep['argmax_agree'] == 1.0, rep
  assert rep['max_abs_logit_err'] < ONE_INT8_STEP_ERR, rep


def int8_f64_hooks(torch_model, distances):
  """Puts each integer-weight Linear's input on the int8 grid of grid.quantize_act_int8_asym,
  computed in float64, and appends (module name, per position: the smallest distance of an
  element's x * inv to a rounding boundary, in int8 steps) to `distances`."""
  import torch

  def hook(name):
    def put_on_grid(_, args):
      x = args[0].detach().numpy().astype(np.float64)
      rmin, rmax = np.minimum(x.min(-1, keepdims=True), 0), np.maximum(x.max(-1, keepdims=True), 0)
      inv = 255 / np.where(rmax > rmin, rmax - rmin, 1)
      zp = np.where((-128 + rmin * inv) + (127 + rmax * inv) > 0, -128 - rmin * inv, 127 - rmax * inv)
      zp = np.round(np.clip(zp, -128, 127))
      v = x * inv
      distances.append((name, np.abs(v - np.floor(v) - 0.5).min(-1).reshape(-1)))
      return (torch.from_numpy((np.clip(np.round(v) + zp, -128, 127) - zp) / inv),)
    return put_on_grid
  for name, mod in torch_model.named_modules():
    if isinstance(mod, torch.nn.Linear) and not name.endswith('router'):
      mod.register_forward_pre_hook(hook(name))
  return torch_model


def test_decode_outliers_are_int8_roundings_below_fp32_resolution(exported, imported):
  """Teacher-forced through decode with the FCs on the delegate (as the verification above):
  a position further than EXACT_MAX_ERR from JAX must be one where a float64 forward on the
  same grid agrees with JAX, and an FC input of that position lies closer to an int8 rounding
  boundary than fp32 resolves (|x * inv| <= 255: an fp32 ulp is up to 1.5e-5 steps).
  Decode's attention (MobileKvAttention) sums in another order than prefill's matmuls, and
  there the other rounding is as right as JAX's."""
  import torch
  from export import checkpoint, delegate, litert
  from export.runner import LiteRTLM
  jax_logits = jax_next_logits(qat_forward_model(imported[1]), length=KV_LEN)
  lm = LiteRTLM(exported, delegate=delegate.load(activations='int8', fully_connected=True))
  rng = np.random.default_rng(0)
  outliers = []
  for i in range(N_PROMPTS):
    p = list(rng.integers(0, S_LIKE['vocab'], 8))
    seq = p + lm.generate(list(p), N_STEPS)[:-1]
    lm.reset()
    got = np.concatenate([lm.prefill(p)] + [lm.decode(t)[None] for t in seq[len(p):]])
    want = jax_logits(seq)
    err = np.abs(got - want).max(-1)
    assert err.max() < ONE_INT8_STEP_ERR, (i, err)
    for pos in np.flatnonzero(err > EXACT_MAX_ERR):
      distances = []
      f64 = int8_f64_hooks(litert.fake_quant(checkpoint.load_any(imported[1]), 'int4_g32',
                                             'int4_g32', moe='delegate').double(), distances)
      with torch.no_grad():
        ref = f64(torch.tensor([seq]).long())[0].numpy()
      name, tie = min(((n, float(d[pos])) for n, d in distances), key=lambda t: t[1])
      outliers.append((i, int(pos), float(err[pos]), float(np.abs(ref[pos] - want[pos]).max()),
                       name, tie))
  print('outliers (prompt, position, |dlogit| vs JAX, float64 vs JAX, FC input nearest a '
        'rounding boundary, its distance in int8 steps):', outliers)
  for _, _, _, f64_vs_jax, _, tie in outliers:
    assert f64_vs_jax < 1e-5 and tie < 1e-4, outliers
