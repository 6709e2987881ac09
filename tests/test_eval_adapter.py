"""The JAX lm_eval adapter: log-likelihoods equal the model's own log-probs, accuracy is
computed right, generation stops at stop strings. Runs on 8 fake CPU devices (conftest), so
the data-parallel path is the one tested."""
import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from mobilemoe_jax.eval import run, tasks
from mobilemoe_jax.eval.run import run_local_eval
from mobilemoe_jax.eval.base import TokenLM, cut_at_stop
from mobilemoe_jax.eval.jax_lm import JaxLM
from mobilemoe_jax.model import generate
from tests.support.eval import EVAL_DATA, direct_loglikelihood, forward_logits, tiny_model


@pytest.fixture(scope='module')
def tok(spm_tokenizer):
  return spm_tokenizer


@pytest.fixture(scope='module')
def model():
  return tiny_model('moe')


@pytest.fixture(scope='module')
def ref():
  """The same weights (same seed), never sharded: the reference forward pass runs on one
  device instead of eight replicas."""
  return tiny_model('moe')


@pytest.fixture(scope='module')
def lm(model, tok):
  return JaxLM(model, tok, batch_size=8, length_bucket=32)


@pytest.fixture(scope='module')
def lm1(ref, tok):
  """One device and a 64-token context: the cheap adapter for the remaining checks."""
  return JaxLM(ref, tok, batch_size=2, length_bucket=32, max_length=64, shard=False)


def test_lm_is_sharded_over_all_devices(lm):
  assert jax.device_count() == 8 and lm.mesh is not None and lm.batch_size % 8 == 0


def test_local_task_loglikelihoods_equal_direct_logprobs_and_accuracy(lm, ref, tok):
  spec, include = tasks.local_task(EVAL_DATA / 'tiny_mc.yaml')
  results = run.evaluate(lm, [spec], include=[include], log_samples=True)
  samples = results['samples']['tiny_mc']
  assert len(samples) == 4
  correct = []
  for s in sorted(samples, key=lambda s: s['doc_id']):
    doc = s['doc']
    context = f"Question: {doc['question']}\nAnswer:"
    got = [resp[0][0] for resp in s['resps']]          # one (logprob, greedy) per choice
    want = [direct_loglikelihood(ref, tok, context, ' ' + c) for c in doc['choices']]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    correct.append(int(np.argmax(want)) == doc['answer'])
  assert results['results']['tiny_mc']['acc,none'] == pytest.approx(np.mean(correct))


class TableLM(TokenLM):
  """Log-likelihoods by hand, keyed by the continuation's text, to check lm_eval's metrics."""
  TABLE = {'Mercury': -1.0, 'Venus': -2.0, 'Mars': -3.0,        # right (raw and normalised)
           'milk': -1.0, 'honey': -2.0, 'silk': -3.0,           # wrong (both)
           '100': -5.0, '50': -4.0, '0': -1.0,                  # right (both)
           'cat': -2.0, 'blue whale': -3.0}                     # raw: cat (wrong); per char:
                                                                # -2/3 < -3/10, whale (right)

  def _loglikelihood_tokens(self, requests, **kwargs):
    return [(self.TABLE[cont.strip()], False) for (_, cont), _, _ in requests]

  def _score_pairs(self, pairs):
    raise AssertionError('unused')

  def _generate_ids(self, *args):
    raise AssertionError('unused')


def test_accuracy_on_hand_checked_cases(tok):
  spec, include = tasks.local_task(EVAL_DATA / 'tiny_mc.yaml')
  res = run.evaluate(TableLM(tok, 64), [spec], include=[include])['results']['tiny_mc']
  assert res['acc,none'] == 0.5          # planets and freezing right, bees and whale wrong
  assert res['acc_norm,none'] == 0.75    # the whale flips to right when divided by length


def test_rolling_loglikelihood_is_the_whole_document(lm1, ref, tok):
  text = 'The json module encodes Python objects as strings.'
  (got,) = lm1.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, (text,), 0)])
  # Empty context: the document is conditioned on <bos> alone.
  ids = [tok.bos_id] + tok.encode(text)
  logits = forward_logits(ref, np.asarray([ids], np.int32))
  logp = np.asarray(jax.nn.log_softmax(logits[0], -1), np.float64)
  assert got == pytest.approx(sum(logp[i - 1, ids[i]] for i in range(1, len(ids))), rel=1e-5)


def _gen(lm, prompt, until, max_gen_toks):
  req = Instance('generate_until', {}, (prompt, {'until': until, 'max_gen_toks': max_gen_toks}), 0)
  return lm.generate_until([req])[0]


def test_generate_until_is_greedy_and_stops_at_stop_strings(lm1, ref, tok):
  prompt = 'Return the number of items in a'
  free = _gen(lm1, prompt, [], 24)
  # Greedy decoding equals the foundation's KV-cache generate(), up to a stop id if one comes.
  ids = np.asarray(generate(ref, np.asarray([[tok.bos_id] + tok.encode(prompt)]), 24))[0]
  ref = [int(i) for i in ids]
  ref = ref[:min([ref.index(s) for s in tok.stop_ids if s in ref], default=len(ref))]
  assert free == tok.decode(ref)
  assert len(free) >= 6, f'need some text to cut: {free!r}'
  stop = free[3:5]
  assert _gen(lm1, prompt, [stop], 24) == free[:free.find(stop)]
  # Several stops: the earliest wins, and a stop never seen leaves the text whole.
  assert _gen(lm1, prompt, ['never-generated', stop], 24) == free[:free.find(stop)]
  assert _gen(lm1, prompt, ['never-generated'], 24) == free


def test_cut_at_stop():
  assert cut_at_stop('a1b2c', ['2', 'b']) == 'a1'
  assert cut_at_stop('abc', []) == 'abc'
  assert cut_at_stop('abc', ['']) == 'abc'


def test_long_context_is_left_truncated(lm1, ref, tok):
  ctx = [tok.bos_id] + [5] * (lm1.max_length + 40)
  got_ctx, cont = lm1._fit(ctx, [7, 8])
  assert len(got_ctx) + len(cont) == lm1.max_length + 1 and got_ctx[-1] == 5
  (score,) = lm1._score_pairs([(got_ctx, cont)])
  row = np.asarray([got_ctx + cont[:-1]], np.int32)
  logp = np.asarray(jax.nn.log_softmax(forward_logits(ref, row)[0], -1), np.float64)
  assert score[0] == pytest.approx(logp[-2, 7] + logp[-1, 8], rel=1e-5)


def test_run_local_eval_for_the_pipeline(model, tok, tmp_path):
  summary = run_local_eval(model, tok, out_dir=tmp_path)
  assert summary['task'] == 'pydoc_cloze' and summary['n'] == 24
  assert 0 <= summary['acc'] <= 1 and 0 <= summary['acc_norm'] <= 1
  assert '| pydoc_cloze | 0 | acc,none |' in (tmp_path / 'results.md').read_text()
