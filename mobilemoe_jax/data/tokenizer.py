r"""Tokenizers: a SentencePiece model trained on the bundled corpus, or a HF tokenizer.json
(e.g. the released MobileMoE's Llama-3 byte-level BPE, read from a snapshot directory).

Both backends sit behind one `Tokenizer` class with the same methods, so the pipeline never
branches on where the vocabulary came from. Nothing here downloads: paths must be local files.

Special ids of the SentencePiece models we train: pad=0, unk=1, bos=2, eos=3, followed by the
chat pieces (user-defined symbols, so they are single tokens that never merge).

Chat templates (`CHAT_TEMPLATES`), chosen from the vocabulary (or by name):

  bundled    <bos><|user|>question<|end|><|assistant|>answer<|end|>...<eos>
  mobilemoe  <|begin_of_text|><|header_start|>user<|header_end|>\n\nquestion<|eot|>
             <|header_start|>assistant<|header_end|>\n\nanswer<|eot|>...   (no trailing eos)
             chosen when <|header_start|>, <|header_end|> and <|eot|> are single tokens.

`encode_chat` returns (ids, loss_mask) where the mask is 1 only on assistant content and the
end piece that closes an assistant turn (the model must learn to stop), 0 on everything else.
`chat_prompt` is the generation prompt: the conversation plus the assistant header. When a
snapshot's tokenizer_config.json carries a Jinja `chat_template`, the first chat encoding
checks that the native template gives the same ids as that Jinja rendering, and refuses the
tokenizer if not (SFT needs the per-message mask, which a rendered string cannot give).

Stop ids (`stop_ids`): the eos, the template's end piece, every eos-like special token of the
vocabulary, and the `eos_token_id`s of a config.json / generation_config.json beside it.
"""

import dataclasses
import io
import json
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
# Files of a HF tokenizer directory (a released snapshot, or one we export).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How a conversation becomes text. The conversation always starts with <bos>."""
  name: str
  header: str           # opens a message; "{role}" is replaced by the role
  end: str              # closes a message; a single vocabulary piece, also a stop token
  close_with_eos: bool  # SFT rows end with <eos> after the last message

  def jinja(self) -> str:
    """The same template as a HF `chat_template` (Jinja), for tokenizer_config.json."""
    before, after = self.header.split("{role}")
    q = lambda text: json.dumps(text)  # a JSON string literal is a valid Jinja literal
    message = f"{q(before)} + message['role'] + {q(after)} + message['content'] + {q(self.end)}"
    return ("{{- bos_token }}{%- for message in messages %}"
            f"{{{{- {message} }}}}"
            "{%- endfor %}{%- if add_generation_prompt %}"
            f"{{{{- {q(self.header.format(role='assistant'))} }}}}{{%- endif %}}")


CHAT_TEMPLATES = {
    "bundled": ChatTemplate("bundled", header="<|{role}|>", end=END_PIECE, close_with_eos=True),
    # The released MobileMoE's header protocol (Llama-3 ids, new names).
    "mobilemoe": ChatTemplate("mobilemoe", header="<|header_start|>{role}<|header_end|>\n\n",
                              end="<|eot|>", close_with_eos=False),
}
_MOBILEMOE_PIECES = ("<|header_start|>", "<|header_end|>", "<|eot|>")


class Tokenizer:
  """Text <-> ids, plus the chat template. Construct with `load_tokenizer(path)`."""

  def __init__(self, path: str, backend, pad_id: int, bos_id: int, eos_id: int,
               template: str = "bundled", extra_stop_ids: Sequence[int] = (),
               jinja_template: str | None = None, files: dict | None = None):
    self.path = path
    self._backend = backend  # sentencepiece.SentencePieceProcessor or tokenizers.Tokenizer
    self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
    self._is_spm = hasattr(backend, "encode_as_ids")
    if template not in CHAT_TEMPLATES:
      raise ValueError(f"unknown chat template {template!r}; known: {sorted(CHAT_TEMPLATES)}")
    self.template = CHAT_TEMPLATES[template]
    self._end = self.piece_ids(self.template.end)
    stops = [eos_id, *(self._end if len(self._end) == 1 else []), *extra_stop_ids]
    self.stop_ids = tuple(dict.fromkeys(int(i) for i in stops))  # eos first, each once
    self._jinja = jinja_template            # checked against the native template, then None
    self.files = files or {}                # name -> path of the files it was read from

  def piece_ids(self, piece: str) -> list[int]:
    """Ids of a template piece such as "<|end|>": one id if the vocabulary has it."""
    if self._is_spm:
      pid = self._backend.piece_to_id(piece)
      return [pid] if pid != self._backend.unk_id() else self.encode(piece)
    pid = self._backend.token_to_id(piece)
    return [pid] if pid is not None else self.encode(piece)

  @property
  def vocab_size(self) -> int:
    """Rows the embedding needs: the largest id + 1 (HF added tokens may leave gaps)."""
    if self._is_spm:
      return self._backend.get_piece_size()
    return max(self._backend.get_vocab(with_added_tokens=True).values()) + 1

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
    self._check_jinja()
    ids, mask = self._conversation(messages)
    if self.template.close_with_eos:
      ids.append(self.eos_id)
      mask.append(0.0)  # the closing end piece already teaches the model to stop
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)

  def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
    """Ids that ask the model for the next assistant turn: the conversation + the assistant
    header. Generation stops at any of `stop_ids`."""
    self._check_jinja()
    return self._conversation(messages)[0] + self._header_ids("assistant")

  def _conversation(self, messages: Sequence[dict]) -> tuple[list[int], list[float]]:
    ids, mask = [self.bos_id], [0.0]
    for i, message in enumerate(messages):
      role, content = message.get("role"), message.get("content")
      if role not in ROLE_PIECES or not isinstance(content, str):
        raise ValueError(
            f"message {i}: expected role in {sorted(ROLE_PIECES)} and string content, "
            f"got role={role!r} content type {type(content).__name__}"
        )
      weight = 1.0 if role == "assistant" else 0.0
      turn, n_header = self._message(role, content)
      ids += turn
      mask += [0.0] * n_header + [weight] * (len(turn) - n_header)
    return ids, mask

  def _header_ids(self, role: str) -> list[int]:
    header = self.template.header.format(role=role)
    # SentencePiece prefixes every encode call with "▁": keep a header piece whole.
    return self.piece_ids(header) if self._is_spm else self.encode(header)

  def _message(self, role: str, content: str) -> tuple[list[int], int]:
    """One message's ids and how many of them are its header (never trained on)."""
    head = self._header_ids(role)
    if self._is_spm:
      return head + self.encode(content) + self._end, len(head)
    # Byte-level BPE: header text and content are one string, as in a rendered template, so
    # a merge across the boundary (the "\n\n" before the content) comes out the same. The
    # content starts at the first token where the header's own encoding stops matching.
    ids = self.encode(self.template.header.format(role=role) + content)
    n = 0
    while n < min(len(ids), len(head)) and ids[n] == head[n]:
      n += 1
    return ids + self._end, n

  def _check_jinja(self):
    """The native template must give the ids of the snapshot's own Jinja template; checked
    on the first chat encoding, and again on every one while it fails."""
    if self._jinja is None:
      return
    where = self.files.get("tokenizer_config.json", self.path)
    probe = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Name one JVM language."},
             {"role": "assistant", "content": "Kotlin."},
             {"role": "user", "content": " Another one?\n"}]
    specials = {"bos_token": self._backend.id_to_token(self.bos_id),
                "eos_token": self._backend.id_to_token(self.eos_id)}
    try:
      want = self.encode(render_jinja(self._jinja, probe, add_generation_prompt=True, **specials))
    except Exception as e:  # jinja2 raises many types (syntax, undefined, raise_exception)
      raise ValueError(f"{where}: its chat_template does not render a conversation: {e!r}"
                       ) from None
    got = self._conversation(probe)[0] + self._header_ids("assistant")
    if got != want:
      raise ValueError(
          f"{where}: its chat_template renders a conversation to ids {want} but the native "
          f"{self.template.name!r} template gives {got}; SFT masks need the native template, "
          f"so it must match (or pass another chat_template to load_tokenizer)")
    self._jinja = None  # checked: the same ids


def render_jinja(source: str, messages: Sequence[dict], add_generation_prompt: bool,
                 **special_tokens) -> str:
  """A HF `chat_template` rendered as transformers renders it (sandboxed, trimmed blocks)."""
  from jinja2.exceptions import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(source).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt, **special_tokens)


def load_tokenizer(path: str, chat_template: str | None = None) -> Tokenizer:
  """Loads a SentencePiece `.model`, a HF `tokenizer.json`, or a directory holding either
  (a snapshot: tokenizer.json, tokenizer_config.json, config.json, generation_config.json).

  chat_template: a name in CHAT_TEMPLATES; None picks "mobilemoe" when the vocabulary has its
  pieces, else "bundled", and checks it against tokenizer_config.json's Jinja template.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in ("tokenizer.json", "tokenizer.model", "spm.model"):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name), chat_template)
    raise FileNotFoundError(f"no tokenizer.json, tokenizer.model or spm.model in {path!r}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path!r}")
  from mobilemoe_jax.data import integrity

  integrity.check_file(path)
  if path.endswith(".json"):
    return _load_hf(path, chat_template)
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor()
  try:
    sp.load(path)
  except (OSError, RuntimeError) as e:
    raise ValueError(f"not a SentencePiece model: {path!r} ({e})") from None
  pad = sp.pad_id()
  if pad < 0 or sp.bos_id() < 0 or sp.eos_id() < 0:
    raise ValueError(f"SentencePiece model {path!r} lacks pad/bos/eos ids")
  return Tokenizer(path, sp, pad_id=pad, bos_id=sp.bos_id(), eos_id=sp.eos_id(),
                   template=chat_template or "bundled", files={"tokenizer.model": path})


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read {path!r}: {e}") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path!r}: expected a JSON object")
  return data


def _token_text(value):
  """A tokenizer_config special token: a string or {"content": string}."""
  return value.get("content") if isinstance(value, dict) else value


def _config_ids(path: str, field: str) -> list[int]:
  """`field` of a config.json / generation_config.json (an int, a list of ints, or absent)."""
  value = _read_json(path).get(field)
  values = value if isinstance(value, list) else [] if value is None else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise ValueError(f"{path!r}: {field} must be an int or a list of ints, got {value!r}")
  return values


def _load_hf(path: str, chat_template: str | None) -> Tokenizer:
  import tokenizers

  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # the library raises a bare Exception on malformed JSON
    raise ValueError(f"not a HF tokenizer.json: {path!r} ({e})") from None
  directory = os.path.dirname(path)
  names = (*TOKENIZER_FILES, "config.json", "generation_config.json")
  files = {n: os.path.join(directory, n) for n in names
           if os.path.isfile(os.path.join(directory, n))}
  files["tokenizer.json"] = path
  config = _read_json(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}

  def token_id(name):
    """The id of tokenizer_config's `<name>_token`, else the first known candidate."""
    text = _token_text(config.get(f"{name}_token"))
    if text is not None:
      tid = tok.token_to_id(text)
      if tid is None:
        raise ValueError(f"{files['tokenizer_config.json']}: {name}_token {text!r} is not in "
                         f"{path!r}")
      return tid
    found = [tok.token_to_id(c) for c in _HF_CANDIDATES[name] if tok.token_to_id(c) is not None]
    return found[0] if found else None

  ids = {name: token_id(name) for name in _HF_CANDIDATES}
  if ids["eos"] is None:
    raise ValueError(f"HF tokenizer {path!r} has none of the eos tokens {_HF_CANDIDATES['eos']}")
  # Without a bos token, documents start with eos (a common GPT-2 style convention).
  bos = ids["bos"] if ids["bos"] is not None else ids["eos"]
  pad = ids["pad"] if ids["pad"] is not None else 0  # padding is masked anyway
  added = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
  stops = [added[c] for c in _HF_CANDIDATES["eos"] if c in added]
  for name in ("config.json", "generation_config.json"):
    if name in files:
      stops += _config_ids(files[name], "eos_token_id")
  jinja = config.get("chat_template")
  if isinstance(jinja, list):  # named templates: [{"name": ..., "template": ...}, ...]
    jinja = next((t.get("template") for t in jinja if t.get("name") == "default"), None)
  if chat_template is None:
    has_pieces = all(tok.token_to_id(p) is not None for p in _MOBILEMOE_PIECES)
    chat_template = "mobilemoe" if has_pieces else "bundled"
  else:
    jinja = None  # a template chosen by name is the caller's decision: nothing to check
  return Tokenizer(path, tok, pad_id=pad, bos_id=bos, eos_id=ids["eos"], template=chat_template,
                   extra_stop_ids=stops, jinja_template=jinja, files=files)


def spm_to_tokenizer_json(model_path: str) -> str:
  """One of our SentencePiece models as a HF tokenizer.json with the same ids (checked in
  tests on text and chat), BOS added by the post-processor as our documents start.

  Exact for what `train_sentencepiece` writes: unigram, identity normalisation, a dummy "▁"
  prefix, spaces as "▁", whitespace-split pieces, byte fallback. The chat pieces and pad /
  unk / bos / eos become special added tokens, so text between them is encoded per segment,
  as `encode_chat` does (SentencePiece itself would not split raw text at a chat piece).
  """
  import tokenizers
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, "rb") as f:
    proto.ParseFromString(f.read())
  norm, trainer = proto.normalizer_spec, proto.trainer_spec
  got = dict(model_type=trainer.model_type, normalization=norm.name,
             charsmap=bool(norm.precompiled_charsmap), add_dummy_prefix=norm.add_dummy_prefix,
             escape_whitespaces=norm.escape_whitespaces,
             remove_extra_whitespaces=norm.remove_extra_whitespaces,
             split_by_whitespace=trainer.split_by_whitespace, byte_fallback=trainer.byte_fallback)
  want = dict(model_type=trainer.UNIGRAM, normalization="identity", charsmap=False,
              add_dummy_prefix=True, escape_whitespaces=True, remove_extra_whitespaces=False,
              split_by_whitespace=True, byte_fallback=True)
  wrong = {k: v for k, v in got.items() if v != want[k]}
  if wrong:
    raise ValueError(f"{model_path}: cannot convert this SentencePiece model exactly: {wrong} "
                     f"(convertible: {want}, as train_sentencepiece writes)")
  kinds = proto.SentencePiece
  tok = tokenizers.Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces],
                                            unk_id=trainer.unk_id, byte_fallback=True))
  # Normalising after the special tokens are split gives each segment its dummy prefix.
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                         normalizers.Replace(" ", "▁")])
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never",
                                                split=True)
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                          if p.type in (kinds.CONTROL, kinds.UNKNOWN, kinds.USER_DEFINED)])
  bos = proto.pieces[trainer.bos_id].piece
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, trainer.bos_id)])
  return tok.to_str()


def write_tokenizer_files(tokenizer, out_dir: str, model_max_length: int | None = None) -> dict:
  """Writes a HF tokenizer directory (tokenizer.json, tokenizer_config.json,
  special_tokens_map.json) so `AutoTokenizer.from_pretrained(out_dir)` gives our ids offline.

  tokenizer: a `Tokenizer` or a path for `load_tokenizer`. A tokenizer.json source is copied
  byte for byte, with its tokenizer_config.json / special_tokens_map.json when present (a
  released snapshot round-trips unchanged); a SentencePiece model is converted
  (`spm_to_tokenizer_json`). Returns the ids for config.json / generation_config.json:
  {"bos_token_id", "eos_token_id" (the stop ids: one int or a list), "pad_token_id"}.
  """
  tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
  os.makedirs(out_dir, exist_ok=True)
  dest = lambda name: os.path.join(out_dir, name)
  if tok._is_spm:
    with open(dest("tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(spm_to_tokenizer_json(tok.path))
  for name in TOKENIZER_FILES:
    if name in tok.files and os.path.abspath(tok.files[name]) != os.path.abspath(dest(name)):
      with open(tok.files[name], "rb") as src, open(dest(name), "wb") as f:
        f.write(src.read())
  piece = lambda i: tok._backend.id_to_piece(i) if tok._is_spm else tok._backend.id_to_token(i)
  specials = {"bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
              "pad_token": piece(tok.pad_id)}
  if "tokenizer_config.json" not in tok.files:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "clean_up_tokenization_spaces": False, "chat_template": tok.template.jinja()}
    if model_max_length:
      config["model_max_length"] = int(model_max_length)
    with open(dest("tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
  if "special_tokens_map.json" not in tok.files:
    with open(dest("special_tokens_map.json"), "w", encoding="utf-8") as f:
      json.dump(specials, f, indent=2, ensure_ascii=False)
  stops = list(tok.stop_ids)
  return {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
          "pad_token_id": tok.pad_id}


# Llama-3's pre-tokenizer split: contractions, letter runs, 1-3 digits, punctuation runs,
# newline runs, other whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The released MobileMoE's special tokens at their ids (notes: Llama-3 ids, new chat names);
# the other ids of 128000..128255 are reserved.
LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                   128005: "<|header_start|>", 128006: "<|header_end|>", 128008: "<|eot|>"}
LLAMA3_BASE_VOCAB, LLAMA3_VOCAB = 128000, 128256


def train_llama3_style_bpe(texts: Iterable[str], out_dir: str, vocab_size: int = 1000) -> str:
  """A small tokenizer laid out like the released MobileMoE's (for tests and synthetic
  snapshots): Llama-3 pre-tokenizer regex + byte-level BPE learned on `texts` (ids below
  `vocab_size`), special tokens at their real ids 128000..128255, BOS added by the
  post-processor, and the mobilemoe chat template. Writes tokenizer.json and
  tokenizer_config.json into out_dir; returns out_dir."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  spec = json.loads(tok.to_str())
  # tokenizers numbers added tokens after the model vocabulary, so unreachable fillers (no
  # merge produces them) take the ids up to 128000, as in Llama-3.
  vocab = spec["model"]["vocab"]
  vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), LLAMA3_BASE_VOCAB)})
  tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
  reserved = (f"<|reserved_special_token_{k}|>" for k in range(LLAMA3_VOCAB))
  tok.add_special_tokens([
      tokenizers.AddedToken(LLAMA3_SPECIALS.get(i) or next(reserved), special=True, normalized=False)
      for i in range(LLAMA3_BASE_VOCAB, LLAMA3_VOCAB)])
  bos = LLAMA3_SPECIALS[128000]
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                    special_tokens=[(bos, 128000)])])
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
            "eos_token": LLAMA3_SPECIALS[128001], "clean_up_tokenization_spaces": False,
            "model_max_length": 8192, "chat_template": CHAT_TEMPLATES["mobilemoe"].jinja()}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return out_dir


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
