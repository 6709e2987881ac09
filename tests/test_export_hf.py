"""Hugging Face directories load natively and give our logits, carry a tokenizer AutoTokenizer
reads with our ids and the stop ids generate() needs; dense imports back."""
import filecmp
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax.numpy as jnp
from flax import nnx

from configs import tiny
from export import hf
from export import torch_model as tm
from mobilemoe_jax.model import Transformer
from mobilemoe_jax.data import tokenizer as tokenizer_lib
from tests.support.models import TOKENS, make

CHAT = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'What does os do?'}]


@pytest.fixture(scope='module')
def tok(spm_tokenizer):
  return spm_tokenizer   # the demo's kind: SentencePiece


def _hf_logits(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
  with torch.no_grad():
    return type(model).__name__, model(torch.from_numpy(TOKENS)).logits.numpy()


@pytest.mark.parametrize('kind,window,cls,moe', [
    ('dense', 64, 'Qwen2ForCausalLM', {}),      # tiny: windowed and global layers alternate
    ('dense', 0, 'LlamaForCausalLM', {}),
    ('moe', 64, 'Qwen2MoeForCausalLM', {}),
    ('moe', 0, 'Qwen2MoeForCausalLM', dict(n_shared=0, norm_topk_prob=False, first_dense=2)),
])
def test_hf_logits_equal_ours(tmp_path, tok, kind, window, cls, moe):
  cfg, m = make(kind, **moe)
  cfg.sliding_window = window
  pt = tm.from_flax(m, cfg)
  hf.save(pt, str(tmp_path), tok)
  name, got = _hf_logits(str(tmp_path))
  assert name == cls
  with torch.no_grad():
    want = pt(torch.from_numpy(TOKENS)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  if window:
    # The 90-token input passes the 64 window: dropping it must change the logits.
    cfg.sliding_window = 0
    with torch.no_grad():
      no_window = tm.from_flax(m, cfg)(torch.from_numpy(TOKENS)).numpy()
    assert np.abs(no_window - want).max() > 1e-3


def test_import_dense_roundtrip_to_jax(tmp_path, tok):
  cfg, m = make('dense')
  pt = tm.from_flax(m, cfg)
  hf.save(pt, str(tmp_path), tok)
  back = hf.import_dense(str(tmp_path))
  assert back.cfg == pt.cfg
  fresh = Transformer(cfg, rngs=nnx.Rngs(1))
  hf.to_flax_state(back, fresh)
  np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(TOKENS))[0]),
                             np.asarray(m(jnp.asarray(TOKENS))[0]), atol=1e-5, rtol=0)


def test_unmappable_moe_is_refused(tok):
  cfg, m = make('moe', score_func='sigmoid')
  with pytest.raises(hf.Unsupported, match='score_func'):
    hf.save(tm.from_flax(m, cfg), '/nonexistent/never-written', tok)


def test_auto_tokenizer_and_generate_work_on_our_dir(tmp_path, tok):
  cfg, m = make('dense')
  cfg.sliding_window = 0
  pt = tm.from_flax(m, cfg)
  out = str(tmp_path)
  hf.save(pt, out, tok)
  at = transformers.AutoTokenizer.from_pretrained(out)
  text = 'Return the  directory,\n\tindented — with ünïcode and ✓ symbols.'
  ids = at(text)['input_ids']
  assert ids == [tok.bos_id] + tok.encode(text)          # BOS first, as in training
  assert at.decode(ids, skip_special_tokens=True) == text == tok.decode(ids)
  assert (at.bos_token_id, at.eos_token_id, at.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
  assert at.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)['input_ids'] \
      == tok.chat_prompt(CHAT)
  stops = list(tok.stop_ids)   # <eos> and <|end|>
  for name in ('config.json', 'generation_config.json'):
    with open(os.path.join(out, name)) as f:
      written = json.load(f)
    assert (written['bos_token_id'], written['eos_token_id'], written['pad_token_id']) \
        == (tok.bos_id, stops, tok.pad_id), name

  # generate() stops at eos: swap the head rows of eos and the first greedy token, so the
  # model's first choice becomes eos (in an untied copy of the head: inputs do not change).
  model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  prompt = torch.tensor([[tok.bos_id] + tok.encode('Return the number of')])
  with torch.no_grad():
    free = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    free = free[0, prompt.shape[1]:]
    first = int(free[0])
    assert first not in stops and len(free) == 6
    head = model.lm_head.weight.detach().clone()
    head[[first, tok.eos_id]] = head[[tok.eos_id, first]].clone()
    model.lm_head.weight = torch.nn.Parameter(head)
    stopped = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:]
  assert stopped.tolist() == [tok.eos_id]                 # generation_config's eos ends it


def test_snapshot_tokenizer_files_are_copied_unchanged(tmp_path, llama3_tokenizer_dir):
  """A released-style Llama-3 tokenizer dir round-trips byte for byte and AutoTokenizer reads
  it as we do, chat template included."""
  out = str(tmp_path / 'out')
  ids = tokenizer_lib.write_tokenizer_files(llama3_tokenizer_dir, out)
  assert ids == {'bos_token_id': 128000, 'eos_token_id': [128001, 128008], 'pad_token_id': 0}
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    assert filecmp.cmp(os.path.join(llama3_tokenizer_dir, name), os.path.join(out, name),
                       shallow=False)
  ours = tokenizer_lib.load_tokenizer(out)
  at = transformers.AutoTokenizer.from_pretrained(out)
  text = 'Hello, MobileMoE! Name one JVM language.'
  assert at(text)['input_ids'] == [128000] + ours.encode(text)
  assert at.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)['input_ids'] \
      == ours.chat_prompt(CHAT)
