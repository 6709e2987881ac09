"""A released-MobileMoE QAT snapshot on device: import -> INT4 `.tflite` on our delegate.

A synthetic snapshot with the released S's structure at tiny dims (QK-norm, Llama-3 RoPE
scaling, sigmoid routing with the expert bias, a shared expert, tied embedding, every layer
an MoE; tests/support/release_snapshot.py writes it in exactly the released layout) is imported
(python -m mobilemoe_jax.convert import), exported with the MoE blocks and decode attention
as the delegate's ops, and run by export.runner.LiteRTLM with the delegate in its int8 mode.
Its greedy tokens are compared with the imported JAX model's on the QAT stage's grid (the
released integers, int8 dynamic activations: what XNNPACK and the delegate compute on), and
with PyTorch computing what the file holds (its experts re-gridded: export/README.md).
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
# Measured (8 prompts): 5 agree for 16 steps, 3 part at 15 / 4 / 0 steps where both sides'
# margins are <= 0.078 (near-ties); teacher-forced max |dlogit| 0.15-0.35 (logits ~3).
NEAR_TIE, MAX_LOGIT_ERR = 0.1, 0.5
# Against PyTorch on the file's own grid: 7 of 8 agree for 16 steps, 1 parts at step 15 at a
# near-tie (margins 0.02 / 0.01); max |dlogit| 0.03-0.39: a random-integer model's sigmoid
# routing has near-ties too, where an int8 rounding flips an expert.
FILE_GRID_LOGIT_ERR = 0.5


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
  """The import as an INT4 .tflite with the MoE blocks and decode attention on the delegate."""
  from export import checkpoint, litert
  root, ckpt = imported
  path = os.path.join(root, 'release_s.tflite')
  litert.export(checkpoint.load_any(ckpt), path, quant='int4_g32', embedding='int4_g32', moe='delegate',
                attention='delegate', prefill_lens=(32,), kv_len=KV_LEN, log=lambda *a: None)
  return path


def check_against(path, logits, max_parted: int, max_logit_err: float):
  """The file (delegate, int8 activations) greedily continues 8 random-token prompts for 16
  steps next to `logits` (ids -> logits [len(ids), V]): at most `max_parted` prompts part,
  each at a near-tie; teacher-forced over the reference's continuation, max |dlogit| below
  `max_logit_err`."""
  from export import delegate
  from export.runner import LiteRTLM, greedy_agreement
  dlg = delegate.load(activations='int8')
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
  err = []
  for p, r in zip(prompts, results):
    seq = p + r['reference']
    lm.reset()
    err.append(np.abs(lm.prefill(seq) - logits(seq)).max())
  print('max |dlogit| per prompt:', np.round(err, 4))
  assert max(err) < max_logit_err, err


def test_greedy_tokens_against_the_imported_jax_model(exported, imported):
  """Against the imported JAX model on the released grid: the linears and the embedding carry
  the released integers exactly; the experts are re-gridded (their groups run along the
  output axis, the file's along the input: export/README.md measures that error), so tokens
  may part, but only at near-ties."""
  from export import moe_op
  ops = [o for o, _ in moe_op.read_ops(exported)]
  assert len(ops) == S_LIKE['layers']          # every layer's MoE is a MobileMoeBlock
  assert {o['score_func'] for o in ops} == {'sigmoid'}
  check_against(exported, jax_next_logits(qat_forward_model(imported[1]), length=KV_LEN),
                max_parted=N_PROMPTS // 2, max_logit_err=MAX_LOGIT_ERR)


def test_greedy_tokens_against_pytorch_on_the_files_grid(exported, imported):
  """Against PyTorch computing what the file holds (experts re-gridded, FC inputs int8): the
  tokens the re-grid parts from the JAX model's above are the file's exact computation."""
  import torch
  from export import checkpoint, litert
  from export.__main__ import quantize_fc_inputs
  ref = quantize_fc_inputs(litert.fake_quant(checkpoint.load_any(imported[1]), 'int4_g32',
                                             'int4_g32'))

  def logits(ids):
    with torch.no_grad():
      return ref(torch.tensor([ids]).long())[0].numpy()
  check_against(exported, logits, max_parted=1, max_logit_err=FILE_GRID_LOGIT_ERR)
