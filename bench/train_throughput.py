"""Training throughput: tokens/s and MFU of the project's real train step, and a PyTorch peer.

Every JAX run jits `mobilemoe_jax.train.trainer.make_train_step` (the step `train_and_evaluate`
runs: forward, masked CE + aux/z losses, backward, clipping, AdamW, non-finite guard) with the
trainer's own init function, optimizer and shardings, on random tokens (one document per row,
no padding), so no data files are needed. The data pipeline is never called; where `grain` is
not installed (the device image) an inert stand-in module is put in its place so that the
trainer's imports work.

Runs (bf16 compute, fp32 params and AdamW moments, per-GPU batch 8 x 2048 unless it does not
fit; `model.moe.capacity_factor` 1.25 for MoE models):
  tiny, mobilemoe_s, mobilellm_pro            one GPU each
  mobilemoe_s expert-parallel on 2 and 4 GPUs  mesh expert=n, per-GPU batch fixed (weak scaling)
  torch_peer_s                                 transformers Qwen2-MoE built to mobilemoe_s's
                                               shape, eager, autocast bf16, fused AdamW
  two what-ifs on mobilemoe_s, for where the time goes:
    s_dense_ffn   every FFN a dense SwiGLU of the active width (top_k*d_expert + shared)
    s_cudnn_attn  attention through cuDNN (causal + window, no mask array) instead of XLA
Each run is a subprocess (CUDA_VISIBLE_DEVICES picks its GPUs), so one-GPU runs go side by
side on different GPUs. Timing: compile first (not timed), `--warmup` steps, then `--steps`
steps each ended by block_until_ready; tokens/s = tokens per step / median step time.
MFU = tokens/s per GPU x accounting.train_flops_per_token (6 x active params + attention at
the layer's visible context) / 989 TFLOP/s (H200 dense bf16).

  python3 bench/train_throughput.py                       # GPU -> bench/results/train_throughput.json
  python bench/train_throughput.py --platform=cpu --small # CPU check, 8 fake devices
"""
import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

T_START = time.time()
ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
PEAK = 989e12           # H200 SXM dense bf16, datasheet
SEQ_FULL, SEQ_SMALL = 2048, 128
TARGETS = {'mfu_mobilemoe_s_1gpu': 0.40, 'speedup_vs_torch_peer': 2.0,
           'weak_scaling_efficiency_4gpu': 0.85}

p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
p.add_argument('--platform', default=None, help='JAX_PLATFORMS (cpu for the local check)')
p.add_argument('--small', action='store_true', help='shrunken shapes, seq 128 (CPU check)')
p.add_argument('--out', default=None, help='JSON path (default bench/results/train_throughput[_cpu].json)')
p.add_argument('--log', default=None, help='also append every run\'s output to this file')
p.add_argument('--only', default=None, help='comma-separated run names')
p.add_argument('--batch', type=int, default=None, help='rows per GPU (default 8, small 2)')
p.add_argument('--warmup', type=int, default=None)
p.add_argument('--steps', type=int, default=None)
p.add_argument('--time-scale', type=float, default=1.0, help='multiplies every phase\'s time limit')
p.add_argument('--deadline-s', type=float, default=1e9,
               help='stop every run this many seconds after the start (results so far are kept)')
p.add_argument('--stub-grain', action='store_true', help='use the grain stand-in even if grain imports')
p.add_argument('--worker', default=None, help=argparse.SUPPRESS)   # internal: run one job
p.add_argument('--n-devices', type=int, default=1, help=argparse.SUPPRESS)
p.add_argument('--table-from', default=None, help='print the markdown table of a results JSON')
args = p.parse_args()
if args.platform:
  os.environ['JAX_PLATFORMS'] = args.platform
SMALL = args.small
SEQ = SEQ_SMALL if SMALL else SEQ_FULL
BATCH = args.batch or (2 if SMALL else 8)
WARMUP = args.warmup if args.warmup is not None else (1 if SMALL else 3)
STEPS = args.steps or (3 if SMALL else 10)

# name: (preset, n_gpus, variant). Variant None = the preset as users train it.
JOBS = {
    'tiny_1gpu': ('tiny', 1, None),
    'mobilemoe_s_1gpu': ('mobilemoe_s', 1, None),
    'mobilellm_pro_1gpu': ('mobilellm_pro', 1, None),
    'torch_peer_s_1gpu': ('mobilemoe_s', 1, 'torch'),
    'mobilemoe_s_ep2': ('mobilemoe_s', 2, None),
    'mobilemoe_s_ep4': ('mobilemoe_s', 4, None),
    's_dense_ffn_1gpu': ('mobilemoe_s', 1, 'dense_ffn'),
    's_cudnn_attn_1gpu': ('mobilemoe_s', 1, 'cudnn_attn'),
}
# Phases run one after another, each with a time limit (s); inside a phase, lanes run side by
# side on their own GPUs and the jobs of one lane one after another.
PLAN = [
    (240, [([0], ['mobilemoe_s_1gpu']), ([1], ['torch_peer_s_1gpu']),
           ([2], ['tiny_1gpu', 's_dense_ffn_1gpu']), ([3], ['mobilellm_pro_1gpu'])]),
    (150, [([0, 1, 2, 3], ['mobilemoe_s_ep4'])]),
    (150, [([0, 1], ['mobilemoe_s_ep2']), ([2], ['s_cudnn_attn_1gpu'])]),
]


# --------------------------------------------------------------------------- model configs


STUBBED = []   # modules replaced by inert stand-ins in this process


def _stub(mod: str):
  """An inert stand-in for `mod` (and its parents): any attribute is a new empty class, so
  module-level class bases, annotations and `from mod import X` all work."""
  class _Any(type):
    def __getattr__(cls, name):
      if name.startswith('__'):
        raise AttributeError(name)
      return _Any(name, (), {})
  parts = mod.split('.')
  for i in range(1, len(parts) + 1):
    name = '.'.join(parts[:i])
    if i == len(parts) or name not in sys.modules:
      sys.modules[name] = _Any(name, (), {})
  STUBBED.append(mod)


def _imports():
  """The trainer module imports the data pipeline (grain), checkpointing (orbax) and the
  metrics writer (tensorboard) at module level; the train step uses none of them. Where one
  does not import (the device image has no grain), it is stubbed; STUBBED records which."""
  import importlib
  sys.path.insert(0, ROOT)
  for mod in ('grain', 'grain.checkpoint', 'orbax.checkpoint', 'tensorboard.compat.proto',
              'tensorboard.summary.writer.event_file_writer'):
    if args.stub_grain and mod.startswith('grain'):
      _stub(mod)
      continue
    try:
      importlib.import_module(mod)
    except Exception:  # noqa: BLE001
      _stub(mod)


def model_cfg(preset: str, variant):
  """The preset's model config with the benchmark's settings (bf16, capacity 1.25)."""
  from configs.stages.common import PRESETS
  cfg = PRESETS[preset]().model
  cfg.dtype = 'bfloat16'
  cfg.max_seq_len = max(cfg.max_seq_len, SEQ)
  if cfg.moe.n_experts:
    cfg.moe.capacity_factor = 1.25
  if SMALL:   # same structure, small widths
    cfg.update(dict(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
                    d_ff=128, n_layers=4, sliding_window=min(cfg.sliding_window, 32)))
    if cfg.moe.n_experts:
      cfg.moe.update(dict(n_experts=8, top_k=2, d_expert=32, d_shared=32))
  if variant == 'dense_ffn':  # the MoE swapped for a dense SwiGLU of the same active width
    m = cfg.moe
    cfg.d_ff = m.top_k * m.d_expert + m.n_shared * m.d_shared
    cfg.moe.n_experts = 0
  return cfg


def _patch_cudnn_attention():
  """What-if: attention through cuDNN's fused kernel with causal + window flags in place of
  the [B,1,T,S] mask (right only for one document per row, which this benchmark feeds)."""
  import jax
  from mobilemoe_jax.model import layers
  orig_call, orig_dpa = layers.Attention.__call__, jax.nn.dot_product_attention

  def call(self, x, positions, segment_ids, cache=None):
    w = self.window

    def dpa(q, k, v, mask=None, **kw):
      return orig_dpa(q, k, v, is_causal=True, implementation='cudnn',
                      local_window_size=(w - 1, 0) if w else None)
    jax.nn.dot_product_attention = dpa
    try:
      return orig_call(self, x, positions, segment_ids, cache)
    finally:
      jax.nn.dot_product_attention = orig_dpa

  layers.Attention.__call__ = call


# ------------------------------------------------------------------------------- JAX worker


def _say(name, msg):
  print(f'[{name} +{time.time() - T_START:.1f}s] {msg}', flush=True)


def run_jax(name, preset, n_dev, variant):
  _imports()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from configs.stages.common import train_config
  from mobilemoe_jax import sharding
  from mobilemoe_jax.config import experiment, mesh_config
  from mobilemoe_jax.scaling import accounting
  from mobilemoe_jax.train import optim, trainer
  if variant == 'cudnn_attn':
    _patch_cudnn_attention()

  _say(name, f'imported; {len(jax.devices())} devices')
  devices = jax.devices()[:n_dev]
  assert len(devices) == n_dev, f'need {n_dev} devices, have {len(jax.devices())}'
  mem_limit = (devices[0].memory_stats() or {}).get('bytes_limit')
  cfg_model = model_cfg(preset, variant)
  flops_tok = accounting.train_flops_per_token(cfg_model, SEQ)
  counts = accounting.count(cfg_model)
  attempts = [(BATCH, False), (BATCH, True), (BATCH // 2, False)]
  errors = []
  for per_dev, remat in attempts:
    cfg_model.remat = remat
    config = experiment(cfg_model, mesh=mesh_config(data=1, expert=n_dev),
                        train=train_config('bench', small=False, batch_size=per_dev * n_dev,
                                           seq_len=SEQ, steps=100_000))
    mesh = sharding.make_mesh(config.mesh, devices)
    try:
      with jax.set_mesh(mesh):
        t = config.train
        tx, lr = optim.make_optimizer(t)
        init_state = trainer.make_init_fn(config, tx)
        abstract = jax.eval_shape(init_state)
        state_sh = sharding.state_shardings(abstract, mesh)
        batch_sh = sharding.batch_sharding(mesh)
        step = jax.jit(trainer.make_train_step(config, tx, lr), in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, None), donate_argnums=0)
        B = t.batch_size
        rng = np.random.default_rng(0)
        ids = rng.integers(0, cfg_model.vocab_size, (B, SEQ + 1), dtype=np.int32)
        host = {'inputs': ids[:, :-1], 'targets': ids[:, 1:],
                'positions': np.broadcast_to(np.arange(SEQ, dtype=np.int32), (B, SEQ)).copy(),
                'segment_ids': np.ones((B, SEQ), np.int32),
                'loss_mask': np.ones((B, SEQ), np.float32)}
        batch = {k: jax.device_put(v, batch_sh) for k, v in host.items()}
        _say(name, f'lowering (batch {per_dev}/device, remat {remat})')
        # The initial state is built in a thread while the step compiles (both take minutes
        # at full size on the device; XLA releases the GIL while compiling).
        init_out = {}

        def build():
          try:
            init_out['state'] = jax.block_until_ready(
                jax.jit(init_state, out_shardings=state_sh)())
          except Exception as e:  # noqa: BLE001
            init_out['error'] = e
        import threading
        init_thread = threading.Thread(target=build)
        init_thread.start()
        t0 = time.time()
        try:
          compiled = step.lower(abstract, batch).compile()
        finally:
          init_thread.join()
        compile_s = time.time() - t0
        _say(name, f'compiled in {compile_s:.1f} s (state built alongside)')
        if 'error' in init_out:
          raise init_out['error']
        mem = compiled.memory_analysis()
        need = None
        if mem is not None:
          need = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
          if mem_limit and need > 0.97 * mem_limit:
            raise MemoryError(f'compiled step needs {need / 2**30:.1f} GiB per device '
                              f'> limit {mem_limit / 2**30:.1f} GiB')
        from mobilemoe_jax.moe import dispatch
        ep_path = bool(cfg_model.moe.n_experts) and dispatch.can_expert_parallel(
            B * SEQ, cfg_model.moe.n_experts)
        state = init_out.pop('state')
        times, metrics = [], None
        for i in range(WARMUP + STEPS):
          t0 = time.perf_counter()
          state, metrics = compiled(state, batch)
          jax.block_until_ready((state, metrics))
          if i >= WARMUP:
            times.append(time.perf_counter() - t0)
          else:
            _say(name, f'warm-up step {i + 1}: {time.perf_counter() - t0:.3f} s')
        _say(name, f'timed {STEPS} steps, median {statistics.median(times):.4f} s')
        m = jax.device_get(metrics)
        peak_mem = max((d.memory_stats() or {}).get('peak_bytes_in_use', 0) for d in devices)
        del state, metrics, compiled
    except Exception as e:  # noqa: BLE001  out of memory: try the next setting
      msg = f'{type(e).__name__}: {str(e)[:300]}'
      oom = isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower()
      errors.append(f'batch {per_dev} remat {remat}: {msg}')
      print(f'[{name}] attempt failed: {msg}', flush=True)
      gc.collect()
      jax.clear_caches()
      if not oom:
        break
      continue
    med = statistics.median(times)
    tok_s = B * SEQ / med
    n_assign = B * SEQ * cfg_model.moe.top_k * max(
        0, cfg_model.n_layers - cfg_model.moe.first_dense) if cfg_model.moe.n_experts else 0
    return {
        'name': name, 'impl': 'jax', 'preset': preset, 'variant': variant, 'n_gpus': n_dev,
        'batch_per_gpu': per_dev, 'seq_len': SEQ, 'remat': remat,
        'tokens_per_step': B * SEQ, 'step_s_median': med, 'step_s_all': times,
        'tokens_per_s': tok_s, 'tokens_per_s_per_gpu': tok_s / n_dev,
        'train_flops_per_token': flops_tok,
        'mfu': tok_s * flops_tok / (PEAK * n_dev),
        'total_params': counts.total_params, 'active_params': counts.active_params,
        'compile_s': compile_s, 'compiled_bytes_per_device': need, 'peak_bytes_in_use': peak_mem,
        'loss_last': float(m['loss']), 'dropped_frac': (float(m['dropped']) / n_assign) if n_assign else 0.0,
        'capacity_factor': cfg_model.moe.capacity_factor if cfg_model.moe.n_experts else None,
        'device_kind': devices[0].device_kind, 'failed_attempts': errors,
        'stubbed_modules': STUBBED, 'expert_parallel_path': ep_path,
    }
  return {'name': name, 'error': errors, 'stubbed_modules': STUBBED}


# ----------------------------------------------------------------------------- torch worker


def run_torch(name, preset):
  """transformers' Qwen2-MoE built to the JAX preset's shape (layer 0 dense, tied head,
  GQA, top-k with renormalised weights, one shared expert, aux loss), trained the way a
  transformers user does: eager, fp32 master weights, autocast bf16, fused AdamW."""
  _imports()
  import torch
  import transformers
  from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
  from mobilemoe_jax.scaling import accounting
  c = model_cfg(preset, None)
  dev = 'cuda' if torch.cuda.is_available() and args.platform != 'cpu' else 'cpu'
  kw = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
            rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
            moe_intermediate_size=c.moe.d_expert,
            shared_expert_intermediate_size=c.moe.n_shared * c.moe.d_shared,
            num_experts=c.moe.n_experts, num_experts_per_tok=c.moe.top_k,
            norm_topk_prob=c.moe.norm_topk_prob, output_router_logits=True,
            router_aux_loss_coef=c.moe.aux_loss_coef,
            mlp_only_layers=list(range(c.moe.first_dense)), use_cache=False)
  try:
    hf_cfg = Qwen2MoeConfig(qkv_bias=False, **kw)
  except TypeError:   # older transformers: no qkv_bias field (q/k/v keep their bias)
    hf_cfg = Qwen2MoeConfig(**kw)
  hf_cfg._attn_implementation = 'sdpa'
  assert hf_cfg.hidden_size // hf_cfg.num_attention_heads == c.head_dim
  torch.manual_seed(0)
  with torch.device(dev):
    model = Qwen2MoeForCausalLM(hf_cfg)
  model.train()
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.1, fused=dev == 'cuda')
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(0, c.vocab_size, (BATCH, SEQ), generator=g).to(dev)

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16):
      out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss

  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
  times = []
  for i in range(WARMUP + STEPS):
    t0 = time.perf_counter()
    loss = step()
    sync()
    if i >= WARMUP:
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  tok_s = BATCH * SEQ / med
  flops_tok = accounting.train_flops_per_token(c, SEQ)
  return {
      'name': name, 'impl': 'torch', 'preset': preset, 'variant': 'torch', 'n_gpus': 1,
      'batch_per_gpu': BATCH, 'seq_len': SEQ, 'tokens_per_step': BATCH * SEQ,
      'step_s_median': med, 'step_s_all': times, 'tokens_per_s': tok_s,
      'tokens_per_s_per_gpu': tok_s, 'train_flops_per_token': flops_tok,
      'mfu': tok_s * flops_tok / PEAK, 'total_params': n_params, 'loss_last': float(loss.detach()),
      'peak_bytes_in_use': torch.cuda.max_memory_allocated() if dev == 'cuda' else None,
      'device_kind': torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
      'torch': torch.__version__, 'transformers': transformers.__version__,
      'hf_config': {k: getattr(hf_cfg, k, None) for k in (
          'hidden_size', 'num_hidden_layers', 'num_experts', 'num_experts_per_tok',
          'moe_intermediate_size', 'shared_expert_intermediate_size', 'vocab_size',
          'mlp_only_layers', 'qkv_bias', 'use_sliding_window')},
      'attention': 'sdpa, global causal on every layer (the JAX model windows 3 of 4 layers; '
                   'MFU counts the windowed FLOPs for both)',
  }


def worker(name):
  preset, n_dev, variant = JOBS[name]
  if variant == 'torch':
    res = run_torch(name, preset)
  else:
    res = run_jax(name, preset, n_dev, variant)
  print('RESULT ' + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- orchestrator


def versions():
  out = {'python': platform.python_version()}
  code = ('import importlib.metadata as m, json; print(json.dumps({k: m.version(k) for k in '
          '("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers") '
          'if __import__("importlib.util").util.find_spec(k.replace("-", "_"))}))')
  try:
    out.update(json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True,
                                         text=True, timeout=60).stdout))
  except Exception as e:  # noqa: BLE001
    out['error'] = str(e)
  return out


def gpu_info():
  try:
    r = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                        '--format=csv,noheader'], capture_output=True, text=True, timeout=30)
    return [l.strip() for l in r.stdout.splitlines() if l.strip()]
  except Exception:  # noqa: BLE001
    return []


def launch(name, gpus, cpu):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  argv = [sys.executable, os.path.abspath(__file__), f'--worker={name}',
          f'--batch={BATCH}', f'--warmup={WARMUP}', f'--steps={STEPS}']
  if args.platform:
    argv.append(f'--platform={args.platform}')
  if SMALL:
    argv.append('--small')
  if args.stub_grain:
    argv.append('--stub-grain')
  if cpu:
    env['XLA_FLAGS'] = env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  else:
    env['CUDA_VISIBLE_DEVICES'] = ','.join(map(str, gpus))
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
  return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(name, proc, t_start, logf, deadline):
  try:
    out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    out += f'\n[{name}] killed at its phase\'s time limit after {time.time() - t_start:.0f} s'
  res = None
  for line in out.splitlines():
    if line.startswith('RESULT '):
      res = json.loads(line[7:])
  tail = '\n'.join(l for l in out.splitlines() if not l.startswith('RESULT '))[-3000:]
  text = f'===== {name} ({time.time() - t_start:.0f} s, rc {proc.returncode})\n{tail}\n'
  print(text, flush=True)
  if logf:
    logf.write(text)
    logf.flush()
  if res is None:
    res = {'name': name, 'error': [f'no result (rc {proc.returncode}): {tail[-800:]}']}
  res['wall_s'] = time.time() - t_start
  return res


def summarize(runs):
  ok = lambda k: k in runs and 'error' not in runs[k]
  s = {}
  if ok('mobilemoe_s_1gpu'):
    base = runs['mobilemoe_s_1gpu']
    s['mfu_mobilemoe_s_1gpu'] = base['mfu']
    s['tokens_per_s_mobilemoe_s_1gpu'] = base['tokens_per_s']
    if ok('torch_peer_s_1gpu'):
      s['speedup_vs_torch_peer'] = base['tokens_per_s'] / runs['torch_peer_s_1gpu']['tokens_per_s']
    for n in (2, 4):
      k = f'mobilemoe_s_ep{n}'
      if ok(k) and runs[k]['batch_per_gpu'] == base['batch_per_gpu']:
        s[f'weak_scaling_efficiency_{n}gpu'] = runs[k]['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']
  for k in ('tiny_1gpu', 'mobilellm_pro_1gpu', 'torch_peer_s_1gpu', 's_dense_ffn_1gpu',
            's_cudnn_attn_1gpu'):
    if ok(k):
      s[f'mfu_{k}'] = runs[k]['mfu']
  s['targets'] = {k: {'target': v, 'measured': s.get(k), 'met': (s[k] >= v) if k in s else None}
                  for k, v in TARGETS.items()}
  return s


def orchestrate():
  cpu = args.platform == 'cpu'
  out_path = args.out or os.path.join(ROOT, 'bench', 'results',
                                      'train_throughput_cpu.json' if cpu else 'train_throughput.json')
  only = set(args.only.split(',')) if args.only else None
  n_gpu = 0 if cpu else len(gpu_info())
  logf = open(args.log, 'a') if args.log else None
  t_all = time.time()
  result = {
      'script': 'bench/train_throughput.py',
      'command': ' '.join(['python3'] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'platform': 'cpu' if cpu else 'gpu', 'gpus': gpu_info() if not cpu else [],
      'host': platform.node(), 'versions': versions(), 'peak_flops_per_gpu': PEAK,
      'seq_len': SEQ, 'batch_per_gpu': BATCH, 'warmup_steps': WARMUP, 'timed_steps': STEPS,
      'small': SMALL, 'runs': {},
  }
  for limit, phase in PLAN:
    deadline = min(time.time() + limit * args.time_scale, t_all + args.deadline_s)
    procs = []
    for gpus, names in phase:
      names = [n for n in names if only is None or n in only]
      if not names:
        continue
      if not cpu and max(gpus) >= n_gpu:
        for n in names:
          result['runs'][n] = {'name': n, 'error': [f'needs GPUs {gpus}, have {n_gpu}']}
        continue
      procs.append((gpus, names))
    if cpu:  # two cores: one job at a time
      for gpus, names in procs:
        for n in names:
          result['runs'][n] = finish(n, launch(n, gpus, cpu), time.time(), logf, deadline)
    else:   # lanes side by side, jobs inside a lane in turn
      import threading

      def lane(gpus, names):
        for n in names:
          result['runs'][n] = finish(n, launch(n, gpus, cpu), time.time(), logf, deadline)
      threads = [threading.Thread(target=lane, args=lp) for lp in procs]
      for th in threads:
        th.start()
      for th in threads:
        th.join()
    result['summary'] = summarize(result['runs'])
    result['wall_s'] = time.time() - t_all
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, 'w') as f:
      json.dump(result, f, indent=1)
  print(table(result))
  print(json.dumps(result['summary'], indent=1))
  print(f'wrote {out_path} ({time.time() - t_all:.0f} s)')


def table(result):
  rows = ['| run | GPUs | batch/GPU x seq | step ms | tokens/s | tokens/s/GPU | MFU | peak mem GiB | notes |',
          '|---|---|---|---|---|---|---|---|---|']
  for name, r in result['runs'].items():
    if 'error' in r:
      rows.append(f'| {name} | | | | | | | | failed: {"; ".join(r["error"])[:200]} |')
      continue
    notes = []
    if r.get('remat'):
      notes.append('remat')
    if r.get('dropped_frac'):
      notes.append(f'dropped {100 * r["dropped_frac"]:.1f}% of assignments')
    mem = r.get('peak_bytes_in_use')
    rows.append(f'| {name} | {r["n_gpus"]} | {r["batch_per_gpu"]} x {r["seq_len"]} | '
                f'{1e3 * r["step_s_median"]:.1f} | {r["tokens_per_s"]:,.0f} | '
                f'{r["tokens_per_s_per_gpu"]:,.0f} | {100 * r["mfu"]:.1f}% | '
                f'{mem / 2**30:.1f} | {", ".join(notes)} |' if mem else
                f'| {name} | {r["n_gpus"]} | {r["batch_per_gpu"]} x {r["seq_len"]} | '
                f'{1e3 * r["step_s_median"]:.1f} | {r["tokens_per_s"]:,.0f} | '
                f'{r["tokens_per_s_per_gpu"]:,.0f} | {100 * r["mfu"]:.1f}% | | {", ".join(notes)} |')
  return '\n'.join(rows)


if __name__ == '__main__':
  if args.table_from:
    with open(args.table_from) as f:
      res = json.load(f)
    print(table(res))
    print(json.dumps(res.get('summary'), indent=1))
  elif args.worker:
    worker(args.worker)
  else:
    orchestrate()
