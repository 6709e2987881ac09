"""KV cache memory and decode speed of an f32 vs an int8 cache (`--kv-cache int8`) at long
contexts, on a small random-weight model (INT4 block-32 weights, so the cache dominates),
with export.runner and optionally through the LiteRT-LM runtime.

  python -m export.kvbench --tokenizer data/tokenizer/spm.model --kv-lens 2048,8192 [--litertlm]

Each (context, dtype, runtime) is measured in a fresh process: RSS after loading, peak RSS
after decoding, and decode ms/token at a cache filled to context - 33 slots (random
finite contents: the graph's work does not depend on them). Prints one JSON.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MODEL = dict(d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=1024,
             sliding_window=0)


def _status_mb(field: str) -> float:
  """VmRSS (now) or VmHWM (peak) of this process, MiB. (Not ru_maxrss: Linux carries it
  over exec from the forking parent.)"""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) / 1024
  raise RuntimeError(f'no {field} in /proc/self/status')


def measure_runner(path: str, steps: int = 32, threads: int = 2) -> dict:
  from export.runner import LiteRTLM
  lm = LiteRTLM(path, threads)
  loaded = _status_mb('VmRSS')
  rng = np.random.default_rng(0)
  lm.kv = {n: (rng.integers(-127, 128, v.shape) if v.dtype == np.int8
               else rng.standard_normal(v.shape) * (0.01 if 'scale' in n else 1)).astype(v.dtype)
           for n, v in lm.kv.items()}
  lm.pos = lm.kv_len - steps - 1
  lm.decode(1)                                    # warm-up
  t0 = time.perf_counter()
  for t in range(steps):
    lm.decode(t + 2)
  ms = (time.perf_counter() - t0) / steps * 1e3
  cache = sum(v.nbytes for v in lm.kv.values())
  return {'rss_loaded_mb': loaded, 'peak_rss_mb': _status_mb('VmHWM'),
          'decode_ms': ms, 'cache_mb': cache / 2**20}


def prompt_of(eng, n_tokens: int) -> str:
  """The longest prefix of repeated export.runner.PROMPTS text that the engine's tokenizer
  makes into at most n_tokens tokens."""
  from export.runner import PROMPTS
  base = ' '.join(PROMPTS) + ' '
  text = base * (n_tokens // max(1, len(eng.tokenize(base))) + 2)
  lo, hi = 0, len(text)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if len(eng.tokenize(text[:mid])) <= n_tokens else (lo, mid - 1)
  return text[:lo]


def measure_litertlm(path: str, kv_len: int, steps: int = 32, threads: int = 2) -> dict:
  """LiteRT-LM's own decode tokens/s after a prompt of kv_len - steps - 1 tokens (filled by
  its prefill), as its benchmark info reports it."""
  from export.litertlm import check_tflite, runtime, tflite_of
  check_tflite(tflite_of(path), path)
  litert_lm = runtime()
  eng = litert_lm.Engine(path, backend=litert_lm.Backend.CPU(thread_count=threads),
                         max_num_tokens=kv_len, enable_benchmark=True)
  loaded = _status_mb('VmRSS')
  s = eng.create_session(apply_prompt_template=False, sampler_config=litert_lm.SamplerConfig(top_k=1),
                         max_output_tokens=steps)
  s.run_prefill([prompt_of(eng, kv_len - steps - 2)])   # + the start token: kv_len - steps - 1
  s.run_decode()
  b = s.get_benchmark_info()
  return {'rss_loaded_mb': loaded, 'peak_rss_mb': _status_mb('VmHWM'),
          'decode_ms': 1e3 / b.last_decode_tokens_per_second if b.last_decode_tokens_per_second else None,
          'decode_tokens': b.last_decode_token_count, 'prefill_tokens': b.last_prefill_token_count}


def build(kv_lens, tokenizer: str, out_dir: str, litertlm: bool, reuse=False, log=print) -> dict:
  """Exports the model once per (context, dtype[, LiteRT-LM bundle]); {key: path}.
  reuse: keep the files already in out_dir (from an earlier run with the same model)."""
  import flax.nnx as nnx
  from export import checkpoint, litert, torch_model
  from export import litertlm as lm_bundle
  from mobilemoe_jax.data.tokenizer import load_tokenizer
  from mobilemoe_jax.model import Transformer
  cfg = checkpoint.load_config('configs/tiny.py:dense').model
  cfg.update(MODEL, vocab_size=load_tokenizer(tokenizer).vocab_size, max_seq_len=max(kv_lens))
  model = torch_model.from_flax(Transformer(cfg, rngs=nnx.Rngs(0)), cfg)
  paths = {}
  for kv_len in kv_lens:
    for dtype in ('f32', 'int8'):
      key = f'{kv_len}_{dtype}'
      paths[f'runner_{key}'] = os.path.join(out_dir, f'{key}.tflite')
      if not (reuse and os.path.exists(paths[f'runner_{key}'])):
        litert.export(model, paths[f'runner_{key}'], quant='int4_g32', prefill_lens=(128,),
                      kv_len=kv_len, prefill_logits='last', kv_cache=dtype, log=log)
      if litertlm:
        path = os.path.join(out_dir, f'{key}_lm.tflite')
        paths[f'litertlm_{key}'] = os.path.join(out_dir, f'{key}_lm.litertlm')
        if not (reuse and os.path.exists(paths[f'litertlm_{key}'])):
          litert.export(model, path, quant='int4_g32', prefill_lens=(128,), kv_len=kv_len,
                        kv_cache=dtype, convention='litertlm', log=log)
          lm_bundle.bundle(path, out_dir, tokenizer, kv_len)
  return paths


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--tokenizer', required=True, help='SentencePiece .model (vocab; the bundle)')
  ap.add_argument('--kv-lens', default='2048,8192')
  ap.add_argument('--litertlm', action='store_true', help='also through the LiteRT-LM runtime')
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--out-dir', help='keep the exported files here (default: a temp dir)')
  ap.add_argument('--results', default='bench/results/kv_cache.json',
                  help='where the measurements are written (JSON)')
  ap.add_argument('--reuse', action='store_true',
                  help='measure the files already in --out-dir instead of exporting them again')
  ap.add_argument('--measure', nargs=2, metavar=('KIND', 'PATH'), help=argparse.SUPPRESS)
  ap.add_argument('--kv-len', type=int, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.measure:                      # the child process: one measurement
    kind, path = a.measure
    r = measure_runner(path, threads=a.threads) if kind == 'runner' else \
        measure_litertlm(path, a.kv_len, threads=a.threads)
    print(json.dumps(r))
    return r
  from export.litertlm import cpu_model
  kv_lens = [int(x) for x in a.kv_lens.split(',')]
  with tempfile.TemporaryDirectory() as tmp:
    out_dir = a.out_dir or tmp
    os.makedirs(out_dir, exist_ok=True)
    paths = build(kv_lens, a.tokenizer, out_dir, a.litertlm, a.reuse,
                  log=lambda m: print(m, file=sys.stderr))
    results = {'command': ' '.join(['python -m export.kvbench', *(argv or sys.argv[1:])]),
               'date': time.strftime('%Y-%m-%d', time.gmtime()), 'cpu': cpu_model(),
               'threads': a.threads, 'model': MODEL, 'weights': 'int4_g32'}
    for key, path in paths.items():
      kind, kv_len, dtype = key.split('_')
      child = subprocess.run([sys.executable, '-m', 'export.kvbench', '--tokenizer', a.tokenizer,
                              '--measure', kind, path, '--kv-len', kv_len, '--threads',
                              str(a.threads)], capture_output=True, text=True)
      if child.returncode:
        raise RuntimeError(f'measuring {path} failed:\n{child.stderr[-3000:]}')
      results[key] = json.loads(child.stdout.strip().splitlines()[-1])
      print(key, results[key], file=sys.stderr, flush=True)
  print(json.dumps(results, indent=2))
  os.makedirs(os.path.dirname(a.results) or '.', exist_ok=True)
  with open(a.results, 'w') as f:
    json.dump(results, f, indent=2)
    f.write('\n')
  return results


if __name__ == '__main__':
  main()
