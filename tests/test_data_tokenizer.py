"""The released MobileMoE's tokenizer protocol on a synthetic Llama-3-style vocabulary (special
tokens at their real ids), and SentencePiece -> tokenizer.json conversion."""
import json
import os
import random
import shutil

import numpy as np
import pytest

from mobilemoe_jax.data import tokenizer as tokenizer_lib

BOS, END_OF_TEXT, HEADER_START, HEADER_END, EOT = 128000, 128001, 128005, 128006, 128008
CONVERSATIONS = [
    [{'role': 'user', 'content': 'Name one JVM language.'}],
    [{'role': 'system', 'content': 'Be brief.'},
     {'role': 'user', 'content': 'Name one JVM language.'},
     {'role': 'assistant', 'content': 'Kotlin.'},
     {'role': 'user', 'content': '  And another, with ünïcode ✓?\n'}],
    # The header's "\n\n" and this content's "\n" are one token of the synthetic vocabulary.
    [{'role': 'user', 'content': ''}, {'role': 'assistant', 'content': '\nScala\n'}],
]


@pytest.fixture(scope='module')
def tok(llama3_tokenizer_dir):
  return tokenizer_lib.load_tokenizer(llama3_tokenizer_dir)


def _config(directory):
  with open(os.path.join(directory, 'tokenizer_config.json')) as f:
    return json.load(f)


def test_special_ids_bos_and_stop_tokens(tok):
  assert tok.template.name == 'mobilemoe'
  assert (tok.bos_id, tok.eos_id) == (BOS, END_OF_TEXT)
  assert set(tok.stop_ids) == {END_OF_TEXT, EOT} and tok.stop_ids[0] == END_OF_TEXT
  assert tok.vocab_size == 128256
  assert tok.piece_ids('<|header_start|>') == [HEADER_START]
  ids, mask = tok.encode_document('Hello, MobileMoE!')
  assert ids[0] == BOS and ids[-1] == END_OF_TEXT and mask.all()   # encoding adds BOS
  text = 'Return the  directory,\n\tindented — with ünïcode and ✓ symbols.'
  assert tok.decode(tok.encode(text)) == text


def test_pinned_example_structure(tok):
  """notes §4: "Name one JVM language." -> 128000, 128005, user, 128006, \\n\\n, content,
  128008, 128005, assistant, 128006, \\n\\n (content ids are our synthetic vocabulary's)."""
  got = tok.chat_prompt(CONVERSATIONS[0])
  e = tok.encode
  assert got == [BOS, HEADER_START, *e('user'), HEADER_END, *e('\n\n'),
                 *e('Name one JVM language.'), EOT,
                 HEADER_START, *e('assistant'), HEADER_END, *e('\n\n')]


def test_native_template_equals_the_jinja_rendering(tok, llama3_tokenizer_dir):
  source = _config(llama3_tokenizer_dir)['chat_template']
  for messages in CONVERSATIONS:
    for prompt in (True, False):
      text = tokenizer_lib.render_jinja(source, messages, prompt, bos_token='<|begin_of_text|>')
      assert text.startswith('<|begin_of_text|><|header_start|>')
      native = tok.chat_prompt(messages) if prompt else tok.encode_chat(messages)[0].tolist()
      assert native == tok.encode(text)


def test_sft_mask_is_assistant_content_and_its_eot(tok):
  messages = CONVERSATIONS[1] + [{'role': 'assistant', 'content': 'Scala.'}]
  ids, mask = tok.encode_chat(messages)
  assert ids[0] == BOS and ids[-1] == EOT   # no trailing eos after the last <|eot|>
  assert ids[mask == 1].tolist() == tok.encode('Kotlin.') + [EOT] + tok.encode('Scala.') + [EOT]
  # Content whose first token merges with the header's "\n\n" is still trained on, whole:
  # the merged token counts as content.
  assert tok.encode('\n\n\n') == tok.piece_ids('\u010a\u010a\u010a')   # one token
  ids, mask = tok.encode_chat(CONVERSATIONS[2])
  weighted = ids[mask == 1].tolist()
  assert weighted == tok.encode('\n\n\nScala\n') + [EOT]
  assert ids[mask == 0][-1] == HEADER_END


def test_config_eos_ids_join_the_stop_ids(llama3_tokenizer_dir, tmp_path):
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(llama3_tokenizer_dir, name), tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'eos_token_id': [128001, 128009]}))
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': 128008}))
  tok = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert tok.stop_ids == (END_OF_TEXT, EOT, 128009)
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': 'x'}))
  with pytest.raises(ValueError, match='generation_config.json'):
    tokenizer_lib.load_tokenizer(str(tmp_path))


def test_a_jinja_template_the_native_one_does_not_match_is_refused(llama3_tokenizer_dir, tmp_path):
  shutil.copy(os.path.join(llama3_tokenizer_dir, 'tokenizer.json'), tmp_path)
  config = _config(llama3_tokenizer_dir)
  # The same protocol, but content stripped: SFT must not silently use another format.
  config['chat_template'] = config['chat_template'].replace("message['content']",
                                                            "message['content'] | trim")
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(config))
  tok = tokenizer_lib.load_tokenizer(str(tmp_path))
  for _ in range(2):   # and again: a failed check does not let the next call through
    with pytest.raises(ValueError, match='tokenizer_config.json.*chat_template'):
      tok.encode_chat(CONVERSATIONS[0])
  with pytest.raises(ValueError, match='tokenizer_config.json.*chat_template'):
    tok.chat_prompt(CONVERSATIONS[0])
  # Chosen by name, the template is the caller's decision.
  named = tokenizer_lib.load_tokenizer(str(tmp_path), chat_template='bundled')
  ids, mask = named.encode_chat(CONVERSATIONS[1])
  assert named.template.name == 'bundled' and ids[0] == BOS and mask.sum() > 0
  with pytest.raises(ValueError, match='unknown chat template'):
    tokenizer_lib.load_tokenizer(str(tmp_path), chat_template='llama3')


def test_sentencepiece_converts_to_the_same_ids(tmp_path, spm_tokenizer):
  import tokenizers
  out = tmp_path / 'hf'
  ids = tokenizer_lib.write_tokenizer_files(spm_tokenizer, str(out))
  assert ids == {'bos_token_id': 2, 'eos_token_id': [3, spm_tokenizer.piece_ids('<|end|>')[0]],
                 'pad_token_id': 0}
  converted = tokenizers.Tokenizer.from_file(str(out / 'tokenizer.json'))
  rnd = random.Random(0)
  texts = ['Return the  directory,\n\tindented — with ünïcode and ✓ symbols.', '', ' ', ' lead',
           'trail  ', '\n\n  x', 'def f(x):\n    return x**2  # 日本']
  texts += [''.join(rnd.choice('ab cd\n\té✓日 .,') for _ in range(rnd.randint(0, 30)))
            for _ in range(200)]
  for text in texts:
    want = spm_tokenizer.encode(text)
    assert converted.encode(text, add_special_tokens=False).ids == want, repr(text)
    assert converted.encode(text).ids == [2] + want   # BOS, as our documents start
    assert converted.decode(want) == spm_tokenizer.decode(want)
  # Loaded back through the tokenizer.json, chats encode as with the SentencePiece model.
  back = tokenizer_lib.load_tokenizer(str(out))
  assert back.template.name == 'bundled' and back.stop_ids == spm_tokenizer.stop_ids
  for messages in CONVERSATIONS[1:]:
    for a, b in zip(back.encode_chat(messages), spm_tokenizer.encode_chat(messages)):
      np.testing.assert_array_equal(a, b)
    assert back.chat_prompt(messages) == spm_tokenizer.chat_prompt(messages)


def test_unconvertible_sentencepiece_is_refused(tmp_path):
  import sentencepiece as spm
  texts = [f'line {i} of some text with words' for i in range(200)]
  path = str(tmp_path / 'bpe.model')
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=path[:-6],
                                 vocab_size=60, model_type='bpe', minloglevel=2)
  with pytest.raises(ValueError, match='bpe.model.*model_type'):
    tokenizer_lib.spm_to_tokenizer_json(path)


def test_sft_rows_through_the_pipeline(tok, llama3_tokenizer_dir, tmp_path):
  """A snapshot directory as the data config's tokenizer: packed SFT rows train exactly on
  each assistant answer and its <|eot|>."""
  from mobilemoe_jax.data import pipeline
  answers = ['Kotlin.', 'Scala, and also Clojure.', '\nGroovy\n']
  path = tmp_path / 'chat.jsonl'
  path.write_text(''.join(json.dumps({'messages': [
      {'role': 'user', 'content': f'Name JVM language {i}.'},
      {'role': 'assistant', 'content': a}]}) + '\n' for i, a in enumerate(answers)))
  config = {'tokenizer': llama3_tokenizer_dir, 'shuffle': False, 'num_epochs': 1,
            'sources': [{'kind': 'jsonl_chat', 'path': str(path)}]}
  batch = next(iter(pipeline.make_dataset(config, seq_len=128, batch_size=1, seed=0,
                                          process_index=0, process_count=1)))
  seg, targets, mask = batch['segment_ids'][0], batch['targets'][0], batch['loss_mask'][0]
  got = [targets[(seg == s) & (mask == 1)].tolist() for s in np.unique(seg[seg > 0])]
  want = [tok.encode_chat(json.loads(line)['messages']) for line in path.read_text().splitlines()]
  assert got == [ids[mask == 1].tolist() for ids, mask in want]
  assert [g[-1] for g in got] == [EOT] * 3 and tok.decode(got[0][:-1]) == 'Kotlin.'
