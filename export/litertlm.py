"""`.litertlm` bundles for Google's LiteRT-LM runtime (`litert_lm`, pip `litert-lm-api`), and
generation through it.

  python -m export --checkpoint DIR --out m.tflite --litertlm bundle_dir --tokenizer spm.model
  python -m export.litertlm bundle_dir/m.litertlm --prompt "Return the" --max-new 32 [--verbose]
  python -m export.litertlm BUNDLE --compare-runner m.tflite --tokenizer spm.model  # decode tok/s

The runtime's contract (export/README.md, "LiteRT-LM") is litert.ExportableLiteRTLM's
signature convention; `check_tflite` refuses anything else before the runtime sees it,
including the MobileMoeBlock / MobileKvAttention custom ops, which LiteRT-LM cannot run
(it takes no delegate or custom op kernel: README).
"""
import argparse
import os
import re
import tempfile
import time

from export.runner import delegate_ops


class NotRunnable(ValueError):
  """A .tflite or .litertlm that the LiteRT-LM runtime would refuse or run wrongly."""


def check_tflite(raw: bytes, where: str):
  """Raises NotRunnable (naming `where`) unless the flatbuffer follows the LiteRT-LM
  signature convention (litert.ExportableLiteRTLM) and has only stock ops."""
  from export import flatbuf
  ops = delegate_ops(raw)
  if ops:
    raise NotRunnable(
        f'{where} has {", ".join(ops)} custom ops, which only export/delegate runs: the '
        'LiteRT-LM runtime takes no TFLite delegate or custom op kernel (export/README.md, '
        'LiteRT-LM). Bundle a --moe portable --attention portable export.')
  model, _ = flatbuf.load(raw)
  sigs = flatbuf.signatures(model)
  prefill = sorted(s for s in sigs if re.fullmatch(r'prefill_\d+', s))
  if 'decode' not in sigs or not prefill:
    raise NotRunnable(f'{where}: LiteRT-LM needs prefill_<T> and decode signatures, '
                      f'found {sorted(sigs)}')
  ins, outs = sigs['decode']
  cache = sorted(n for n in ins if n.startswith('kv_cache_'))
  if not cache or any(n.startswith('new_') for n in outs):
    raise NotRunnable(f"{where}: the signatures follow export.runner's convention (cache "
                      'read only, new rows out), not LiteRT-LM\'s: export it with '
                      "convention='litertlm' (python -m export ... --litertlm DIR)")
  for s in prefill + ['decode']:
    ins, outs = sigs[s]
    want = set(cache) | ({'logits'} if s == 'decode' else set())
    if sorted(n for n in ins if n.startswith('kv_cache_')) != cache or set(outs) != want:
      raise NotRunnable(f'{where}: signature {s} has inputs {sorted(ins)} and outputs '
                        f'{sorted(outs)}; LiteRT-LM expects the cache {cache} in and out'
                        + (' and logits' if s == 'decode' else ' (and nothing else)'))
  shapes = {s: cache_shapes(model, s) for s in prefill + ['decode']}
  if any(v != shapes['decode'] for v in shapes.values()):
    raise NotRunnable(f'{where}: the cache inputs differ in shape between signatures '
                      f'{shapes}: LiteRT-LM binds one buffer per name to all of them')


def cache_shapes(model, key: str) -> dict:
  """{cache input name: shape} of signature `key` (a flatbuf.load model)."""
  for sd in model.signatureDefs:
    name = lambda b: b.decode() if isinstance(b, bytes) else b
    if name(sd.signatureKey) == key:
      tensors = model.subgraphs[sd.subgraphIndex].tensors
      return {name(t.name): tuple(tensors[t.tensorIndex].shape) for t in sd.inputs
              if name(t.name).startswith('kv_cache_')}
  raise KeyError(key)


def tflite_of(bundle_path: str) -> bytes:
  """The prefill/decode .tflite inside a .litertlm (litert-lm-builder's header schema)."""
  import io
  from litert_lm_builder import litertlm_header_schema_py_generated as schema
  from litert_lm_builder import litertlm_peek
  header = litertlm_peek.read_litertlm_header(bundle_path, io.StringIO())
  sections = header.SectionMetadata()
  found = []
  with open(bundle_path, 'rb') as f:
    for i in range(sections.ObjectsLength() if sections else 0):
      s = sections.Objects(i)
      if s.DataType() == schema.AnySectionDataType.TFLiteModel:
        f.seek(s.BeginOffset())
        found.append(f.read(s.EndOffset() - s.BeginOffset()))
  if len(found) != 1:
    raise NotRunnable(f'{bundle_path}: expected one TFLite model section, found {len(found)}')
  return found[0]


def bundle(tflite_path: str, out_dir: str, tokenizer_path: str, context_length: int) -> str:
  """Writes <out_dir>/<tflite name>.litertlm: the .tflite (checked: check_tflite), the
  SentencePiece tokenizer and the LlmMetadata (start token = bos, stop token = eos, our chat
  roles as prompt templates, max_num_tokens = context_length), with litert-lm-builder
  through litert-torch's wrapper. Returns its path."""
  from export import keep_jax_x64
  from mobilemoe_jax.data import tokenizer as tok_lib
  with open(tflite_path, 'rb') as f:
    check_tflite(f.read(), tflite_path)
  with keep_jax_x64():   # litert_torch turns on jax_enable_x64 process-wide when imported
    from litert_torch.generative.utilities import litertlm_builder
  if not litertlm_builder.is_litertlm_builder_available():
    raise RuntimeError('litert-lm-builder is not installed: cannot write a .litertlm')
  if not tokenizer_path.endswith('.model'):
    raise ValueError(f'--tokenizer {tokenizer_path}: the bundle takes a SentencePiece .model')
  tok = tok_lib.load_tokenizer(tokenizer_path)
  os.makedirs(out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory() as work:
    litertlm_builder.build_litertlm(
        tflite_path, work, out_dir, context_length, tokenizer_model_path=tokenizer_path,
        start_token_id=tok.bos_id, stop_token_ids=[tok.eos_id],
        user_prompt_prefix=tok_lib.ROLE_PIECES['user'], user_prompt_suffix=tok_lib.END_PIECE,
        model_prompt_prefix=tok_lib.ROLE_PIECES['assistant'], model_prompt_suffix=tok_lib.END_PIECE)
  name = os.path.splitext(os.path.basename(tflite_path))[0] + '.litertlm'
  return os.path.join(out_dir, name)


def runtime(verbose: bool = False):
  """The `litert_lm` module with its C++ runtime logging errors only (verbose: from INFO on,
  its default). A working bundle otherwise prints ~40 INFO/WARNING lines to stderr: the
  accelerator registry, and every section a text-only bundle has no use for (vision, audio,
  embedders). A failure's reason is logged at ERROR, so it still reaches stderr; it is the
  only place it appears (the Python exception names just the call that failed)."""
  import litert_lm
  litert_lm.set_min_log_severity(litert_lm.LogSeverity.INFO if verbose
                                 else litert_lm.LogSeverity.ERROR)
  return litert_lm


class Engine:
  """A checked `litert_lm.Engine` on the CPU (XNNPACK) with greedy generation; the runtime
  logs errors only unless `verbose` (`runtime`)."""

  def __init__(self, path: str, num_threads: int = 2, max_num_tokens: int = None,
               verbose: bool = False):
    check_tflite(tflite_of(path), path)          # before the runtime sees the file
    litert_lm = runtime(verbose)
    self.litert_lm = litert_lm
    self.engine = litert_lm.Engine(path, backend=litert_lm.Backend.CPU(thread_count=num_threads),
                                   max_num_tokens=max_num_tokens, enable_benchmark=True)

  def generate(self, prompt: str, max_new: int) -> tuple[str, dict]:
    """Greedy continuation of the raw text `prompt` (no chat template; the runtime adds
    the start token) -> (text, {'prefill_tokens_per_s', 'prefill_tokens',
    'decode_tokens_per_s', 'decode_tokens'} as the runtime measured them)."""
    lm = self.litert_lm
    s = self.engine.create_session(apply_prompt_template=False,
                                   sampler_config=lm.SamplerConfig(top_k=1),
                                   max_output_tokens=max_new)
    try:
      s.run_prefill([prompt])
      text = s.run_decode().texts[0]
      b = s.get_benchmark_info()
    finally:
      s.close()
    return text, {'prefill_tokens_per_s': b.last_prefill_tokens_per_second,
                  'prefill_tokens': b.last_prefill_token_count,
                  'decode_tokens_per_s': b.last_decode_tokens_per_second,
                  'decode_tokens': b.last_decode_token_count}

  def close(self):
    self.engine.close()


def agreement(bundle_path: str, tflite_path: str, tok, n_new: int = 16, prompts=None) -> dict:
  """Greedy continuations of text prompts (export.runner.PROMPTS) from LiteRT-LM on the
  bundle and from export.runner on tflite_path (the same model in the runner's convention;
  its delegate loaded when it needs one), compared as text (LiteRT-LM returns text):
  {'prompts', 'same_text', 'differing': [(prompt, litertlm text, runner text)]}."""
  from export.runner import PROMPTS, LiteRTLM
  eng = Engine(bundle_path)
  lm = LiteRTLM(tflite_path, delegate=_delegate_for(tflite_path))
  prompts = PROMPTS if prompts is None else prompts
  differing = []
  try:
    for p in prompts:
      got, _ = eng.generate(p, n_new)
      want = tok.decode(lm.generate([tok.bos_id] + tok.encode(p), n_new, eos_id=tok.eos_id))
      if got != want:
        differing.append((p, got, want))
  finally:
    eng.close()
  return {'prompts': len(prompts), 'same_text': len(prompts) - len(differing),
          'differing': differing}


def _delegate_for(tflite_path: str):
  """export/delegate loaded if the runner's file has its ops, else None."""
  from export.runner import needs_delegate
  if not needs_delegate(tflite_path):
    return None
  from export import delegate
  return delegate.load()


def runner_decode_speed(tflite_path: str, prompt_ids, n_new: int, num_threads: int = 2) -> dict:
  """Our runner (export.runner.LiteRTLM) on its own .tflite: greedy tokens and decode
  tokens/s (n_new decode steps after the prompt, best of 3)."""
  from export.runner import LiteRTLM
  lm = LiteRTLM(tflite_path, num_threads, delegate=_delegate_for(tflite_path))
  best = float('inf')
  for _ in range(3):
    out, seconds = timed_greedy_decode(lm, prompt_ids, n_new)
    best = min(best, seconds)
  return {'tokens': out, 'decode_tokens_per_s': n_new / best}


def timed_greedy_decode(lm, prompt_ids, n_new: int) -> tuple[list, float]:
  """export.runner.LiteRTLM from an empty cache: prefill prompt_ids, then n_new greedy decode
  steps -> (the n_new tokens, seconds the decode steps took; the prefill is not timed)."""
  lm.reset()
  logits = lm.prefill_last(prompt_ids)
  out = []
  t0 = time.perf_counter()
  for _ in range(n_new):
    out.append(int(logits.argmax()))
    logits = lm.decode(out[-1])
  return out, time.perf_counter() - t0


def cpu_model() -> str:
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  return 'unknown'


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('bundle', help='a .litertlm')
  ap.add_argument('--prompt', default='Return the number of items in a')
  ap.add_argument('--max-new', type=int, default=32)
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--compare-runner', metavar='TFLITE',
                  help="also run export.runner on this .tflite (the same model, exported for "
                       "the runner) and compare its greedy text and decode tokens/s")
  ap.add_argument('--tokenizer', help='SentencePiece .model (needed by --compare-runner)')
  ap.add_argument('--verbose', action='store_true',
                  help="show the LiteRT-LM runtime's INFO and WARNING log lines (default: errors)")
  a = ap.parse_args(argv)
  eng = Engine(a.bundle, a.threads, verbose=a.verbose)
  text, speed = eng.generate(a.prompt, a.max_new)
  print(f'[LiteRT-LM] {a.prompt}{text}')
  result = {'cpu': cpu_model(), 'threads': a.threads, 'litertlm': speed}
  if a.compare_runner:
    if not a.tokenizer:
      ap.error('--compare-runner needs --tokenizer')
    from mobilemoe_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(a.tokenizer)
    ours = runner_decode_speed(a.compare_runner, [tok.bos_id] + tok.encode(a.prompt),
                               speed['decode_tokens'] or a.max_new, a.threads)
    print(f'[export.runner] {a.prompt}{tok.decode(ours["tokens"])}')
    result['runner'] = {'decode_tokens_per_s': ours['decode_tokens_per_s'],
                        'same_text': tok.decode(ours['tokens']) == text}
  import json
  print(json.dumps(result, indent=2))
  return result


if __name__ == '__main__':
  main()
