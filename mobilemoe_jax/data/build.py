"""Builds the bundled data: corpus -> ArrayRecord -> TFDS -> SentencePiece -> chat JSONL.

  python -m mobilemoe_jax.data.build --out data/          # ~10 s on 2 CPU cores
  python -m mobilemoe_jax.data.build --out data/ --force  # rebuild even if up to date

Idempotent: <out>/manifest.json records the build parameters (including the Python version
whose standard library is the corpus); a second run with the same parameters and all outputs
present does nothing. Layout under <out>:

  corpus/train-0000i-of-0000N.array_record   JSON {"title","kind","text"} per record
  corpus/validation-00000-of-00001.array_record
  tfds/mobilemoe_corpus/1.0.0/...            the same documents as a TFDS dataset
  tokenizer/spm.model                        SentencePiece, pad=0 unk=1 bos=2 eos=3
  chat/train.jsonl, chat/validation.jsonl    {"messages": [{"role","content"}, ...]}
  */SHA256SUMS                               sha256 of every file in its directory, checked
                                             by the pipeline when it opens one (integrity.py)
  manifest.json

`python -m mobilemoe_jax.data.verify <out>` checks the sums and reads every record.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

from tqdm import tqdm

from mobilemoe_jax.data import corpus, integrity
from mobilemoe_jax.data import tokenizer as tokenizer_lib

BUILD_VERSION = 2  # bump when the output format changes, to invalidate old builds


def paths(out: str, train_shards: int = 2) -> dict:
  """Where each artifact of a build lives; also what configs should point at."""
  cdir = os.path.join(out, "corpus")
  return {
      "corpus_dir": cdir,
      "train": corpus.shard_paths(cdir, "train", train_shards),
      "validation": corpus.shard_paths(cdir, "validation", 1),
      "tfds_dir": os.path.join(out, "tfds"),
      "tokenizer": os.path.join(out, "tokenizer", "spm.model"),
      "chat_train": os.path.join(out, "chat", "train.jsonl"),
      "chat_validation": os.path.join(out, "chat", "validation.jsonl"),
      "manifest": os.path.join(out, "manifest.json"),
  }


def _outputs_exist(p: dict) -> bool:
  files = [*p["train"], *p["validation"], p["tokenizer"], p["chat_train"], p["chat_validation"],
           os.path.join(p["corpus_dir"], integrity.SUMS)]
  return all(os.path.exists(f) for f in files) and os.path.isdir(p["tfds_dir"])


def build(
    out: str,
    *,
    max_bytes: int = 4_000_000,
    vocab_size: int = 2048,
    heldout_permille: int = 50,
    train_shards: int = 2,
    max_chat_records: int = 4000,
    stdlib_root: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
  """Builds everything under `out` unless already up to date; returns the manifest."""
  p = paths(out, train_shards)
  params = {
      "build_version": BUILD_VERSION,
      "max_bytes": max_bytes,
      "vocab_size": vocab_size,
      "heldout_permille": heldout_permille,
      "train_shards": train_shards,
      "max_chat_records": max_chat_records,
      "python": sys.version.split()[0],
      "stdlib_root": stdlib_root or corpus.stdlib_dir(),
  }
  if not force and os.path.exists(p["manifest"]) and _outputs_exist(p):
    with open(p["manifest"]) as f:
      manifest = json.load(f)
    if manifest.get("params") == params:
      if progress:
        print(f"data in {out} is up to date (manifest.json); use --force to rebuild")
      return manifest

  start = time.time()
  steps = tqdm(total=5, desc="building data", unit="step", disable=not progress)

  steps.set_postfix_str("collecting documents")
  docs = corpus.collect_documents(max_bytes, params["stdlib_root"])
  splits = corpus.split_documents(docs, heldout_permille)
  steps.update()

  steps.set_postfix_str("writing ArrayRecord")
  # Stale shards from a build with another shard count would be globbed by the TFDS builder.
  shutil.rmtree(p["corpus_dir"], ignore_errors=True)
  os.makedirs(p["corpus_dir"])
  corpus.write_array_records(splits["train"], p["train"])
  corpus.write_array_records(splits["validation"], p["validation"])
  steps.update()

  steps.set_postfix_str("preparing TFDS")
  from mobilemoe_jax.data import tfds_builder  # TFDS import is slow-ish; only when building

  shutil.rmtree(p["tfds_dir"], ignore_errors=True)  # TFDS would reuse an old preparation
  tfds_version_dir = tfds_builder.prepare(p["corpus_dir"], p["tfds_dir"])
  steps.update()

  steps.set_postfix_str("training tokenizer")
  tokenizer_lib.train_sentencepiece(
      (d["text"] for d in splits["train"]), p["tokenizer"], vocab_size=vocab_size,
      num_threads=min(os.cpu_count() or 1, 8),
  )
  steps.update()

  steps.set_postfix_str("writing chat JSONL")
  os.makedirs(os.path.dirname(p["chat_train"]), exist_ok=True)
  chats = {
      "train": corpus.chat_records(splits["train"], max_chat_records),
      "validation": corpus.chat_records(splits["validation"], max_chat_records),
  }
  corpus.write_jsonl(chats["train"], p["chat_train"])
  corpus.write_jsonl(chats["validation"], p["chat_validation"])
  steps.update()
  steps.close()
  for directory in (p["corpus_dir"], tfds_version_dir, os.path.dirname(p["tokenizer"]),
                    os.path.dirname(p["chat_train"])):
    integrity.write_sums(directory)

  content = hashlib.sha256("\0".join(d["text"] for d in docs).encode("utf-8")).hexdigest()
  manifest = {
      "params": params,
      "corpus_sha256": content,
      "counts": {
          "train_docs": len(splits["train"]),
          "validation_docs": len(splits["validation"]),
          "train_bytes": sum(len(d["text"].encode()) for d in splits["train"]),
          "chat_train": len(chats["train"]),
          "chat_validation": len(chats["validation"]),
      },
      "paths": p,
      "seconds": round(time.time() - start, 1),
  }
  with open(p["manifest"], "w") as f:
    json.dump(manifest, f, indent=2)  # written last: its presence means the build finished
  if progress:
    c = manifest["counts"]
    print(
        f"built {c['train_docs']} train / {c['validation_docs']} validation documents "
        f"({c['train_bytes'] / 1e6:.1f} MB), {c['chat_train']} chat records, "
        f"vocab {vocab_size} in {manifest['seconds']} s -> {out}"
    )
  return manifest


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="data", help="output directory")
  parser.add_argument("--max_bytes", type=int, default=4_000_000, help="corpus text cap")
  parser.add_argument("--vocab_size", type=int, default=2048)
  parser.add_argument("--heldout_permille", type=int, default=50, help="validation share, in 1/1000")
  parser.add_argument("--train_shards", type=int, default=2)
  parser.add_argument("--max_chat_records", type=int, default=4000)
  parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
  args = parser.parse_args(argv)
  build(
      args.out, max_bytes=args.max_bytes, vocab_size=args.vocab_size,
      heldout_permille=args.heldout_permille, train_shards=args.train_shards,
      max_chat_records=args.max_chat_records, force=args.force,
  )


if __name__ == "__main__":
  main()
