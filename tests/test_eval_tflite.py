"""The `.tflite` backend agrees with the JAX backend on the tiny model, within INT4 tolerance.

The tiny MoE model is exported here with the exporter (export/: litert-torch, INT4 block-32
weights, int8 embedding) and both backends score the same lm_eval requests.
"""
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from mobilemoe_jax.eval import run, tasks
from mobilemoe_jax.eval.jax_lm import JaxLM
from export.tflite_lm import TFLiteLM
from tests.support.eval import EVAL_DATA, tiny_model

pytest.importorskip('litert_torch')

pytestmark = pytest.mark.slow   # a .tflite export


@pytest.fixture(scope='module')
def setup(tmp_path_factory, spm_tokenizer):
  from configs import tiny
  from export import litert, torch_model
  tmp = tmp_path_factory.mktemp('tflite')
  tok = spm_tokenizer
  model = tiny_model('moe')
  path = str(tmp / 'tiny_int4.tflite')
  # One short prefill length and a short cache: the tests' prompts are short, export is faster.
  litert.export(torch_model.from_flax(model, tiny.get_config('moe').model), path,
                quant='int4_g32', prefill_lens=(32,), kv_len=128, log=lambda *a: None)
  return JaxLM(model, tok, batch_size=8, length_bucket=32), TFLiteLM(path, tok)


def test_loglikelihoods_agree_within_int4_tolerance(setup):
  jax_lm, tfl_lm = setup
  spec, include = tasks.local_task(EVAL_DATA / 'tiny_mc.yaml')
  a = run.evaluate(jax_lm, [spec], include=[include], log_samples=True)['samples']['tiny_mc']
  b = run.evaluate(tfl_lm, [spec], include=[include], log_samples=True)['samples']['tiny_mc']
  a = sorted(a, key=lambda s: s['doc_id'])
  b = sorted(b, key=lambda s: s['doc_id'])
  ll_a = np.array([r[0][0] for s in a for r in s['resps']])
  ll_b = np.array([r[0][0] for s in b for r in s['resps']])
  # INT4 weights move each token's log-prob by ~0.05 nats on this model (measured); the
  # bound leaves room without hiding a real mismatch (a wrong token or position costs nats).
  np.testing.assert_allclose(ll_b, ll_a, atol=0.5)
  assert np.mean(np.abs(ll_b - ll_a)) < 0.02 * np.mean(np.abs(ll_a))


def test_continuation_scores_per_token_agree(setup):
  jax_lm, tfl_lm = setup
  reqs = [Instance('loglikelihood', {}, (ctx, cont), i) for i, (ctx, cont) in enumerate([
      ('Question: What do bees make?\nAnswer:', ' honey'),
      ('The path may be absolute or relative to the current working', ' directory.'),
      ('', 'Return the number of items in a container.')])]
  a = np.array([r[0] for r in jax_lm.loglikelihood(reqs)])
  b = np.array([r[0] for r in tfl_lm.loglikelihood(reqs)])
  n_tok = np.array([len(tfl_lm.tok_encode(r.args[1], add_special_tokens=False)) for r in reqs])
  assert np.all(np.abs(a - b) / n_tok < 0.25), (a, b)


def test_greedy_generation_agrees(setup):
  jax_lm, tfl_lm = setup
  req = Instance('generate_until', {}, ('Return the number of items in a',
                                        {'until': ['\n\n'], 'max_gen_toks': 8}), 0)
  assert tfl_lm.generate_until([req]) == jax_lm.generate_until([req])
