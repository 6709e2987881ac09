"""A released-MobileMoE QAT snapshot on device: import -> INT4 `.tflite` on our delegate.

A synthetic snapshot with the released S's structure at tiny dims (QK-norm, Llama-3 RoPE
scaling, sigmoid routing with the expert bias, a shared expert, tied embedding, every layer
an MoE; tests/support/release_snapshot.py writes it in exactly the released layout) is imported
(python -m mobilemoe_jax.convert import), exported with the MoE blocks and decode attention
as the delegate's ops, and run by export.runner.LiteRTLM with the delegate in its int8 mode.
Its greedy tokens are compared with the imported JAX model's on the QAT stage's grid (the
released integers, int8 dynamic activations: what XNNPACK and the delegate compute on), and
with PyTorch computing what the file's kernels do (XNNPACK rounds the FCs' fp16 block scales
to bf16). The experts reach the file as the released integers (MobileMoeBlock's
expert_group_axis 'out'; export/README.md).
"""
import os

import numpy as np
import pytest

pytest.importorskip('litert_torch')

from bench.release_agreement import (N_STEPS, S_LIKE, compare, export_file, import_snapshot,
                                     jax_reference, open_file, prompts, torch_reference)

# Against JAX, measured (python bench/release_agreement.py -> bench/results/release_agreement.json):
# 6 of 8 prompts agree for 16 steps, 2 part at near-ties (both sides' margins <= 0.013
# logits); teacher-forced |dlogit| per position: median 0.02-0.041 over each prompt, single
# positions up to 0.31 (logits ~3; a random-integer model's sigmoid routing has near-ties,
# where a tiny difference flips an expert). All of it is XNNPACK rounding the released fp16
# block scales of the FCs it runs to bf16: PyTorch with those scales (fake_quant(xnnpack=True))
# equals the file to ~1e-6 (export/README.md).
NEAR_TIE, MAX_PARTED, MAX_LOGIT_ERR, MEDIAN_LOGIT_ERR = 0.02, 2, 0.4, 0.05
# Against PyTorch computing what XNNPACK and the delegate compute: measured ~1e-6 (fp32
# rounding); the max leaves room for one int8 activation rounding that another CPU's fp32
# summation order could flip.
EXACT_MAX_ERR, EXACT_MEDIAN_ERR = 1e-3, 1e-4


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp('release_s')
  return str(root), import_snapshot(str(root))


@pytest.fixture(scope='module')
def exported(imported):
  """The import as an INT4 .tflite with the MoE blocks and decode attention on the delegate."""
  root, ckpt = imported
  return export_file(ckpt, os.path.join(root, 'release_s.tflite'))


def check_against(path, logits, max_parted: int, max_logit_err: float, max_median: float):
  """The file (delegate, int8 activations) greedily continues 8 random-token prompts for 16
  steps next to `logits` (ids -> logits [len(ids), V]): at most `max_parted` prompts part,
  each at a near-tie; teacher-forced over the reference's continuation, |dlogit| per
  position below `max_logit_err`, its median over each prompt below `max_median`."""
  from export import delegate
  lm, dlg = open_file(path, 'xnnpack')
  rows = compare(lm, logits, prompts())['per_prompt']
  assert delegate.stats(dlg)['claimed'] > 0 and delegate.stats(dlg)['refused'] == 0
  report = [(r['agree'], r.get('ref_margin'), r.get('file_margin')) for r in rows]
  print('agreeing steps, margins where they part:', report)
  parted = [r for r in rows if r['agree'] < N_STEPS]
  assert all(max(r['ref_margin'], r['file_margin']) < NEAR_TIE for r in parted), report
  assert len(parted) <= max_parted, report
  err, median = [r['max_dlogit'] for r in rows], [r['median_dlogit'] for r in rows]
  print('max |dlogit| per prompt:', np.round(err, 4), 'median:', np.round(median, 4))
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


def test_greedy_tokens_against_the_imported_jax_model(exported, imported):
  """Against the imported JAX model on the released grid: the linears, the embedding and
  the experts carry the released integers exactly; tokens may part only at near-ties."""
  from export import moe_op
  ops = [o for o, _ in moe_op.read_ops(exported)]
  assert len(ops) == S_LIKE['layers']          # every layer's MoE is a MobileMoeBlock
  assert {o['score_func'] for o in ops} == {'sigmoid'}
  check_against(exported, jax_reference(imported[1]), max_parted=MAX_PARTED,
                max_logit_err=MAX_LOGIT_ERR, max_median=MEDIAN_LOGIT_ERR)


def test_greedy_tokens_against_pytorch_as_xnnpack_computes(exported, imported):
  """Against PyTorch computing what the file's kernels compute (the released integers, FC
  inputs int8, the FCs' block scales as XNNPACK rounds them): the same tokens, the same
  logits to fp32 rounding."""
  check_against(exported, torch_reference(imported[1]), max_parted=0, max_logit_err=EXACT_MAX_ERR,
                max_median=EXACT_MEDIAN_ERR)
