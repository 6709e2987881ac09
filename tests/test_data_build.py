"""The bundled data build: corpus split, ArrayRecord, TFDS round trip, tokenizers, chat JSONL."""

import json
import os

import numpy as np
import pytest

from mobilemoe_jax.data import build, corpus
from mobilemoe_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("data"))
  # ~200 KB keeps the build around a second; vocab 512 leaves ~250 learned pieces.
  manifest = build.build(out, max_bytes=200_000, vocab_size=512, progress=False)
  return out, manifest


def _read_array_records(paths):
  from array_record.python.array_record_module import ArrayRecordReader

  docs = []
  for p in paths:
    reader = ArrayRecordReader(p)
    docs += [json.loads(r) for r in reader.read_all()]
    reader.close()
  return docs


def test_build_writes_everything_and_is_idempotent(built):
  out, manifest = built
  counts = manifest["counts"]
  assert counts["train_docs"] > 50 and counts["validation_docs"] > 0 and counts["chat_train"] > 50
  p = build.paths(out)
  mtime = os.path.getmtime(p["tokenizer"])
  again = build.build(out, max_bytes=200_000, vocab_size=512, progress=False)
  assert again == manifest
  assert os.path.getmtime(p["tokenizer"]) == mtime  # nothing rebuilt
  changed = build.build(out, max_bytes=200_000, vocab_size=520, progress=False)
  assert changed["params"]["vocab_size"] == 520  # a parameter change does rebuild
  build.build(out, max_bytes=200_000, vocab_size=512, progress=False)  # restore for other tests


def test_split_is_disjoint_and_a_function_of_the_text(built):
  out, _ = built
  p = build.paths(out)
  train = _read_array_records(p["train"])
  val = _read_array_records(p["validation"])
  train_texts, val_texts = {d["text"] for d in train}, {d["text"] for d in val}
  assert len(train_texts) == len(train)  # deduplicated
  assert not train_texts & val_texts
  assert all(corpus.is_validation(t) for t in val_texts)
  assert not any(corpus.is_validation(t) for t in train_texts)
  # Same inputs, same documents: the corpus is deterministic.
  assert corpus.collect_documents(200_000) == corpus.collect_documents(200_000)


def test_tfds_builder_round_trip(built):
  import tensorflow_datasets as tfds

  from mobilemoe_jax.data import tfds_builder

  out, _ = built
  p = build.paths(out)
  for split in ("train", "validation"):
    source = tfds.data_source(tfds_builder.NAME, split=split, data_dir=p["tfds_dir"], download=False)
    via_tfds = sorted(source[i]["text"].decode() for i in range(len(source)))
    via_array_record = sorted(d["text"] for d in _read_array_records(p[split]))
    assert via_tfds == via_array_record


def test_sentencepiece_ids_and_lossless_round_trip(built):
  out, _ = built
  tok = tokenizer_lib.load_tokenizer(build.paths(out)["tokenizer"])
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.vocab_size == 512
  text = "Return the  directory,\n\tindented — with ünïcode and ✓ symbols."
  assert tok.decode(tok.encode(text)) == text  # byte fallback: nothing is lost
  ids, mask = tok.encode_document("hello world")
  assert ids[0] == 2 and ids[-1] == 3 and ids.dtype == np.int32 and mask.all()


def test_encode_chat_weights_only_assistant_tokens(built):
  out, _ = built
  tok = tokenizer_lib.load_tokenizer(build.paths(out)["tokenizer"])
  messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "What does `json.dumps` do?"},
      {"role": "assistant", "content": "It serializes an object to a JSON string."},
      {"role": "user", "content": "More?"},
      {"role": "assistant", "content": "It accepts indent."},
  ]
  ids, mask = tok.encode_chat(messages)
  assert ids.shape == mask.shape and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  end = tok.piece_ids("<|end|>")
  assert len(end) == 1  # chat pieces are single tokens
  expected = (tok.encode("It serializes an object to a JSON string.") + end
              + tok.encode("It accepts indent.") + end)
  assert ids[mask == 1].tolist() == expected
  assert set(np.unique(mask).tolist()) == {0.0, 1.0}
  with pytest.raises(ValueError, match="message 0"):
    tok.encode_chat([{"role": "robot", "content": "hi"}])


def test_hf_tokenizer_json(tmp_path):
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)

  loaded = tokenizer_lib.load_tokenizer(path)
  assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
  ids, mask = loaded.encode_chat([{"role": "user", "content": "the fox"},
                                  {"role": "assistant", "content": "jumps"}])
  assert ids[mask == 1].tolist() == loaded.encode("jumps") + loaded.piece_ids("<|end|>")


def test_bad_tokenizer_paths_name_the_file(tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer_lib.load_tokenizer(missing)
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="garbage.model"):
    tokenizer_lib.load_tokenizer(str(garbage))
  bad_json = tmp_path / "tokenizer.json"
  bad_json.write_text("{ not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    tokenizer_lib.load_tokenizer(str(bad_json))


def test_chat_jsonl_is_well_formed(built):
  out, manifest = built
  with open(build.paths(out)["chat_train"]) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == manifest["counts"]["chat_train"]
  multi_turn = 0
  for r in records:
    roles = [m["role"] for m in r["messages"]]
    assert roles[::2] == ["user"] * len(roles[::2]) and roles[1::2] == ["assistant"] * len(roles[1::2])
    assert all(m["content"].strip() for m in r["messages"])
    multi_turn += len(roles) > 2
  assert multi_turn > 0
