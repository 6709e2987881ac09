"""An imported released-MobileMoE QAT snapshot scores through both lm_eval backends.

The user's path: a snapshot dir with its tokenizer.json -> `python -m mobilemoe_jax.convert
import` -> the JAX backend on the checkpoint, and `python -m export` -> the `.tflite` backend
(MoE blocks on our delegate) with the snapshot's tokenizer. Both score the same task; their
log-likelihoods agree within what INT4 on device changes (int8 activations in the file).
"""
import os

import numpy as np
import pytest

pytest.importorskip('litert_torch')

from tests.support.eval import EVAL_DATA
from tests.support.release_snapshot import write_snapshot

pytestmark = pytest.mark.slow   # a .tflite export

# The released S's structure at tiny dims; a cache long enough for the task's prompts.
DIMS = dict(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=8,
            top_k=4, d_expert=32, d_shared=64, rope_original=128, rope_factor=4.0)


def write_tokenizer(path: str, vocab: int):
  """A BPE tokenizer.json of `vocab` ids trained on the task's text, with the release's
  bos/eos names (so the loader finds them as it does in the real Llama-3 file)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[
      '<|begin_of_text|>', '<|end_of_text|>', '<unk>'])
  tok.train_from_iterator((EVAL_DATA / 'tiny_mc.jsonl').read_text().splitlines(), trainer)
  assert tok.get_vocab_size() <= vocab
  tok.save(path)


@pytest.fixture(scope='module')
def backends(tmp_path_factory):
  from export import __main__ as export_cli
  from export.tflite_lm import TFLiteLM
  from mobilemoe_jax.convert import __main__ as convert
  from mobilemoe_jax.eval.jax_lm import JaxLM
  root = tmp_path_factory.mktemp('release_eval')
  snap, imported, tflite = root / 'snap', root / 'imported', str(root / 'model.tflite')
  write_snapshot(str(snap), layout='qat', **DIMS)
  write_tokenizer(str(snap / 'tokenizer.json'), DIMS['vocab'])
  assert convert.main(['import', str(snap), str(imported)]) == 0
  ckpt = str(imported / 'checkpoints')
  assert export_cli.main(['--checkpoint', ckpt, '--out', tflite, '--moe', 'delegate',
                          '--prefill', '32', '--kv-len', '128', '--no-verify']) == 0
  tokenizer = str(imported / 'release' / 'tokenizer.json')   # the import keeps the snapshot's
  assert os.path.exists(tokenizer)
  return JaxLM(checkpoint=ckpt, batch_size=4, length_bucket=32), TFLiteLM(tflite, tokenizer)


def test_both_backends_score_the_import_alike(backends):
  from mobilemoe_jax.eval import run, tasks
  jax_lm, tfl_lm = backends
  assert jax_lm.tok.vocab_size == tfl_lm.tok.vocab_size <= DIMS['vocab']
  spec, include = tasks.local_task(EVAL_DATA / 'tiny_mc.yaml')
  out = [run.evaluate(lm, [spec], include=[include], log_samples=True)['samples']['tiny_mc']
         for lm in (jax_lm, tfl_lm)]
  a, b = ([r[0][0] for s in sorted(x, key=lambda s: s['doc_id']) for r in s['resps']] for x in out)
  a, b = np.array(a), np.array(b)
  assert len(a) == len(b) > 0 and np.isfinite(a).all() and np.isfinite(b).all()
  # A random-weight model: every continuation costs tens of nats (ln 128 ~ 4.9 per token), and
  # int8 activations move each token's log-prob by a few hundredths; a wrong token, position or
  # tokenizer would move sums by nats.
  print('jax', np.round(a, 3), '\ntflite', np.round(b, 3))
  np.testing.assert_allclose(b, a, atol=0.5)
  assert np.mean(np.abs(b - a)) < 0.02 * np.mean(np.abs(a))
