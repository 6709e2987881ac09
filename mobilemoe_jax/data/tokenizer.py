"""Tokenizers: a small SentencePiece model trained on the bundled corpus, or a HF tokenizer.json.

Both backends sit behind one `Tokenizer` class with the same methods, so the pipeline never
branches on where the vocabulary came from. Nothing here downloads: paths must be local files.

Special ids of the SentencePiece models we train: pad=0, unk=1, bos=2, eos=3, followed by the
chat-template pieces (user-defined symbols, so they are single tokens that never merge):

  <bos><|user|>question<|end|><|assistant|>answer<|end|>...<eos>

`encode_chat` returns (ids, loss_mask) where the mask is 1 only on assistant content and the
<|end|> that closes an assistant turn (the model must learn to stop), 0 on everything else.
"""

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
ROLE_PIECES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_PIECE = "<|end|>"
CHAT_PIECES = (*ROLE_PIECES.values(), END_PIECE)

# Names used for bos/eos/pad by common HF tokenizer.json files, tried in order.
_HF_CANDIDATES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
}


class Tokenizer:
  """Text <-> ids, plus the chat template. Construct with `load_tokenizer(path)`."""

  def __init__(self, path: str, backend, pad_id: int, bos_id: int, eos_id: int):
    self.path = path
    self._backend = backend  # sentencepiece.SentencePieceProcessor or tokenizers.Tokenizer
    self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
    self._is_spm = hasattr(backend, "encode_as_ids")
    # Role markers: single ids when the vocabulary has them, else the marker's own encoding.
    self._markers = {name: self.piece_ids(piece) for name, piece in ROLE_PIECES.items()}
    self._end = self.piece_ids(END_PIECE)

  def piece_ids(self, piece: str) -> list[int]:
    """Ids of a template piece such as "<|end|>": one id if the vocabulary has it."""
    if self._is_spm:
      pid = self._backend.piece_to_id(piece)
      return [pid] if pid != self._backend.unk_id() else self.encode(piece)
    pid = self._backend.token_to_id(piece)
    return [pid] if pid is not None else self.encode(piece)

  @property
  def vocab_size(self) -> int:
    if self._is_spm:
      return self._backend.get_piece_size()
    return self._backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Plain text -> ids, without bos/eos."""
    if self._is_spm:
      return self._backend.encode_as_ids(text)
    return self._backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._backend.decode([int(i) for i in ids])

  def encode_document(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """A pre-training document: <bos> text <eos>, every token a training target."""
    ids = np.asarray([self.bos_id, *self.encode(text), self.eos_id], np.int32)  # [n]
    return ids, np.ones(ids.shape, np.float32)

  def encode_chat(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """A conversation -> (ids int32[n], loss_mask float32[n]); weight only on assistant turns.

    loss_mask[i] is the weight of predicting ids[i] (the pipeline shifts both by one).
    """
    ids, mask = [self.bos_id], [0.0]
    for i, message in enumerate(messages):
      role, content = message.get("role"), message.get("content")
      if role not in ROLE_PIECES or not isinstance(content, str):
        raise ValueError(
            f"message {i}: expected role in {sorted(ROLE_PIECES)} and string content, "
            f"got role={role!r} content type {type(content).__name__}"
        )
      weight = 1.0 if role == "assistant" else 0.0
      header = self._markers[role]
      body = self.encode(content) + self._end
      ids += header + body
      mask += [0.0] * len(header) + [weight] * len(body)
    ids.append(self.eos_id)
    mask.append(0.0)  # the closing <|end|> already teaches the model to stop
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a SentencePiece `.model` or a HF `tokenizer.json` from a local path."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path!r}")
  from mobilemoe_jax.data import integrity

  integrity.check_file(path)
  if path.endswith(".json"):
    return _load_hf(path)
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor()
  try:
    sp.load(path)
  except (OSError, RuntimeError) as e:
    raise ValueError(f"not a SentencePiece model: {path!r} ({e})") from None
  pad = sp.pad_id()
  if pad < 0 or sp.bos_id() < 0 or sp.eos_id() < 0:
    raise ValueError(f"SentencePiece model {path!r} lacks pad/bos/eos ids")
  return Tokenizer(path, sp, pad_id=pad, bos_id=sp.bos_id(), eos_id=sp.eos_id())


def _load_hf(path: str) -> Tokenizer:
  import tokenizers

  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # the library raises a bare Exception on malformed JSON
    raise ValueError(f"not a HF tokenizer.json: {path!r} ({e})") from None
  ids = {}
  for name, candidates in _HF_CANDIDATES.items():
    found = [tok.token_to_id(c) for c in candidates if tok.token_to_id(c) is not None]
    ids[name] = found[0] if found else None
  if ids["eos"] is None:
    raise ValueError(f"HF tokenizer {path!r} has none of the eos tokens {_HF_CANDIDATES['eos']}")
  # Without a bos token, documents start with eos (a common GPT-2 style convention).
  bos = ids["bos"] if ids["bos"] is not None else ids["eos"]
  pad = ids["pad"] if ids["pad"] is not None else 0  # padding is masked anyway
  return Tokenizer(path, tok, pad_id=pad, bos_id=bos, eos_id=ids["eos"])


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str,
    vocab_size: int = 2048,
    model_type: str = "unigram",
    num_threads: int = 2,
) -> str:
  """Trains a lossless SentencePiece model (byte fallback, no normalisation) on `texts`."""
  import sentencepiece as spm

  def lines():
    # SentencePiece trains on sentences; newlines inside a document become byte pieces.
    for text in texts:
      for line in text.split("\n"):
        if line.strip():
          yield line

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines(),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=list(CHAT_PIECES),
      byte_fallback=True,  # any string encodes, so decode(encode(x)) == x
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,  # indentation and double spaces survive round trips
      max_sentence_length=16384,
      num_threads=num_threads,
      minloglevel=2,
  )
  os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
  tmp = model_path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, model_path)  # atomic: a crash never leaves half a model behind
  return model_path
