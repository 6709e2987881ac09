"""Running an exported `.tflite` with ai_edge_litert: prefill + decode with the external KV
cache, greedy or sampled generation, optional tokenizer.

  python -m export.runner model.tflite --tokenizer tok.model --prompt "def main" --max-new 32
"""
import argparse
import re

import numpy as np

# Custom ops that only export/delegate runs: moe_op.OP_NAME (--moe delegate) and
# attention_op.OP_NAME (--attention delegate). Names here so that running a file does not
# import the exporter's torch modules (tests/test_attention_op.py checks they agree).
DELEGATE_OPS = ('MobileMoeBlock', 'MobileKvAttention')
# A layer's cache tensors `kv_cache_<part>_<layer>` (and returned rows `new_<part>_<layer>`):
# k [1, K, S, Dh] and v [1, K, Dh, S], f32 or int8; an int8 cache adds its f32 scales
# k_scale / v_scale [1, K, S] (one per token and KV head).
CACHE_PARTS = ('k', 'v', 'k_scale', 'v_scale')


def delegate_ops(path_or_bytes) -> list:
  """The custom ops of a .tflite that need export/delegate loaded (DELEGATE_OPS), sorted;
  empty for a file the stock runtime runs."""
  import mmap
  from ai_edge_litert import schema_py_generated as schema
  if isinstance(path_or_bytes, (bytes, bytearray)):
    return _delegate_ops(schema.Model.GetRootAs(path_or_bytes, 0))
  with open(path_or_bytes, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
    return _delegate_ops(schema.Model.GetRootAs(buf, 0))   # reads the operator codes only


def _delegate_ops(model) -> list:
  codes = {model.OperatorCodes(i).CustomCode() for i in range(model.OperatorCodesLength())}
  return [n for n in DELEGATE_OPS if n.encode() in codes]


def needs_delegate(path_or_bytes) -> bool:
  """True if the file has MobileMoeBlock or MobileKvAttention nodes: run it with
  LiteRTLM(path, delegate=export.delegate.load())."""
  return bool(delegate_ops(path_or_bytes))


class _Signature:
  """One signature's subgraph: its input/output tensor indices and numpy views of its
  cache inputs (the interpreter's own buffers)."""

  def __init__(self, interp, key):
    # The pybind wrapper's subgraph-aware calls (ai-edge-litert 2.3's private API: the public
    # SignatureRunner copies every input, the whole cache, per call).
    w = getattr(interp, '_interpreter', None)
    need = ('GetSubgraphIndexFromSignature', 'AllocateTensors', 'tensor', 'Invoke')
    if w is None or not all(hasattr(w, n) for n in need) or not hasattr(interp, '_get_full_signature_list'):
      import ai_edge_litert
      raise RuntimeError('export.runner needs the interpreter wrapper calls of ai-edge-litert '
                         f'2.3 ({", ".join(need)}); this is {getattr(ai_edge_litert, "__version__", "?")}')
    d = interp._get_full_signature_list()[key]
    self.w = w
    self.sg = w.GetSubgraphIndexFromSignature(key)
    self.inputs, self.outputs = d['inputs'], d['outputs']
    w.AllocateTensors(self.sg)               # shapes are static: the arena is planned once
    # Graph inputs keep their arena slot for the subgraph's lifetime and no op writes them,
    # so values written here persist across invocations (tests/test_export_litert.py).
    self.cache = {n: w.tensor(w, i, self.sg) for n, i in self.inputs.items()
                  if n.startswith('kv_cache_')}
    for v in self.cache.values():
      v.fill(0)                              # never uninitialized memory (0 * NaN = NaN)
    # Views of the tokens / positions inputs and of every output: a step writes and reads
    # them in place (GetTensor / SetTensor are a call and a copy each; ~40 per decode step).
    self.views = {n: w.tensor(w, i, self.sg) for n, i in {**self.inputs, **self.outputs}.items()
                  if not n.startswith('kv_cache_')}


class LiteRTLM:
  """Prefill/decode over the external KV cache. The cache lives in the decode signature's
  input buffers (zero copy: numpy views of them); each call writes the rows a signature
  returns (`new_{k,v}_<i>`) into it, so a decode step copies no cache. A prefill
  signature has its own input buffers: the filled slots are copied into them per call.

  decode_delegate: run the decode signature on a second interpreter of the same file, with
  XNNPACK on one thread and this delegate (export.delegate.load(fully_connected=True))
  running every heavy op of the step on its own pool: on 2 cores that saves the hand-offs
  between two thread pools in every layer (export/delegate/README.md, "Threads"). Prefill,
  matmul-bound, stays on the first interpreter with num_threads XNNPACK threads.
  op_resolver_type: the interpreters' ai_edge_litert OpResolverType (None: AUTO, i.e.
  XNNPACK; BUILTIN_WITHOUT_DEFAULT_DELEGATES runs TFLite's builtin kernels instead)."""

  def __init__(self, path: str, num_threads: int = 2, delegate=None, decode_delegate=None,
               op_resolver_type=None):
    from ai_edge_litert.interpreter import Interpreter
    if delegate is None and needs_delegate(path):
      raise ValueError(f'{path} has {", ".join(delegate_ops(path))} custom ops, which only '
                       'export/delegate runs: pass delegate=export.delegate.load() '
                       '(python -m export.runner --delegate)')
    kw = {'experimental_delegates': [delegate]} if delegate is not None else {}
    if op_resolver_type is not None:
      kw['experimental_op_resolver_type'] = op_resolver_type
    self.interp = Interpreter(model_path=path, num_threads=num_threads, **kw)
    self.decode_interp = self.interp
    if decode_delegate is not None:
      self.decode_interp = Interpreter(model_path=path, num_threads=1, **dict(
          kw, experimental_delegates=[decode_delegate]))
    sigs = self.interp.get_signature_list()
    self.prefill_lens = sorted(int(m.group(1)) for s in sigs if (m := re.fullmatch(r'prefill_(\d+)', s)))
    if 'decode' not in sigs or not self.prefill_lens:
      raise ValueError(f'{path}: expected prefill_<T> and decode signatures, found {sorted(sigs)}')
    self.runners = {s: self.interp.get_signature_runner(s) for s in sigs}   # (details)
    self._sigs = {s: _Signature(self.decode_interp if s == 'decode' else self.interp, s)
                  for s in sigs}
    dec = self._sigs['decode']
    self.kv_names = sorted(dec.cache)
    if any(f'new_{n[len("kv_cache_"):]}' not in dec.outputs for n in self.kv_names):
      raise ValueError(f'{path}: decode returns no new_k_<i>/new_v_<i> rows (a .tflite from '
                       'before the in-place KV cache: re-export it)')
    self.kv_len = int(dec.cache[self.kv_names[0]].shape[2])
    self._cache = dec.cache
    # Per signature: (a new_<part>_<i> output index, the cache tensor it fills [K, ...], part).
    layers = sorted({n.rsplit('_', 1)[1] for n in self.kv_names}, key=int)
    parts = [p for p in CACHE_PARTS if f'kv_cache_{p}_{layers[0]}' in dec.cache]
    self._rows = {key: [(sg.views[f'new_{p}_{i}'][0], dec.cache[f'kv_cache_{p}_{i}'][0], p)
                        for i in layers for p in parts] for key, sg in self._sigs.items()}
    # 'last': the prefill signatures take `last_index` and return that token's logits only
    # (export --prefill-logits last); 'all': logits for every position.
    ins = self._sigs[f'prefill_{self.prefill_lens[0]}'].inputs
    self.prefill_logits = 'last' if 'last_index' in ins else 'all'
    self.reset()

  @property
  def kv(self) -> dict:
    """The cache {input name: view of the decode signature's buffer}: k [1, K, S, Dh],
    v [1, K, Dh, S] (f32, or int8 with scales [1, K, S]); slots < pos are filled. Copy it to keep it; assigning a dict of
    arrays copies them in (with pos, to go back to a saved context)."""
    return dict(self._cache)

  @kv.setter
  def kv(self, values: dict):
    for n, v in self._cache.items():
      v[...] = values[n]

  def reset(self):
    for v in self.kv.values():
      v.fill(0)
    self.pos = 0

  def _run(self, sig, tokens, pos, n_new, **extra):
    """Runs signature `sig` on tokens at positions pos..., writes its first n_new rows of
    K/V into the cache at pos[0] and returns the logits [T or 1, V] (a copy)."""
    s = self._sigs[sig]
    p0 = int(pos[0])
    s.views['tokens'][...] = tokens
    s.views['input_pos'][...] = pos
    for n, v in extra.items():
      s.views[n][...] = v
    if sig != 'decode' and p0:                  # a prefill's own buffers: the filled slots
      for n, dst in s.cache.items():
        src = self._cache[n]
        if n.startswith('kv_cache_k'):
          dst[:, :, :p0] = src[:, :, :p0]
        else:
          dst[..., :p0] = src[..., :p0]
    s.w.Invoke(s.sg)
    end = p0 + n_new
    for out, dst, part in self._rows[sig]:            # out: [T, K, Dh], or [T, K] (scales)
      if n_new == 1:                  # a decode step: one slot, indexed (no transposed views)
        if part == 'v':
          dst[:, :, p0] = out[0]
        else:
          dst[:, p0] = out[0]
      elif part == 'v':
        dst[:, :, p0:end] = out[:n_new].transpose(1, 2, 0)
      else:
        dst[:, p0:end] = out[:n_new].swapaxes(0, 1)
    return s.views['logits'][0].copy()

  def prefill(self, ids) -> np.ndarray:
    """Feeds ids (in chunks of the prefill lengths) after what is cached; returns their
    logits [len(ids), V]. A padded chunk's extra tokens are computed but not written to
    the cache (and the causal mask keeps them from the real ones)."""
    if self.prefill_logits != 'all':
      raise ValueError('this .tflite was exported with --prefill-logits last: its prefill '
                       'returns only the last token\'s logits; use prefill_last(), or export '
                       'with --prefill-logits all for per-position logits (scoring)')
    return np.concatenate(self._prefill(ids))

  def prefill_last(self, ids) -> np.ndarray:
    """Feeds ids like prefill() and returns only the logits after the last one [V]
    (what generation samples from); works with either kind of file."""
    if not len(ids):
      raise ValueError('prefill_last needs at least one id')
    return self._prefill(ids)[-1][-1]

  def _prefill(self, ids) -> list:
    """Logits per chunk: [n, V] each, or [1, V] (its last real token) for a 'last' file."""
    ids = np.asarray(ids, np.int32)
    if self.pos + len(ids) > self.kv_len:
      raise ValueError(f'{self.pos + len(ids)} tokens exceed the KV cache ({self.kv_len})')
    out = []
    while len(ids):
      fits = [t for t in self.prefill_lens if t >= len(ids)]
      t = fits[0] if fits else self.prefill_lens[-1]
      chunk, ids = ids[:t], ids[t:]
      n = len(chunk)
      if self.pos + t > self.kv_len:      # a padded tail would write past the cache
        for tok in chunk:
          out.append(self.decode(tok)[None])
        continue
      tokens = np.zeros((1, t), np.int32)
      tokens[0, :n] = chunk
      extra = {'last_index': np.array([n - 1], np.int32)} if self.prefill_logits == 'last' else {}
      logits = self._run(f'prefill_{t}', tokens, np.arange(self.pos, self.pos + t), n, **extra)
      out.append(logits if extra else logits[:n])
      self.pos += n
    return out

  def decode(self, token) -> np.ndarray:
    if self.pos >= self.kv_len:
      raise ValueError(f'KV cache full ({self.kv_len})')
    logits = self._run('decode', np.array([[token]]), np.array([self.pos]), 1)[0]
    self.pos += 1
    return logits

  def generate(self, prompt_ids, max_new: int, temperature=0.0, top_k=0, seed=0, eos_id=None):
    rng = np.random.default_rng(seed)
    self.reset()
    logits = self.prefill_last(prompt_ids)
    out = []
    for _ in range(max_new):
      tok = sample(logits, rng, temperature, top_k)
      out.append(tok)
      if tok == eos_id or self.pos >= self.kv_len:
        break
      logits = self.decode(tok)
    return out


# Sentence starts in the style of the bundled corpus (stdlib docs): prompts for checking
# that the .tflite and a reference continue text the same way (random token ids are not
# text: a trained model's top logits are near-ties there).
PROMPTS = ('Return the number of items in a', 'If the file does not exist',
           'The default value of this argument is', 'This module provides functions for',
           'Raise a ValueError if the', 'The following example shows how to',
           'Create a new socket using the given address family', 'Return True if the string')


def greedy_agreement(lm, reference, prompt_ids, n_steps: int) -> dict:
  """The .tflite's greedy continuation of prompt_ids vs a reference model's.
  reference(ids) -> next-token logits [V] after ids (a full forward).
  Returns {'agree': steps before the first different token, 'tflite': tokens,
  'reference': tokens} and, at a divergence, how close a call it was: 'ref_margin' =
  reference logit of its token minus that of the .tflite's token, 'tflite_margin' the
  reverse (both small: a near-tie)."""
  got = lm.generate(list(prompt_ids), n_steps)
  ids, ref = list(prompt_ids), []
  for i, tok in enumerate(got):
    logits = np.asarray(reference(ids))
    ref.append(int(np.argmax(logits)))
    if ref[-1] != tok:
      lm.reset()
      tfl = lm.prefill_last(ids)
      return {'agree': i, 'tflite': got, 'reference': ref,
              'ref_margin': float(logits[ref[-1]] - logits[tok]),
              'tflite_margin': float(tfl[tok] - tfl[ref[-1]])}
    ids.append(tok)
  return {'agree': len(got), 'tflite': got, 'reference': ref}


def sample(logits, rng, temperature: float, top_k: int = 0) -> int:
  if temperature <= 0:
    return int(np.argmax(logits))
  z = logits.astype(np.float64) / temperature
  if top_k:
    z[z < np.sort(z)[-top_k]] = -np.inf
  p = np.exp(z - z.max())
  return int(rng.choice(len(p), p=p / p.sum()))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('model')
  ap.add_argument('--tokenizer', help='SentencePiece .model or tokenizer.json')
  ap.add_argument('--prompt', default='')
  ap.add_argument('--ids', help='comma-separated prompt ids (without a tokenizer)')
  ap.add_argument('--max-new', type=int, default=32)
  ap.add_argument('--temperature', type=float, default=0.0)
  ap.add_argument('--top-k', type=int, default=0)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--delegate', action='store_true',
                  help='load export/delegate (files with MobileMoeBlock / MobileKvAttention '
                       'ops need it; loaded for them anyway)')
  ap.add_argument('--decode-fc', action='store_true',
                  help='decode on a second interpreter: XNNPACK on 1 thread, every INT4 FC on '
                       "the delegate's pool (LiteRTLM decode_delegate; INT4 files)")
  a = ap.parse_args(argv)
  tok = None
  if a.tokenizer:
    from mobilemoe_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(a.tokenizer)
    ids = [tok.bos_id] + tok.encode(a.prompt)
  elif a.ids:
    ids = [int(x) for x in a.ids.split(',')]
  else:
    ap.error('give --tokenizer and --prompt, or --ids')
  dlg = None
  if a.delegate or needs_delegate(a.model):
    from export import delegate
    dlg = delegate.load()
  dec = None
  if a.decode_fc:
    from export import delegate
    dec = delegate.load(num_threads=a.threads, fully_connected=True)
  lm = LiteRTLM(a.model, a.threads, dlg, decode_delegate=dec)
  out = lm.generate(ids, a.max_new, a.temperature, a.top_k, a.seed, tok.eos_id if tok else None)
  print(tok.decode(out) if tok else out)


if __name__ == '__main__':
  main()
