"""Scans a data directory and reports every bad file and record; exit 1 if any.

  python -m mobilemoe_jax.data.verify data/

Checks, under the directory (recursively): every file listed in a SHA256SUMS against it,
every record of every ArrayRecord file (Riegeli chunk hashes; corpus records must also be
UTF-8 JSON with a "text"), every line of every chat JSONL file, and the tokenizer model.
Unlike training, which stops at the first bad record, it goes on and lists them all.
"""
import argparse
import os
import sys

from mobilemoe_jax.data import corpus, integrity


def _files(root: str) -> list[str]:
  out = []
  for directory, dirnames, names in os.walk(root):
    dirnames.sort()
    out += [os.path.join(directory, n) for n in sorted(names)]
  return out


def _check_sums(files) -> list[str]:
  problems = []
  for sums_file in (f for f in files if os.path.basename(f) == integrity.SUMS):
    directory = os.path.dirname(sums_file)
    for name, digest in integrity.read_sums(directory).items():
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        problems.append(f"{path}: missing (listed in {sums_file})")
      elif integrity.sha256(path) != digest:
        problems.append(f"{path}: sha256 differs from {sums_file}")
  return problems


def _check_array_record(path: str) -> tuple[int, list[str]]:
  """(records read, problems). Corpus shards hold JSON; TFDS shards hold tf.Examples."""
  from mobilemoe_jax.data import pipeline

  try:
    source = pipeline.open_array_record(path, check_sums=False)   # _check_sums did that
  except integrity.DataError as e:
    return 0, [str(e)]
  is_corpus = path.endswith(".array_record")
  problems = []
  for i in range(len(source)):
    where = f"{path} record {i}"
    try:
      raw = pipeline.read_record(source, i, where)
      if is_corpus:
        corpus.decode_record(raw, where)
    except integrity.DataError as e:
      problems.append(str(e))
  return len(source), problems


def _check_jsonl(path: str) -> tuple[int, list[str]]:
  from mobilemoe_jax.data import pipeline

  problems, count = [], 0
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        count += pipeline.parse_chat_line(raw, f"{path} line {line_no}") is not None
      except integrity.DataError as e:
        problems.append(str(e))
  return count, problems


def _check_sentencepiece(path: str) -> list[str]:
  import sentencepiece as spm

  try:
    spm.SentencePieceProcessor().load(path)
  except (OSError, RuntimeError) as e:
    return [f"{path}: not a SentencePiece model ({e})"]
  return []


def verify(root: str) -> tuple[int, list[str]]:
  """(records checked, problems: one line each, naming the file and record/line)."""
  if not os.path.isdir(root):
    return 0, [f"{root}: no such directory"]
  files = _files(root)
  problems, records = _check_sums(files), 0
  for path in files:
    name = os.path.basename(path)
    if ".array_record" in name:
      n, bad = _check_array_record(path)
    elif name.endswith(".jsonl"):
      n, bad = _check_jsonl(path)
    elif name.endswith(".model"):
      n, bad = 0, _check_sentencepiece(path)
    else:
      continue
    records += n
    problems += bad
  return records, problems


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("data_dir", help="a directory written by mobilemoe_jax.data.build (or any)")
  args = parser.parse_args(argv)
  records, problems = verify(args.data_dir)
  for p in problems:
    print(p)
  if problems:
    print(f"{len(problems)} problems in {args.data_dir}", file=sys.stderr)
    sys.exit(1)
  print(f"{args.data_dir}: ok ({records} records checked)")


if __name__ == "__main__":
  main()
