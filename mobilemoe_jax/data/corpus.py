"""The bundled default corpus: English prose from the local Python standard library.

Why the standard library and not text shipped in the repo: every machine that runs this code
already has it, it is a few MB of real, edited English (docstrings, the language-reference
topics in `pydoc_data`, prose comment blocks), it needs no network and no licence review of a
blob we would have to ship, and it keeps the repository small. The price is that the corpus
depends on the Python version; `build.py` records the version and a content hash in the
manifest so a different corpus is detected, never silently mixed.

Deterministic by construction: files are read in sorted order, documents are deduplicated by
content hash, the byte cap is applied in that fixed order, and the train / validation split
is a function of each document's hash only.

Documents are dicts {"title": str, "kind": str, "text": str}. On disk they are UTF-8 JSON
records in ArrayRecord files (Grain's native random-access format):
  <out>/corpus/train-00000-of-0000N.array_record, <out>/corpus/validation-00000-of-00001...
"""

import ast
import hashlib
import inspect
import json
import os
import sysconfig
import tokenize
from collections.abc import Iterator, Sequence

from mobilemoe_jax.data.integrity import DataError

# Directories whose text is test fixtures or third-party code, not stdlib prose.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_MIN_CHARS = 120  # Shorter docstrings are mostly "Return x." one-liners: little signal.


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def doc_hash(text: str) -> int:
  """A stable 64-bit hash of a document's text (Python's hash() is salted per process)."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_validation(text: str, heldout_permille: int = 50) -> bool:
  """Held-out membership depends on the text alone, so it is stable across builds."""
  return doc_hash(text) % 1000 < heldout_permille


def _looks_like_prose(text: str) -> bool:
  # Docstrings full of doctests or tables are mostly symbols; keep text that reads as English.
  letters = sum(c.isalpha() or c.isspace() for c in text)
  return len(text) >= _MIN_CHARS and letters >= 0.8 * len(text)


def _python_files(root: str) -> Iterator[str]:
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)  # sorted => fixed order
    for name in sorted(filenames):
      if name.endswith(".py"):
        yield os.path.join(dirpath, name)


def _docstrings(tree: ast.Module, module: str) -> Iterator[dict]:
  """Module, class and function docstrings, named by their dotted path."""

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        name = f"{prefix}.{child.name}"
        doc = ast.get_docstring(child)
        if doc:
          kind = "class" if isinstance(child, ast.ClassDef) else "function"
          yield {"title": name, "kind": kind, "text": doc}
        yield from visit(child, name)

  doc = ast.get_docstring(tree)
  if doc:
    yield {"title": module, "kind": "module", "text": doc}
  yield from visit(tree, module)


def _comment_blocks(source: str, module: str) -> Iterator[dict]:
  """Runs of 3+ consecutive full-line comments, joined into one paragraph each."""
  lines = source.splitlines()
  block: list[str] = []
  for line in lines + [""]:
    stripped = line.strip()
    if stripped.startswith("#") and not stripped.startswith("#!"):
      block.append(stripped.lstrip("#").strip())
      continue
    if len(block) >= 3:
      yield {"title": module, "kind": "comment", "text": " ".join(b for b in block if b)}
    block = []


def _pydoc_topics(root: str) -> Iterator[dict]:
  """The language-reference topics that `help()` shows; read with ast, never imported."""
  path = os.path.join(root, "pydoc_data", "topics.py")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
      for key, value in zip(node.value.keys, node.value.values):
        if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
          yield {"title": str(key.value), "kind": "topic", "text": str(value.value)}


def _module_name(root: str, path: str) -> str:
  rel = os.path.relpath(path, root)[: -len(".py")]
  parts = rel.split(os.sep)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def iter_raw_documents(root: str | None = None) -> Iterator[dict]:
  """All candidate documents in a fixed order: files, then the (few, long) reference topics.

  Topics come last so that a small cap (as in tests) still yields many short documents.
  """
  root = root or stdlib_dir()
  for path in _python_files(root):
    if os.sep + "pydoc_data" + os.sep in path:
      continue
    try:
      with tokenize.open(path) as f:  # honours the file's declared encoding
        source = f.read()
      tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
      continue  # a few stdlib files are deliberately broken (e.g. lib2to3 fixtures)
    module = _module_name(root, path)
    yield from _docstrings(tree, module)
    yield from _comment_blocks(source, module)
  yield from _pydoc_topics(root)


def collect_documents(max_bytes: int = 4_000_000, root: str | None = None) -> list[dict]:
  """Deduplicated prose documents, in a fixed order, until `max_bytes` of text is reached."""
  seen: set[int] = set()
  docs: list[dict] = []
  total = 0
  for doc in iter_raw_documents(root):
    text = inspect.cleandoc(doc["text"]).strip()
    if not _looks_like_prose(text):
      continue
    h = doc_hash(text)
    if h in seen:
      continue
    seen.add(h)
    docs.append({"title": doc["title"], "kind": doc["kind"], "text": text})
    total += len(text.encode("utf-8"))
    if total >= max_bytes:
      break
  return docs


def split_documents(docs: Sequence[dict], heldout_permille: int = 50) -> dict[str, list[dict]]:
  splits: dict[str, list[dict]] = {"train": [], "validation": []}
  for doc in docs:
    name = "validation" if is_validation(doc["text"], heldout_permille) else "train"
    splits[name].append(doc)
  return splits


def shard_paths(directory: str, split: str, num_shards: int) -> list[str]:
  return [
      os.path.join(directory, f"{split}-{i:05d}-of-{num_shards:05d}.array_record")
      for i in range(num_shards)
  ]


def write_array_records(docs: Sequence[dict], paths: Sequence[str]) -> None:
  """Round-robin documents over shards; one JSON record per document."""
  from array_record.python.array_record_module import ArrayRecordWriter

  # group_size:1 makes every record independently seekable: cheap random access for Grain.
  writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
  try:
    for i, doc in enumerate(docs):
      writers[i % len(writers)].write(json.dumps(doc, ensure_ascii=False).encode("utf-8"))
  finally:
    for w in writers:
      w.close()


def decode_record(raw: bytes, where: str) -> dict:
  """Parses one corpus record; `where` names the file and index for the error message."""
  try:
    doc = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"malformed record at {where}: not UTF-8 JSON ({e})") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
    raise DataError(f"malformed record at {where}: expected a JSON object with a 'text' string")
  return doc


# ----------------------------------------------------------------------------- chat (SFT) data

_QUESTIONS = (
    "What does `{name}` do?",
    "Explain what {name} is for.",
    "In a sentence or two, describe `{name}`.",
    "I found `{name}` in the Python standard library. What is it?",
)
_TOPIC_QUESTIONS = (
    "Tell me about {name} in Python.",
    "How does Python handle {name}?",
)


def _paragraphs(text: str) -> list[str]:
  """Whitespace-normalised paragraphs, without reST underlines such as '*****'."""
  out = []
  for para in text.split("\n\n"):
    words = [w for w in para.split() if w.strip("*=-~^#")]
    if words:
      out.append(" ".join(words))
  return out


def chat_records(docs: Sequence[dict], max_records: int = 4000) -> list[dict]:
  """Question/answer conversations whose answers are the documents' own first paragraphs.

  About one in four records has a follow-up turn answered by the next paragraph, so SFT data
  contains multi-turn conversations (and the loss mask is exercised on more than one turn).
  """
  records = []
  for doc in docs:
    paras = [p for p in _paragraphs(doc["text"]) if len(p) >= 40]
    if not paras or doc["kind"] == "comment":
      continue
    h = doc_hash(doc["text"])
    if doc["kind"] == "topic":
      question = _TOPIC_QUESTIONS[h % len(_TOPIC_QUESTIONS)].format(name=doc["title"])
    else:
      question = _QUESTIONS[h % len(_QUESTIONS)].format(name=doc["title"])
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": paras[0][:1200]},  # cap keeps answers SFT-sized
    ]
    if len(paras) > 1 and (h >> 8) % 4 == 0:
      messages += [
          {"role": "user", "content": "Can you tell me more?"},
          {"role": "assistant", "content": paras[1][:1200]},
      ]
    records.append({"messages": messages})
    if len(records) >= max_records:
      break
  return records


def write_jsonl(records: Sequence[dict], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
