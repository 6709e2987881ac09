"""KV cache memory and decode speed of an f32 vs an int8 cache (`--kv-cache int8`) at long
contexts, on a small random-weight model (INT4 block-32 weights, so the cache dominates),
with export.runner and through the LiteRT-LM runtime, side by side in one run.

  python bench/kv_cache.py                 # -> bench/results/kv_cache.json
  python bench/kv_cache.py --table         # the README table of that file

Workloads: context (--kv-lens, default 2048 and 8192) x cache (f32, int8) x runtime (runner,
litertlm). Each is measured in a fresh process: RSS after loading, peak RSS after decoding,
and decode ms/token at a cache filled to context - 33 slots (runner: random finite contents,
the graph's work does not depend on them; LiteRT-LM: after its own prefill of that many
tokens, as its benchmark info reports). The tokenizer only sizes the vocabulary and goes into
the bundles: by default a 512-piece SentencePiece model trained in seconds on stdlib
docstrings (no data files needed).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import runinfo  # noqa: E402

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
  from export.litertlm import Engine
  eng = Engine(path, threads, max_num_tokens=kv_len)
  loaded = _status_mb('VmRSS')
  # + the start token: kv_len - steps - 1
  _, b = eng.generate(prompt_of(eng.engine, kv_len - steps - 2), steps)
  return {'rss_loaded_mb': loaded, 'peak_rss_mb': _status_mb('VmHWM'),
          'decode_ms': 1e3 / b['decode_tokens_per_s'] if b['decode_tokens_per_s'] else None,
          'decode_tokens': b['decode_tokens'], 'prefill_tokens': b['prefill_tokens']}


def build(kv_lens, tokenizer: str, out_dir: str, litertlm: bool, reuse=False, log=print) -> dict:
  """Exports the model once per (context, dtype[, LiteRT-LM bundle]); {key: path}.
  reuse: keep the files already in out_dir (from an earlier run with the same model)."""
  import flax.nnx as nnx
  from export import checkpoint, litert, torch_model
  from export import litertlm as lm_bundle
  from mobilemoe_jax.data.tokenizer import load_tokenizer
  from mobilemoe_jax.model import Transformer
  cfg = checkpoint.load_config(os.path.join(REPO, 'configs', 'tiny.py') + ':dense').model
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


def default_tokenizer(out_dir: str) -> str:
  """A 512-piece SentencePiece model on stdlib docstrings: any tokenizer of that size serves
  (random weights); this one needs no data files."""
  import inspect
  import collections, json as json_mod, pathlib, re
  from mobilemoe_jax.data.tokenizer import train_sentencepiece
  texts = [inspect.getdoc(m) or '' for m in (collections, json_mod, os, re, inspect, pathlib,
                                              argparse, subprocess, tempfile)]
  return train_sentencepiece(texts, os.path.join(out_dir, 'spm.model'), vocab_size=512)


def ratios(rows: dict) -> dict:
  """int8 / f32 cache (bytes, peak RSS, decode time) per runtime and context, and LiteRT-LM /
  runner decode time per cache and context."""
  out = {}
  for key, r in rows.items():
    kind, kv_len, dtype = key.split('_')
    f32 = rows.get(f'{kind}_{kv_len}_f32')
    if dtype == 'int8' and f32:
      for field in ('cache_mb', 'peak_rss_mb', 'decode_ms'):
        if r.get(field) and f32.get(field):
          out[f'{kind}_{kv_len}_int8_over_f32_{field}'] = r[field] / f32[field]
    runner = rows.get(f'runner_{kv_len}_{dtype}')
    if kind == 'litertlm' and runner and r.get('decode_ms'):
      out[f'litertlm_over_runner_{kv_len}_{dtype}_decode_ms'] = r['decode_ms'] / runner['decode_ms']
  return out


def markdown_table(res: dict) -> str:
  m = res['machine']
  lines = [f"{m['cpu']}, {res['threads']} threads, load average {m['loadavg_start'][0]:.1f} at start; "
           f"commit {res['commit']}, {res['date']}",
           '',
           '| context | cache | runner decode ms | LiteRT-LM decode ms | cache tensors (runner) | '
           'runner peak RSS | LiteRT-LM peak RSS |',
           '|---|---|---|---|---|---|---|']
  rows = res['rows']
  fmt = lambda v, f='{:.2f}': '-' if v is None else f.format(v)
  for kv_len in res['kv_lens']:
    for dtype in ('f32', 'int8'):
      r, l = rows.get(f'runner_{kv_len}_{dtype}', {}), rows.get(f'litertlm_{kv_len}_{dtype}', {})
      lines.append(f"| {kv_len} | {dtype} | {fmt(r.get('decode_ms'))} | {fmt(l.get('decode_ms'))} | "
                   f"{fmt(r.get('cache_mb'), '{:.2f} MiB')} | {fmt(r.get('peak_rss_mb'), '{:.0f} MiB')} | "
                   f"{fmt(l.get('peak_rss_mb'), '{:.0f} MiB')} |")
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--tokenizer', help='SentencePiece .model (default: one trained on the fly)')
  ap.add_argument('--kv-lens', default='2048,8192')
  ap.add_argument('--no-litertlm', action='store_true', help='only export.runner')
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--out-dir', help='keep the exported files here (default: a temp dir)')
  ap.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'kv_cache.json'),
                  help='where the measurements are written (JSON)')
  ap.add_argument('--table', action='store_true', help='print the README table of --out')
  ap.add_argument('--reuse', action='store_true',
                  help='measure the files already in --out-dir instead of exporting them again')
  ap.add_argument('--measure', nargs=2, metavar=('KIND', 'PATH'), help=argparse.SUPPRESS)
  ap.add_argument('--kv-len', type=int, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.table:
    return print(markdown_table(runinfo.read_results(a.out)))
  if a.measure:                      # the child process: one measurement
    kind, path = a.measure
    r = measure_runner(path, threads=a.threads) if kind == 'runner' else \
        measure_litertlm(path, a.kv_len, threads=a.threads)
    print(json.dumps(r))
    return r
  kv_lens = [int(x) for x in a.kv_lens.split(',')]
  record = runinfo.run_record('bench/kv_cache.py', gpu=False)
  with tempfile.TemporaryDirectory() as tmp:
    out_dir = a.out_dir or tmp
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = a.tokenizer or default_tokenizer(out_dir)
    paths = build(kv_lens, tokenizer, out_dir, not a.no_litertlm, a.reuse,
                  log=lambda m: print(m, file=sys.stderr))
    rows = {}
    for key, path in paths.items():
      kind, kv_len, dtype = key.split('_')
      child = subprocess.run([sys.executable, os.path.abspath(__file__), '--measure', kind, path,
                              '--kv-len', kv_len, '--threads', str(a.threads)],
                             capture_output=True, text=True, cwd=REPO)
      if child.returncode:
        raise RuntimeError(f'measuring {path} failed:\n{child.stderr[-3000:]}')
      rows[key] = json.loads(child.stdout.strip().splitlines()[-1])
      print(key, rows[key], file=sys.stderr, flush=True)
  res = dict(record, threads=a.threads, kv_lens=kv_lens, model=MODEL, weights='int4_g32',
             tokenizer=a.tokenizer or 'default (512 pieces, stdlib docstrings)', rows=rows,
             ratios=ratios(rows))
  runinfo.write_results(a.out, res)
  print(markdown_table(res))
  return res


if __name__ == '__main__':
  main()
