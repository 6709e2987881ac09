"""The Grain input pipeline: sources -> tokenise -> pack -> mix -> batch, checkpointable.

Entry point: `make_dataset(data_config, seq_len=..., batch_size=..., seed=...)` returns a
`grain.IterDataset`; `iter()` on it gives a `grain.DatasetIterator` whose `get_state()` /
`set_state()` (plain JSON-able dicts) make a resumed run see exactly the batches it would have
seen. With Orbax, the iterator is one more item of the checkpoint (one JSON file per process):

  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=pipeline.CheckpointSave(iterator)))
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=pipeline.CheckpointRestore(iterator)))

(CheckpointSave / CheckpointRestore / CheckpointHandler are grain.checkpoint's, re-exported.)

Config schema (an ml_collections.ConfigDict or a plain dict; unknown keys are errors):

  tokenizer: str            # SentencePiece .model, HF tokenizer.json or a dir with one, local
  sources: list of dicts, each one of
    {kind: "array_record", path: str | list[str], weight: 1.0}
        # files, globs or directories of ArrayRecord files; records are UTF-8 JSON {"text": ...}
    {kind: "tfds", name: str, data_dir: str, split: "train", text_key: "text", weight: 1.0}
        # a prepared TFDS dataset in array_record format, read through tfds.data_source
    {kind: "jsonl_chat", path: str, weight: 1.0}
        # one {"messages": [{"role": "user"|"assistant"|"system", "content": str}]} per line
  shuffle: True             # shuffle documents (reshuffled every epoch) and packed rows
  num_epochs: None          # None = repeat forever (training); 1 = one pass (evaluation)
  num_packing_bins: 0       # rows packed at once; 0 -> 4 * batch_size (more = less padding)
  max_chunks_per_doc: 256   # documents longer than this many rows are truncated

Each batch is a dict of numpy arrays, B = batch_size, T = seq_len:
  inputs       int32   [B, T]  token ids, 0 at padding
  targets      int32   [B, T]  the next token of the same document
  segment_ids  int32   [B, T]  1, 2, ... per document in the row; 0 = padding
  positions    int32   [B, T]  position within the document, restarting at 0
  loss_mask    float32 [B, T]  1 where targets[b, t] is trained on; 0 on padding and prompts

How documents become rows: a document of n tokens (<bos> ... <eos>, or a chat) is shifted
into inputs = ids[:-1], targets = ids[1:] BEFORE packing, so a target is never taken from a
neighbouring document; every target is a real token of its own document (the last one is
<eos>, or a chat's last end-of-turn piece). A chat is laid out by the tokenizer's chat template
(tokenizer.py: the bundled `<|user|>...<|end|>` pieces, or the released MobileMoE's
`<|header_start|>role<|header_end|>\\n\\n...<|eot|>` for its Llama-3 tokenizer) and trained on
assistant content plus the piece that ends each assistant turn. A document longer than T is
cut into T-token pieces, each its own segment with positions from 0. Pieces are packed
first-fit into rows (grain.experimental.FirstFitPackIterDataset), each source separately, so a
row holds one source only.

Mixture: sources are mixed row by row with grain's IterDataset.mix, which interleaves
deterministically in the given proportions (exact, not sampled), so weights are fractions
of rows (roughly of tokens). Each training stage passes its own sources and weights.

Errors: a file that differs from the build's SHA256SUMS beside it fails when it is opened
(integrity.py); a record that cannot be read or parsed raises DataError naming the file and
record index (JSONL: line), never a bare Riegeli or UnicodeDecodeError.

Sharding: documents of every source are split round-robin across processes
(index % process_count == process_index) before shuffling, so processes read disjoint sets
whose union is the whole source.
"""

import bisect
import functools
import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from mobilemoe_jax.data import corpus
from mobilemoe_jax.data import tokenizer as tokenizer_lib
from mobilemoe_jax.data.integrity import DataError, check_file

# Orbax support for the iterator state, re-exported so callers need only this module.
from grain.checkpoint import CheckpointHandler  # noqa: F401
try:
  from grain.checkpoint import CheckpointRestore, CheckpointSave  # noqa: F401  (needs orbax)
except ImportError:
  pass

_CONFIG_KEYS = {"tokenizer", "sources", "shuffle", "num_epochs", "num_packing_bins",
                "max_chunks_per_doc"}
_SOURCE_KEYS = {
    "array_record": {"kind", "path", "weight"},
    "tfds": {"kind", "name", "data_dir", "split", "text_key", "weight"},
    "jsonl_chat": {"kind", "path", "weight"},
}
FEATURES = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


# ------------------------------------------------------------------------------------- sources


def _expand_paths(path: str | Sequence[str]) -> list[str]:
  """Files, globs or directories -> a sorted list of files; a miss names what was asked."""
  patterns = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  files = []
  for pattern in map(os.fspath, patterns):
    if os.path.isdir(pattern):
      matches = sorted(glob.glob(os.path.join(pattern, "*.array_record")))
    else:
      matches = sorted(glob.glob(pattern))
    if not matches:
      raise FileNotFoundError(f"no ArrayRecord files found at {pattern!r}")
    files += matches
  return files


def open_array_record(path: str, check_sums: bool = True) -> grain.sources.ArrayRecordDataSource:
  """One ArrayRecord file, checked against the build's SHA256SUMS; errors name the file."""
  if check_sums:
    check_file(path)
  try:
    return grain.sources.ArrayRecordDataSource([path])
  except Exception as e:  # Riegeli: a truncated file has no readable footer
    raise DataError(f"{path}: unreadable ArrayRecord file ({_first_line(e)})") from None


def read_record(source, index: int, where: str) -> bytes:
  """source[index]; a Riegeli error (bad chunk hash, ...) names `where` (file + record)."""
  try:
    return source[index]
  except Exception as e:
    raise DataError(f"{where}: unreadable record ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


class ArrayRecordTextSource(grain.sources.RandomAccessDataSource):
  """Document texts from ArrayRecord files; errors name the file and the record index."""

  def __init__(self, path: str | Sequence[str]):
    self._paths = _expand_paths(path)
    self._sources = [open_array_record(p) for p in self._paths]
    self._starts = np.cumsum([0] + [len(s) for s in self._sources]).tolist()  # [files + 1]

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int) -> str:
    f = bisect.bisect_right(self._starts, index) - 1
    local = index - self._starts[f]
    where = f"{self._paths[f]} record {local}"
    return corpus.decode_record(read_record(self._sources[f], local, where), where)["text"]

  def __repr__(self) -> str:
    return f"ArrayRecordTextSource({self._paths})"


class TfdsTextSource(grain.sources.RandomAccessDataSource):
  """Texts of a prepared TFDS dataset, random access through tfds.data_source (no download)."""

  def __init__(self, name: str, data_dir: str | None, split: str = "train", text_key: str = "text"):
    import tensorflow_datasets as tfds

    from mobilemoe_jax.data import tfds_builder  # noqa: F401  registers mobilemoe_corpus

    self._where = f"tfds {name!r} split {split!r} in {data_dir!r}"
    if data_dir is not None and not os.path.isdir(os.path.join(data_dir, name)):
      raise FileNotFoundError(f"{self._where}: dataset not prepared (no {os.path.join(data_dir, name)})")
    if data_dir is not None:   # the prepared files, against the build's SHA256SUMS
      for root, _, names in os.walk(os.path.join(data_dir, name)):
        for n in names:
          if ".array_record" in n:
            check_file(os.path.join(root, n))
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
      raise DataError(f"{self._where}: cannot open ({_first_line(e)})") from None
    self._text_key = text_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    record = read_record(self._source, index, f"{self._where} record {index}")
    text = record.get(self._text_key) if isinstance(record, Mapping) else None
    if isinstance(text, bytes):
      try:
        text = text.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"malformed record at {self._where} record {index}: {e}") from None
    if not isinstance(text, str):
      raise DataError(f"malformed record at {self._where} record {index}: no {self._text_key!r} text")
    return text


def parse_chat_line(raw: bytes, where: str) -> list[dict] | None:
  """One JSONL line -> its messages (None for a blank line); DataError naming `where`."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"malformed record at {where}: not UTF-8 ({e.reason} at byte {e.start}: "
                    f"{raw[e.start:e.start + 4]!r})") from None
  if not line.strip():
    return None
  try:
    messages = json.loads(line)["messages"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise DataError(f"malformed record at {where}: expected {{\"messages\": [...]}} ({e!r})") from None
  ok = isinstance(messages, list) and messages and all(
      isinstance(m, dict) and m.get("role") in tokenizer_lib.ROLE_PIECES
      and isinstance(m.get("content"), str) for m in messages)
  if not ok:
    raise DataError(f"malformed record at {where}: messages must be a non-empty list of "
                    f"{{'role': one of {sorted(tokenizer_lib.ROLE_PIECES)}, 'content': str}}")
  return messages


def load_chat_jsonl(path: str) -> list[list[dict]]:
  """Conversations from a JSONL file, validated up front; errors name the file and line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"chat JSONL file not found: {path!r}")
  check_file(path)
  conversations = []
  with open(path, "rb") as f:   # bytes: a bad byte is reported with its line, not a bare error
    for line_no, raw in enumerate(f, start=1):
      messages = parse_chat_line(raw, f"{path} line {line_no} (record {len(conversations)})")
      if messages is not None:
        conversations.append(messages)
  if not conversations:
    raise DataError(f"chat JSONL file {path!r} has no records")
  return conversations


# ------------------------------------------------------------------------------- tokenisation


def _to_example(ids: np.ndarray, mask: np.ndarray) -> dict:
  # Shift inside the document, so targets can never come from the next document.
  return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}  # each [n - 1]


class _SplitLong(grain.experimental.FlatMapTransform):
  """Cuts an example into pieces of at most seq_len tokens (the packer rejects longer ones)."""

  def __init__(self, seq_len: int, max_chunks: int):
    self.seq_len = seq_len
    self.max_fan_out = max_chunks

  def flat_map(self, example):
    n = min(len(example["inputs"]), self.seq_len * self.max_fan_out)
    return [{k: v[s:s + self.seq_len] for k, v in example.items()}
            for s in range(0, n, self.seq_len)]


def _rename(row: dict) -> dict:
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "segment_ids": row["inputs_segment_ids"].astype(np.int32),
      "positions": row["inputs_positions"].astype(np.int32),
      "loss_mask": row["loss_mask"].astype(np.float32),
  }


# ----------------------------------------------------------------------------------- datasets


def _cfg_get(cfg, key, default=None):
  value = cfg.get(key, default) if hasattr(cfg, "get") else default
  return default if value is None else value


def _check_keys(cfg, allowed: set, what: str):
  keys = set(cfg.keys())
  if unknown := keys - allowed:
    raise ValueError(f"{what}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _source_seed(seed: int, i: int) -> int:
  return (seed * 1_000_003 + i * 7_919) % 2**32  # distinct per source, stable per seed


def document_dataset(
    source_cfg, tokenizer: tokenizer_lib.Tokenizer, *, seed: int, shuffle: bool = True,
    num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
    source_id: int = 0,
) -> grain.MapDataset:
  """One source as tokenised examples {"inputs","targets","loss_mask"} (each [n]), this process's share."""
  kind = source_cfg["kind"]
  if kind not in _SOURCE_KEYS:
    raise ValueError(f"source {source_id}: unknown kind {kind!r}; expected one of {sorted(_SOURCE_KEYS)}")
  _check_keys(source_cfg, _SOURCE_KEYS[kind], f"source {source_id} ({kind})")
  if kind == "jsonl_chat":
    ds = grain.MapDataset.source(load_chat_jsonl(source_cfg["path"]))
    encode = lambda messages: _to_example(*tokenizer.encode_chat(messages))
  else:
    if kind == "array_record":
      src = ArrayRecordTextSource(source_cfg["path"])
    else:
      src = TfdsTextSource(source_cfg["name"], _cfg_get(source_cfg, "data_dir"),
                           _cfg_get(source_cfg, "split", "train"),
                           _cfg_get(source_cfg, "text_key", "text"))
    ds = grain.MapDataset.source(src)
    encode = lambda text: _to_example(*tokenizer.encode_document(text))
  if len(ds) < process_count:
    raise ValueError(f"source {source_id} ({kind}) has {len(ds)} documents for {process_count} processes")
  ds = ds[process_index::process_count]  # disjoint, complete: every index lands in one process
  if shuffle:
    ds = ds.shuffle(seed=_source_seed(seed, source_id))  # a new order each epoch (seed + epoch)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  return ds.map(encode)  # tokenise lazily: only documents actually read are encoded


def make_dataset(
    data_config,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
  """Batches of packed rows for this process; see the module docstring for schema and shapes."""
  _check_keys(data_config, _CONFIG_KEYS, "data config")
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  sources = list(data_config["sources"])
  if not sources:
    raise ValueError("data config: no sources")
  shuffle = bool(_cfg_get(data_config, "shuffle", True))
  num_epochs = _cfg_get(data_config, "num_epochs")
  bins = int(_cfg_get(data_config, "num_packing_bins", 0)) or 4 * batch_size
  max_chunks = int(_cfg_get(data_config, "max_chunks_per_doc", 256))
  tokenizer = tokenizer_lib.load_tokenizer(data_config["tokenizer"])

  rows, weights = [], []
  for i, source_cfg in enumerate(sources):
    weight = float(_cfg_get(source_cfg, "weight", 1.0))
    if weight <= 0:
      raise ValueError(f"source {i}: weight must be > 0, got {weight}")
    docs = document_dataset(
        source_cfg, tokenizer, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        process_index=process_index, process_count=process_count, source_id=i)
    pieces = grain.experimental.FlatMapIterDataset(docs.to_iter_dataset(), _SplitLong(seq_len, max_chunks))
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len},
        num_packing_bins=bins,
        seed=_source_seed(seed, i) + 1,
        shuffle_bins=shuffle,
        # Packed and padded like inputs, but one set of segment ids / positions is enough.
        meta_features=("targets", "loss_mask"),
    )
    rows.append(packed.map(_rename))  # each element: {feature: [T]}
    weights.append(weight)

  ds = rows[0] if len(rows) == 1 else grain.IterDataset.mix(rows, weights)
  # A finite pass ends with a partial batch; pad it with empty rows (segment 0, mask 0) so
  # every batch has the same shape and jit compiles once.
  pad_batch = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
  return ds.batch(batch_size, batch_fn=pad_batch)  # {feature: [B, T]}


def bundled_data_config(data_dir: str = "data", stage: str = "pretrain"):
  """Data configs over the bundled corpus (built by `python -m mobilemoe_jax.data.build`).

  Stages: "pretrain" (corpus), "midtrain" (corpus via TFDS + chat, an anneal mixture),
  "sft" (chat only), "eval" (held-out corpus, one unshuffled pass), "sft_eval".
  """
  import ml_collections

  from mobilemoe_jax.data import build

  p = build.paths(data_dir)
  corpus_train = {"kind": "array_record", "path": os.path.join(p["corpus_dir"], "train-*.array_record")}
  stages = {
      "pretrain": [dict(corpus_train, weight=1.0)],
      "midtrain": [
          {"kind": "tfds", "name": "mobilemoe_corpus", "data_dir": p["tfds_dir"], "split": "train", "weight": 0.7},
          {"kind": "jsonl_chat", "path": p["chat_train"], "weight": 0.3},
      ],
      "sft": [{"kind": "jsonl_chat", "path": p["chat_train"], "weight": 1.0}],
      "eval": [{"kind": "array_record", "path": p["validation"], "weight": 1.0}],
      "sft_eval": [{"kind": "jsonl_chat", "path": p["chat_validation"], "weight": 1.0}],
  }
  if stage not in stages:
    raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(stages)}")
  one_pass = stage.endswith("eval")
  return ml_collections.ConfigDict({
      "tokenizer": p["tokenizer"],
      "sources": stages[stage],
      "shuffle": not one_pass,
      "num_epochs": 1 if one_pass else None,
      "num_packing_bins": 0,
      "max_chunks_per_doc": 256,
  })
