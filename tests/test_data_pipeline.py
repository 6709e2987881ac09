"""The Grain pipeline: packing, SFT masks, mixture, determinism, resume, sharding, errors."""

import collections
import json
import os

import numpy as np
import pytest

from mobilemoe_jax.data import build, pipeline
from mobilemoe_jax.data import tokenizer as tokenizer_lib

T, B = 64, 4  # short rows: many documents are split, which is what packing must get right


@pytest.fixture(scope="module")
def data(data_dir):
  return build.paths(data_dir)


def _config(data, sources, **kw):
  return dict({"tokenizer": data["tokenizer"], "sources": sources}, **kw)


def _corpus_source(data, **kw):
  return dict({"kind": "array_record", "path": data["train"]}, **kw)


def _chat_source(data, **kw):
  return dict({"kind": "jsonl_chat", "path": data["chat_train"]}, **kw)


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _segments(batch):
  """Yields (inputs, targets, loss_mask) of every document piece in a batch."""
  for b in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][b]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      yield tuple(batch[k][b, idx] for k in ("inputs", "targets", "loss_mask"))


def _raw_token_docs(source, tok):
  """(ids, mask) of every document, read and tokenised without the pipeline's own code."""
  if source["kind"] == "jsonl_chat":
    with open(source["path"]) as f:
      return [tok.encode_chat(json.loads(line)["messages"]) for line in f]
  from array_record.python.array_record_module import ArrayRecordReader

  docs = []
  for path in [source["path"]] if isinstance(source["path"], str) else source["path"]:
    reader = ArrayRecordReader(path)
    docs += [tok.encode_document(json.loads(r)["text"]) for r in reader.read_all()]
    reader.close()
  return docs


def _all_pieces(data, source, tok):
  """Every T-token piece the pipeline may emit for a source: inputs -> (targets, mask).

  A document's ids [n] give inputs ids[s:s+T] and targets ids[s+1:s+T+1]: the next token
  of the same document, always.
  """
  pieces = {}
  for ids, mask in _raw_token_docs(source, tok):
    for s in range(0, len(ids) - 1, T):
      stop = min(s + T, len(ids) - 1)
      pieces[tuple(ids[s:stop].tolist())] = (ids[s + 1:stop + 1].tolist(), mask[s + 1:stop + 1].tolist())
  return pieces


def _assert_well_packed(batch):
  assert set(batch) == set(pipeline.FEATURES)
  for k, dtype in [("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                   ("positions", np.int32), ("loss_mask", np.float32)]:
    assert batch[k].shape == (B, T) and batch[k].dtype == dtype, k
  seg, pos = batch["segment_ids"], batch["positions"]
  pad = seg == 0
  assert not batch["loss_mask"][pad].any() and not batch["inputs"][pad].any()
  for b in range(B):
    # Segments are numbered 1, 2, ... left to right, then padding only.
    used = seg[b][seg[b] > 0]
    assert (np.diff(used) >= 0).all() and (np.diff(np.unique(used)) == 1).all()
    assert not (pad[b][:-1] & ~pad[b][1:]).any(), "padding is only at the end of a row"
    for s in np.unique(used):
      assert (pos[b][seg[b] == s] == np.arange((seg[b] == s).sum())).all()


@pytest.mark.parametrize("kind", ["array_record", "jsonl_chat"])
def test_packing_keeps_documents_apart(data, kind):
  source = _corpus_source(data) if kind == "array_record" else _chat_source(data)
  tok = tokenizer_lib.load_tokenizer(data["tokenizer"])
  pieces = _all_pieces(data, source, tok)
  ds = pipeline.make_dataset(_config(data, [source]), seq_len=T, batch_size=B, seed=0,
                             process_index=0, process_count=1)
  n_segments = 0
  for batch in _take(ds, 30):
    _assert_well_packed(batch)
    for inputs, targets, mask in _segments(batch):
      # Each segment is exactly one piece of one document, with that document's own targets:
      # nothing leaked in from a neighbour in the row.
      assert tuple(inputs.tolist()) in pieces
      assert (targets.tolist(), mask.tolist()) == pieces[tuple(inputs.tolist())]
      n_segments += 1
  assert n_segments > 30 * B  # rows really hold several documents


def test_sft_prompt_tokens_carry_no_loss(data):
  tok = tokenizer_lib.load_tokenizer(data["tokenizer"])
  assistant, user = tok.piece_ids("<|assistant|>")[0], tok.piece_ids("<|user|>")[0]
  ds = pipeline.make_dataset(_config(data, [_chat_source(data)]), seq_len=T, batch_size=B,
                             seed=0, process_index=0, process_count=1)
  weighted = unweighted = 0
  for batch in _take(ds, 20):
    for inputs, targets, mask in _segments(batch):
      # Walk the conversation: weight is allowed only after <|assistant|> and before <|user|>.
      in_answer = None  # unknown at a piece that starts mid-conversation
      for x, m in zip(inputs, mask):
        if x == assistant:
          in_answer = True
        elif x == user or x == tok.bos_id:
          in_answer = False
        if in_answer is False:
          assert m == 0
        weighted += m == 1
        unweighted += m == 0
      assert mask[np.isin(targets, [assistant, user, tok.bos_id])].sum() == 0
  assert weighted > 0 and unweighted > 0


def test_mixture_follows_weights(data):
  tok = tokenizer_lib.load_tokenizer(data["tokenizer"])
  # The two train shards hold disjoint documents: tell rows apart by which one they came from.
  a = _corpus_source(data, path=data["train"][0], weight=3.0)
  b = _corpus_source(data, path=data["train"][1], weight=1.0)
  pieces_a, pieces_b = _all_pieces(data, a, tok), _all_pieces(data, b, tok)
  ds = pipeline.make_dataset(_config(data, [a, b]), seq_len=T, batch_size=B, seed=0,
                             process_index=0, process_count=1)
  counts = collections.Counter()
  for batch in _take(ds, 100):
    for row in range(B):
      first = batch["inputs"][row][batch["segment_ids"][row] == 1]
      key = tuple(first.tolist())
      assert key in pieces_a or key in pieces_b
      # A few pieces (a repeated header comment, say) occur in both shards: don't count them.
      counts["both" if key in pieces_a and key in pieces_b else "a" if key in pieces_a else "b"] += 1
  assert counts["both"] < 0.05 * B * 100, counts
  share = counts["a"] / (counts["a"] + counts["b"])
  assert abs(share - 0.75) < 0.05, counts


def _equal(xs, ys):
  return len(xs) == len(ys) and all(
      all(np.array_equal(x[k], y[k]) for k in pipeline.FEATURES) for x, y in zip(xs, ys))


def _mixture(data):
  return _config(data, [
      _corpus_source(data, weight=2.0),
      {"kind": "tfds", "name": "mobilemoe_corpus", "data_dir": data["tfds_dir"], "weight": 1.0},
      _chat_source(data, weight=1.0),
  ])


def test_same_seed_same_batches_other_seed_other_batches(data):
  make = lambda seed: pipeline.make_dataset(_mixture(data), seq_len=T, batch_size=B, seed=seed,
                                            process_index=0, process_count=1)
  assert _equal(_take(make(0), 12), _take(make(0), 12))
  assert not _equal(_take(make(0), 12), _take(make(1), 12))


def test_resume_mid_stream_sees_the_same_batches(data):
  make = lambda: pipeline.make_dataset(_mixture(data), seq_len=T, batch_size=B, seed=3,
                                       process_index=0, process_count=1)
  it = iter(make())
  for _ in range(9):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # the state must survive JSON (Orbax handler)
  expected = [next(it) for _ in range(15)]

  resumed = iter(make())  # a fresh process: new dataset, new iterator
  resumed.set_state(state)
  assert _equal([next(resumed) for _ in range(15)], expected)


def test_orbax_checkpoint_of_the_iterator(data, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  make = lambda: pipeline.make_dataset(_config(data, [_corpus_source(data)]), seq_len=T,
                                       batch_size=B, seed=5, process_index=0, process_count=1)
  it = iter(make())
  for _ in range(4):
    next(it)
  checkpointer = ocp.Checkpointer(pipeline.CheckpointHandler())
  checkpointer.save(tmp_path / "data_iter", args=pipeline.CheckpointSave(it))
  expected = [next(it) for _ in range(5)]
  restored = checkpointer.restore(tmp_path / "data_iter", args=pipeline.CheckpointRestore(iter(make())))
  assert _equal([next(restored) for _ in range(5)], expected)


@pytest.mark.parametrize("shuffle", [False, True])
def test_process_shards_are_disjoint_and_complete(data, shuffle):
  tok = tokenizer_lib.load_tokenizer(data["tokenizer"])
  source = _corpus_source(data)
  everything = [tuple(ex["inputs"].tolist())
                for ex in pipeline.document_dataset(source, tok, seed=0, shuffle=False, num_epochs=1)]
  shards = [
      [tuple(ex["inputs"].tolist()) for ex in pipeline.document_dataset(
          source, tok, seed=7, shuffle=shuffle, num_epochs=1, process_index=i, process_count=3)]
      for i in range(3)
  ]
  for i in range(3):
    for j in range(i + 1, 3):
      assert not set(shards[i]) & set(shards[j])
  assert sorted(sum(shards, [])) == sorted(everything)

  # The same holds for what the batches contain, end to end.
  def pieces(process_index, process_count):
    cfg = _config(data, [source], num_epochs=1, shuffle=shuffle)
    ds = pipeline.make_dataset(cfg, seq_len=T, batch_size=B, seed=7,
                               process_index=process_index, process_count=process_count)
    return collections.Counter(tuple(s[0].tolist()) for batch in ds for s in _segments(batch))

  union = collections.Counter()
  for i in range(3):
    union += pieces(i, 3)
  assert union == pieces(0, 1)


def test_one_pass_yields_every_piece_once_in_full_size_batches(data):
  tok = tokenizer_lib.load_tokenizer(data["tokenizer"])
  source = {"kind": "array_record", "path": data["validation"]}
  expected = collections.Counter()
  for ids, _ in _raw_token_docs(source, tok):
    expected.update(tuple(ids[s:min(s + T, len(ids) - 1)].tolist()) for s in range(0, len(ids) - 1, T))
  cfg = _config(data, [source], num_epochs=1, shuffle=False)
  batches = list(pipeline.make_dataset(cfg, seq_len=T, batch_size=B, seed=0,
                                       process_index=0, process_count=1))
  assert all(b["inputs"].shape == (B, T) for b in batches)  # the last one is padded, not short
  seen = collections.Counter(tuple(s[0].tolist()) for b in batches for s in _segments(b))
  assert seen == expected


# ------------------------------------------------------------------------------------- errors


def _write_records(path, records):
  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()


def test_malformed_array_record_names_file_and_index(data, tmp_path):
  good = [json.dumps({"text": f"document number {i}"}).encode() for i in range(6)]
  path = tmp_path / "broken.array_record"
  _write_records(path, good[:3] + [b"\xff\xfe not json"] + good[3:])
  cfg = _config(data, [_corpus_source(data, path=str(path))], num_epochs=1)
  with pytest.raises(ValueError, match=r"broken\.array_record record 3"):
    list(pipeline.make_dataset(cfg, seq_len=T, batch_size=B, seed=0, process_index=0, process_count=1))

  _write_records(path, good[:1] + [json.dumps({"body": "no text"}).encode()])
  with pytest.raises(ValueError, match=r"broken\.array_record record 1"):
    list(pipeline.make_dataset(cfg, seq_len=T, batch_size=B, seed=0, process_index=0, process_count=1))


def test_malformed_jsonl_names_file_and_line(data, tmp_path):
  path = tmp_path / "chat.jsonl"
  ok = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
  path.write_text(ok + "\n" + "{broken\n")
  cfg = _config(data, [_chat_source(data, path=str(path))])
  with pytest.raises(ValueError, match=r"chat\.jsonl line 2"):
    pipeline.make_dataset(cfg, seq_len=T, batch_size=B, seed=0, process_index=0, process_count=1)
  path.write_text(ok + "\n" + ok + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}))
  with pytest.raises(ValueError, match=r"chat\.jsonl line 3"):
    pipeline.make_dataset(cfg, seq_len=T, batch_size=B, seed=0, process_index=0, process_count=1)


@pytest.mark.parametrize("source", [
    {"kind": "array_record", "path": "/nonexistent/corpus-*.array_record"},
    {"kind": "jsonl_chat", "path": "/nonexistent/chat.jsonl"},
    {"kind": "tfds", "name": "mobilemoe_corpus", "data_dir": "/nonexistent/tfds"},
])
def test_missing_files_are_named(data, source):
  with pytest.raises(FileNotFoundError, match="/nonexistent/"):
    pipeline.make_dataset(_config(data, [source]), seq_len=T, batch_size=B, seed=0,
                          process_index=0, process_count=1)


def test_bad_tokenizer_path_and_bad_config_keys(data):
  cfg = _config(data, [_corpus_source(data)])
  with pytest.raises(FileNotFoundError, match="missing.model"):
    pipeline.make_dataset(dict(cfg, tokenizer="/tmp/missing.model"), seq_len=T, batch_size=B,
                          seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="shufle"):
    pipeline.make_dataset(dict(cfg, shufle=True), seq_len=T, batch_size=B, seed=0,
                          process_index=0, process_count=1)
  with pytest.raises(ValueError, match="pth"):
    pipeline.make_dataset(_config(data, [{"kind": "array_record", "pth": "x"}]), seq_len=T,
                          batch_size=B, seed=0, process_index=0, process_count=1)


def test_bundled_configs_load(data):
  out = os.path.dirname(data["manifest"])
  for stage in ("pretrain", "midtrain", "sft", "eval", "sft_eval"):
    cfg = pipeline.bundled_data_config(out, stage)
    batch = _take(pipeline.make_dataset(cfg, seq_len=T, batch_size=B, seed=0,
                                        process_index=0, process_count=1), 1)[0]
    _assert_well_packed(batch)
