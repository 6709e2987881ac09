"""Training throughput: tokens/s and MFU of the project's real train step, and a PyTorch peer.

Every JAX run jits `mobilemoe_jax.train.trainer.make_train_step` (the step `train_and_evaluate`
runs: forward, masked CE + aux/z losses, backward, clipping, AdamW, non-finite guard) with the
trainer's own init function, optimizer and shardings, on random tokens (one document per row,
no padding), so no data files are needed. The data pipeline is never called; where `grain` is
not installed (the device image) an inert stand-in module is put in its place so that the
trainer's imports work.

Runs (bf16 compute, fp32 params and AdamW moments, per-GPU batch 8 x 2048 unless it does not
fit; `model.moe.capacity_factor` 1.25 for MoE models):
  tiny, mobilellm_pro                          one GPU each, the preset's attention_impl
                                               ('auto': cuDNN on a GPU)
  s_cudnn_attn_1gpu                            mobilemoe_s with cuDNN attention (= its default on
                                               a GPU) and the full-logits cross-entropy
  mobilemoe_s_1gpu                             mobilemoe_s with XLA attention (the default
                                               before model.attention_impl existed)
  mobilemoe_s expert-parallel on 2 and 4 GPUs  mesh expert=n, per-GPU batch fixed (weak
                                               scaling), XLA attention like mobilemoe_s_1gpu
  torch_peer_s                                 transformers Qwen2-MoE built to mobilemoe_s's
                                               shape, eager, autocast bf16, fused AdamW
  s_dense_ffn   what-if: every FFN a dense SwiGLU of the active width (XLA attention)
  s_cudnn_batch16_1gpu  cuDNN attention, per-GPU batch 16
  s_chunked_ce_1gpu     mobilemoe_s as configured (attention 'auto', chunked cross-entropy:
                        train.loss_chunk_len 512, train/loss.py): the headline run; in its process,
                        after it and on its state (EXTRAS): s_cudnn_attn_1gpu again (full
                        logits), chunks of 256 and 1024, capacity factor 1.0, batch 16, 32
                        and 48, batch 32 and 48 with capacity factor 1.0
  attention_check  cuDNN vs XLA attention in the model's layer against an fp32 reference
                   (packed rows, padding, global and windowed; each model.attention_mask
                   mode), and each alone timed
  since call 8: s_call7_code_1gpu (call 7's code paths: attention_mask 'bias', two gate/up
                matmuls) carries the extras (EXTRAS, or --extras): the as-configured step
                (attention_mask 'auto' resolved on the host by trainer.step_config, fused
                gate/up), each change switched off, batch 32/48, and the preset's global batch
                256 x 2048 as accumulated micro-batches (s_accum256_*)
  since call 12: the extras pair each as-configured run (8, 48, 256 x 2048) with the same
                step on the previous loss (s_*twopass*: train.loss_exp_once off), and the
                256 x 2048 step with loss chunks of 1024; s_call7_code_1gpu runs the current
                loss (its rows record loss_exp_once)
  s_cudnn_ep2, s_cudnn_ep4, s_cudnn_1gpu_ref  expert parallel as configured (cuDNN attention,
                chunked loss) and its one-GPU reference on the same machine
Each run is a subprocess (CUDA_VISIBLE_DEVICES picks its GPUs), so one-GPU runs go side by
side on different GPUs of a 4-GPU machine; on a one-GPU machine the selected runs go in turn.
Timing: compile first (not timed), `--warmup` steps, then `--steps` steps each ended by
block_until_ready; tokens/s = tokens per step / median step time. MFU = tokens/s per GPU x
accounting.train_flops_per_token (6 x active params + attention at the layer's visible
context) / 989 TFLOP/s (H200 dense bf16). `--profile=RUNS` traces 2 more steps of those runs
with jax.profiler and keeps GPU time per kernel.

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
p.add_argument('--pipelined', type=int, default=None,
               help='steps timed back to back after the synced ones (default 5, small 2; 0 = none)')
p.add_argument('--time-scale', type=float, default=1.0, help='multiplies every phase\'s time limit')
p.add_argument('--deadline-s', type=float, default=1e9,
               help='stop every run this many seconds after the start (results so far are kept)')
p.add_argument('--stub-grain', action='store_true', help='use the grain stand-in even if grain imports')
p.add_argument('--worker', default=None, help=argparse.SUPPRESS)   # internal: run one job
p.add_argument('--n-devices', type=int, default=1, help=argparse.SUPPRESS)
p.add_argument('--table-from', default=None, help='print the markdown table of a results JSON')
p.add_argument('--profile', default='',
               help='comma-separated JAX runs to trace for 2 steps after timing (per-op/kernel summary)')
p.add_argument('--extras', default=None,
               help='comma-separated runs to measure in the job\'s process after it (default: EXTRAS; '
                    'e.g. the lists EXTRAS_CALL10 etc. to repeat a call)')
p.add_argument('--hlo-dir', default=None,
               help='write the optimized HLO of each --profile run there (<run>.hlo.txt.gz)')
p.add_argument('--job-limit-s', type=float, default=240, help='per-job time limit on a one-GPU machine')
p.add_argument('--merge-into', default=None,
               help='update this results JSON: runs measured now replace theirs, others are kept')
args = p.parse_args()
if args.platform:
  os.environ['JAX_PLATFORMS'] = args.platform
SMALL = args.small
SEQ = SEQ_SMALL if SMALL else SEQ_FULL
BATCH = args.batch or (2 if SMALL else 8)
WARMUP = args.warmup if args.warmup is not None else (1 if SMALL else 3)
STEPS = args.steps or (3 if SMALL else 10)
PIPELINED = args.pipelined if args.pipelined is not None else (2 if SMALL else 5)

# name: (preset, n_gpus, variant). Variant None = the preset with the benchmark's settings;
# the others are in VARIANTS (model-config overrides, a per-GPU batch, train-config overrides).
JOBS = {
    'tiny_1gpu': ('tiny', 1, None),
    'mobilemoe_s_1gpu': ('mobilemoe_s', 1, 'xla'),
    'mobilellm_pro_1gpu': ('mobilellm_pro', 1, None),
    'torch_peer_s_1gpu': ('mobilemoe_s', 1, 'torch'),
    'mobilemoe_s_ep2': ('mobilemoe_s', 2, 'xla'),
    'mobilemoe_s_ep4': ('mobilemoe_s', 4, 'xla'),
    's_dense_ffn_1gpu': ('mobilemoe_s', 1, 'dense_ffn'),
    's_cudnn_attn_1gpu': ('mobilemoe_s', 1, 'cudnn'),
    's_cudnn_batch16_1gpu': ('mobilemoe_s', 1, 'cudnn_batch16'),
    's_chunked_ce_1gpu': ('mobilemoe_s', 1, 'chunked'),
    's_chunked_ce256_1gpu': ('mobilemoe_s', 1, 'chunked256'),
    's_chunked_ce1024_1gpu': ('mobilemoe_s', 1, 'chunked1024'),
    's_chunked_ce_batch16_1gpu': ('mobilemoe_s', 1, 'chunked_batch16'),
    's_chunked_ce_cf1_1gpu': ('mobilemoe_s', 1, 'chunked_cf1'),
    's_chunked_ce_batch32_1gpu': ('mobilemoe_s', 1, 'chunked_batch32'),
    's_chunked_ce_batch32_cf1_1gpu': ('mobilemoe_s', 1, 'chunked_batch32_cf1'),
    's_chunked_ce_batch48_1gpu': ('mobilemoe_s', 1, 'chunked_batch48'),
    's_chunked_ce_batch48_cf1_1gpu': ('mobilemoe_s', 1, 'chunked_batch48_cf1'),
    'attention_check': (None, 1, 'attention_check'),
    # Since call 9 the preset's defaults include model.attention_mask 'auto' and
    # model.fuse_gate_up (call 8: cuDNN's packed layout, dropped); these runs switch them off.
    's_call7_code_1gpu': ('mobilemoe_s', 1, 'call7'),
    's_call7_code_batch48_1gpu': ('mobilemoe_s', 1, 'call7_batch48'),
    's_bias_attn_1gpu': ('mobilemoe_s', 1, 'bias_attn'),
    's_bias_nograd_1gpu': ('mobilemoe_s', 1, 'bias_nograd'),
    's_causal_attn_1gpu': ('mobilemoe_s', 1, 'causal_attn'),
    's_unfused_1gpu': ('mobilemoe_s', 1, 'unfused'),
    's_unfused_batch48_1gpu': ('mobilemoe_s', 1, 'unfused_batch48'),
    's_causal_batch48_1gpu': ('mobilemoe_s', 1, 'causal_batch48'),
    's_accum256_micro64_1gpu': ('mobilemoe_s', 1, 'accum256_micro64'),
    's_accum256_causal_1gpu': ('mobilemoe_s', 1, 'accum256_causal'),
    's_accum256_unfused_1gpu': ('mobilemoe_s', 1, 'accum256_unfused'),
    's_mu_bf16_1gpu': ('mobilemoe_s', 1, 'mu_bf16'),
    's_call7_code_batch32_1gpu': ('mobilemoe_s', 1, 'call7_batch32'),
    's_accum256_1gpu': ('mobilemoe_s', 1, 'accum256'),
    's_accum256_mu_bf16_1gpu': ('mobilemoe_s', 1, 'accum256_mu_bf16'),
    # Since call 12 train.loss_exp_once (default on: one exp pass per loss chunk); these runs
    # switch it off (the logsumexp + softmax-gradient passes), or change the chunk length.
    's_twopass_1gpu': ('mobilemoe_s', 1, 'twopass'),
    's_twopass_batch48_1gpu': ('mobilemoe_s', 1, 'twopass_batch48'),
    's_accum256_twopass_1gpu': ('mobilemoe_s', 1, 'accum256_twopass'),
    's_accum256_chunk1024_1gpu': ('mobilemoe_s', 1, 'accum256_chunk1024'),
    # Expert parallel as configured (cuDNN attention, chunked loss) and its one-GPU reference
    # on the same machine (weak scaling: per-GPU batch fixed).
    's_cudnn_1gpu_ref': ('mobilemoe_s', 1, 'chunked'),
    's_cudnn_ep2': ('mobilemoe_s', 2, 'chunked'),
    's_cudnn_ep4': ('mobilemoe_s', 4, 'chunked'),
}
CUDNN = {'attention_impl': 'cudnn'}
UNCHUNKED = {'loss_chunk_len': 0}     # the cross-entropy over full [B, T, V] logits
AUTO = {'attention_impl': 'auto'}    # cuDNN on a GPU with bf16 compute, as configured
CHUNK = 512
VARIANTS = {   # name: (model-config overrides, per-GPU batch or None, train-config overrides)
    'xla': ({'attention_impl': 'xla'}, None, UNCHUNKED),
    'dense_ffn': ({'attention_impl': 'xla'}, None, UNCHUNKED),   # and see model_cfg
    'cudnn': (CUDNN, None, UNCHUNKED),
    'cudnn_batch16': (CUDNN, 16, UNCHUNKED),
    'chunked': (AUTO, None, {'loss_chunk_len': CHUNK}),   # train/loss.py
    'chunked256': (AUTO, None, {'loss_chunk_len': 256}),
    'chunked1024': (AUTO, None, {'loss_chunk_len': 1024}),
    'chunked_batch16': (AUTO, 16, {'loss_chunk_len': CHUNK}),
    'chunked_batch32': (AUTO, 32, {'loss_chunk_len': CHUNK}),
    'chunked_cf1': (dict(AUTO, **{'moe.capacity_factor': 1.0}), None, {'loss_chunk_len': CHUNK}),
    'chunked_batch32_cf1': (dict(AUTO, **{'moe.capacity_factor': 1.0}), 32, {'loss_chunk_len': CHUNK}),
    'chunked_batch48': (AUTO, 48, {'loss_chunk_len': CHUNK}),
    'chunked_batch48_cf1': (dict(AUTO, **{'moe.capacity_factor': 1.0}), 48, {'loss_chunk_len': CHUNK}),
    'call7': (dict(AUTO, attention_mask='bias', fuse_gate_up=False), None, {'loss_chunk_len': CHUNK}),
    'call7_batch48': (dict(AUTO, attention_mask='bias', fuse_gate_up=False), 48, {'loss_chunk_len': CHUNK}),
    'bias_attn': (dict(AUTO, attention_mask='bias'), None, {'loss_chunk_len': CHUNK}),
    'bias_nograd': (dict(AUTO, attention_mask='bias_nograd'), None, {'loss_chunk_len': CHUNK}),
    'causal_attn': (dict(AUTO, attention_mask='causal'), None, {'loss_chunk_len': CHUNK}),
    'unfused': (dict(AUTO, fuse_gate_up=False), None, {'loss_chunk_len': CHUNK}),
    'unfused_batch48': (dict(AUTO, fuse_gate_up=False), 48, {'loss_chunk_len': CHUNK}),
    'causal_batch48': (dict(AUTO, attention_mask='causal'), 48, {'loss_chunk_len': CHUNK}),
    'accum256_micro64': (AUTO, 256, {'loss_chunk_len': CHUNK, 'grad_accum': 4}),
    'accum256_causal': (dict(AUTO, attention_mask='causal'), 256, {'loss_chunk_len': CHUNK, 'grad_accum': 8}),
    'accum256_unfused': (dict(AUTO, fuse_gate_up=False), 256, {'loss_chunk_len': CHUNK, 'grad_accum': 8}),
    'mu_bf16': (AUTO, None, {'loss_chunk_len': CHUNK, 'adam_mu_dtype': 'bfloat16'}),
    'call7_batch32': (dict(AUTO, attention_mask='bias', fuse_gate_up=False), 32, {'loss_chunk_len': CHUNK}),
    # The preset's global batch (train.batch_size 256 x 2048) on one GPU: 8 micro-batches of
    # 32 rows accumulated per optimizer step (train.grad_accum).
    'accum256': (AUTO, 256, {'loss_chunk_len': CHUNK, 'grad_accum': 8}),
    'accum256_mu_bf16': (AUTO, 256, {'loss_chunk_len': CHUNK, 'grad_accum': 8,
                                     'adam_mu_dtype': 'bfloat16'}),
    'twopass': (AUTO, None, {'loss_chunk_len': CHUNK, 'loss_exp_once': False}),
    'twopass_batch48': (AUTO, 48, {'loss_chunk_len': CHUNK, 'loss_exp_once': False}),
    'accum256_twopass': (AUTO, 256, {'loss_chunk_len': CHUNK, 'grad_accum': 8, 'loss_exp_once': False}),
    'accum256_chunk1024': (AUTO, 256, {'loss_chunk_len': 1024, 'grad_accum': 8}),
}
# Further runs measured inside a job's process after its own, on its state: the state's
# shapes do not depend on them, so the initial state (most of a job's minutes on the device)
# is built once, and their steps compile in threads alongside the job's own step.
# Calls 5-7 ran these as extras of the job s_chunked_ce_1gpu. Since call 8 the job
# s_call7_code_1gpu (call 7's code paths: the step known to compile) carries the extras, the
# new defaults among them, so that a step that fails to build costs only its own row.
EXTRAS_CALL7 = ['s_cudnn_attn_1gpu', 's_chunked_ce256_1gpu', 's_chunked_ce1024_1gpu',
                's_chunked_ce_cf1_1gpu', 's_chunked_ce_batch16_1gpu', 's_chunked_ce_batch32_1gpu',
                's_chunked_ce_batch32_cf1_1gpu', 's_chunked_ce_batch48_1gpu',
                's_chunked_ce_batch48_cf1_1gpu']
EXTRAS_CALL8 = ['s_chunked_ce_1gpu', 's_bias_attn_1gpu', 's_unfused_1gpu', 's_mu_bf16_1gpu',
                's_chunked_ce_batch32_1gpu', 's_call7_code_batch32_1gpu', 's_chunked_ce_batch48_1gpu',
                's_accum256_1gpu', 's_accum256_mu_bf16_1gpu']
EXTRAS_CALL9 = ['s_chunked_ce_1gpu', 's_bias_nograd_1gpu', 's_causal_attn_1gpu', 's_unfused_1gpu',
                's_chunked_ce_batch32_1gpu', 's_chunked_ce_batch48_1gpu', 's_call7_code_batch48_1gpu',
                's_accum256_1gpu']
EXTRAS_CALL10 = ['s_chunked_ce_1gpu', 's_causal_attn_1gpu', 's_chunked_ce_batch48_1gpu',
                 's_causal_batch48_1gpu', 's_unfused_batch48_1gpu', 's_accum256_1gpu',
                 's_accum256_causal_1gpu', 's_accum256_micro64_1gpu']
# Since call 11, 'auto' is resolved on the host (trainer.step_config): the as-configured runs
# below train these one-document rows with the flags-only attention, as train_and_evaluate would.
EXTRAS_CALL11 = ['s_chunked_ce_1gpu', 's_unfused_1gpu', 's_bias_nograd_1gpu',
                 's_chunked_ce_batch32_1gpu', 's_chunked_ce_batch48_1gpu',
                 's_unfused_batch48_1gpu', 's_accum256_1gpu', 's_accum256_unfused_1gpu']
# Since call 12 the loss computes each chunk's exponentials once (train.loss_exp_once): each
# as-configured run next to the same step with the previous loss (s_*twopass*), old first.
EXTRAS = {'s_call7_code_1gpu': ['s_twopass_1gpu', 's_chunked_ce_1gpu', 's_twopass_batch48_1gpu',
                                's_chunked_ce_batch48_1gpu', 's_accum256_twopass_1gpu',
                                's_accum256_1gpu', 's_accum256_chunk1024_1gpu']}
# Phases run one after another, each with a time limit (s); inside a phase, lanes run side by
# side on their own GPUs and the jobs of one lane one after another.
PLAN = [
    (240, [([0], ['mobilemoe_s_1gpu']), ([1], ['torch_peer_s_1gpu']),
           ([2], ['tiny_1gpu', 's_dense_ffn_1gpu']), ([3], ['mobilellm_pro_1gpu'])]),
    (150, [([0, 1, 2, 3], ['mobilemoe_s_ep4'])]),
    (150, [([0, 1], ['mobilemoe_s_ep2']), ([2], ['s_cudnn_attn_1gpu']), ([3], ['s_chunked_ce_1gpu'])]),
    # since call 8: the one-GPU extras job and its reference beside it, then expert parallel
    (480, [([0], ['s_call7_code_1gpu']), ([1], ['attention_check', 's_cudnn_1gpu_ref'])]),
    (240, [([0, 1, 2, 3], ['s_cudnn_ep4'])]),
    (240, [([0, 1], ['s_cudnn_ep2']), ([2], ['s_cudnn_1gpu_ref'])]),
]
# On a one-GPU machine every selected one-GPU job runs in turn, in this order.
SERIAL = ['attention_check', 's_call7_code_1gpu', 's_chunked_ce_1gpu', 'mobilemoe_s_1gpu', 'mobilellm_pro_1gpu',
          's_cudnn_batch16_1gpu', 's_cudnn_attn_1gpu', 'tiny_1gpu', 's_dense_ffn_1gpu', 'torch_peer_s_1gpu']


# --------------------------------------------------------------------------- model configs


STUBBED = []   # modules replaced by inert stand-ins in this process
STEP_MASK = {}  # id(config): the attention mask mode of the step jitted for it


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
  overrides = VARIANTS[variant][0] if variant in VARIANTS else {}
  if not cfg.moe.n_experts:
    overrides = {k: v for k, v in overrides.items() if not k.startswith('moe.')}
  cfg.update_from_flattened_dict(overrides)
  return cfg


# ------------------------------------------------------------------------------- JAX worker


def _say(name, msg):
  print(f'[{name} +{time.time() - T_START:.1f}s] {msg}', flush=True)


def _setup(preset, variant, n_dev, per_dev, remat, devices):
  """(model config, experiment config, mesh) of one run."""
  import jax  # noqa: F401
  from configs.stages.common import train_config
  from mobilemoe_jax import sharding
  from mobilemoe_jax.config import experiment, mesh_config
  cfg_model = model_cfg(preset, variant)
  cfg_model.remat = remat
  train_overrides = VARIANTS[variant][2] if variant in VARIANTS else {}
  config = experiment(cfg_model, mesh=mesh_config(data=1, expert=n_dev),
                      train=train_config('bench', small=False, batch_size=per_dev * n_dev,
                                         seq_len=SEQ, steps=100_000, **train_overrides))
  return cfg_model, config, sharding.make_mesh(config.mesh, devices)


def _extras(name):
  """The runs measured in the job's process after its own (--extras, else EXTRAS)."""
  if args.extras is not None:
    return [x for x in args.extras.split(',') if x] if name in EXTRAS else []
  return EXTRAS.get(name, [])


def _per_gpu(variant):
  return VARIANTS[variant][1] if variant in VARIANTS and VARIANTS[variant][1] else BATCH


def _step_and_batch(config, mesh):
  """The jitted train step (as train_and_evaluate jits it), the abstract state, its
  shardings and a random batch (one document per row, no padding); under `mesh`."""
  import jax
  import numpy as np
  from mobilemoe_jax import sharding
  from mobilemoe_jax.train import optim, trainer
  t = config.train
  tx, lr = optim.make_optimizer(t)
  init_state = trainer.make_init_fn(config, tx)
  abstract = jax.eval_shape(init_state)
  state_sh = sharding.state_shardings(abstract, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  B = t.batch_size
  rng = np.random.default_rng(0)
  ids = rng.integers(0, config.model.vocab_size, (B, SEQ + 1), dtype=np.int32)
  host = {'inputs': ids[:, :-1], 'targets': ids[:, 1:],
          'positions': np.broadcast_to(np.arange(SEQ, dtype=np.int32), (B, SEQ)).copy(),
          'segment_ids': np.ones((B, SEQ), np.int32),
          'loss_mask': np.ones((B, SEQ), np.float32)}
  # The step train_and_evaluate jits for this batch (trainer.step_config: with
  # model.attention_mask 'auto' on cuDNN, one-document rows get the flags-only attention).
  step_cfg = trainer.step_config(config, host['segment_ids'])
  STEP_MASK[id(config)] = step_cfg.model.get('attention_mask')
  step = jax.jit(trainer.make_train_step(step_cfg, tx, lr), in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, None), donate_argnums=0)
  batch = {k: jax.device_put(v, batch_sh) for k, v in host.items()}
  return step, init_state, abstract, state_sh, batch


def _cast_like(state, abstract):
  """`state` with each leaf in the dtype of `abstract`'s (unchanged leaves are not copied)."""
  import jax
  return jax.tree.map(lambda a, s: a if a.dtype == s.dtype else a.astype(s.dtype), state, abstract)


def _need(compiled):
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes
          + mem.temp_size_in_bytes - mem.alias_size_in_bytes)


def _time_steps(name, compiled, state, batch):
  """WARMUP + STEPS steps, each ended by block_until_ready, then PIPELINED steps enqueued
  back to back (as the train loop runs them: no sync per step) and synced once:
  (state, step times, metrics, mean step time of the back-to-back steps)."""
  import jax
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
  pipelined = None
  if PIPELINED:
    t0 = time.perf_counter()
    for _ in range(PIPELINED):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    pipelined = (time.perf_counter() - t0) / PIPELINED
    _say(name, f'{PIPELINED} steps back to back: {pipelined:.4f} s per step')
  return state, times, jax.device_get(metrics), pipelined


def _maybe_profile(name, compiled, state, batch):
  """(state, profile of 2 more steps) if --profile names the run, else (state, None)."""
  if name not in args.profile.split(','):
    return state, None
  if args.hlo_dir:   # to tell which HLO fusion each kernel of the profile runs
    import gzip
    os.makedirs(args.hlo_dir, exist_ok=True)
    with gzip.open(os.path.join(args.hlo_dir, f'{name}.hlo.txt.gz'), 'wt') as f:
      f.write(compiled.as_text())
  state, profile = profile_steps(compiled, state, batch, 2)
  _say(name, f'profiled: {profile.get("gpu_ms_per_step")} GPU ms per step')
  return state, profile


def _result(name, preset, variant, n_dev, per_dev, remat, cfg_model, config, times, m, **extra):
  from mobilemoe_jax.scaling import accounting
  flops_tok = accounting.train_flops_per_token(cfg_model, SEQ)
  counts = accounting.count(cfg_model)
  B = config.train.batch_size
  med = statistics.median(times)
  tok_s = B * SEQ / med
  pipe = extra.get('step_s_pipelined')
  if pipe:
    extra = dict(extra, tokens_per_s_pipelined=B * SEQ / pipe,
                 mfu_pipelined=B * SEQ / pipe * flops_tok / (PEAK * n_dev))
  n_assign = B * SEQ * cfg_model.moe.top_k * max(
      0, cfg_model.n_layers - cfg_model.moe.first_dense) if cfg_model.moe.n_experts else 0
  return dict({
      'name': name, 'impl': 'jax', 'preset': preset, 'variant': variant, 'n_gpus': n_dev,
      'batch_per_gpu': per_dev, 'seq_len': SEQ, 'remat': remat,
      'tokens_per_step': B * SEQ, 'step_s_median': med, 'step_s_all': times,
      'tokens_per_s': tok_s, 'tokens_per_s_per_gpu': tok_s / n_dev,
      'train_flops_per_token': flops_tok,
      'mfu': tok_s * flops_tok / (PEAK * n_dev),
      'total_params': counts.total_params, 'active_params': counts.active_params,
      'loss_last': float(m['loss']), 'dropped_frac': (float(m['dropped']) / n_assign) if n_assign else 0.0,
      'capacity_factor': cfg_model.moe.capacity_factor if cfg_model.moe.n_experts else None,
      'stubbed_modules': STUBBED, 'attention_impl': cfg_model.attention_impl,
      'loss_chunk_len': config.train.loss_chunk_len,
      'loss_exp_once': bool(config.train.get('loss_exp_once', False)) if config.train.loss_chunk_len else None,
      'attention_mask': cfg_model.get('attention_mask'),
      'attention_mask_step': STEP_MASK.get(id(config)),
      'fuse_gate_up': cfg_model.get('fuse_gate_up'), 'grad_accum': config.train.grad_accum,
      'adam_mu_dtype': config.train.get('adam_mu_dtype') or 'float32',
  }, **extra)


def emit(res):
  """One run's result, read by the orchestrator (a job prints one per run it measured)."""
  print('RESULT ' + json.dumps(res), flush=True)


def run_jax(name, preset, n_dev, variant):
  """The job's own run, then its EXTRAS on the same state; emits each run's result."""
  _imports()
  import threading
  import jax
  from mobilemoe_jax.moe import dispatch

  _say(name, f'imported; {len(jax.devices())} devices')
  devices = jax.devices()[:n_dev]
  assert len(devices) == n_dev, f'need {n_dev} devices, have {len(jax.devices())}'
  mem_limit = (devices[0].memory_stats() or {}).get('bytes_limit')
  per_gpu = _per_gpu(variant)
  attempts = [(per_gpu, False), (per_gpu, True), (per_gpu // 2, False)]
  errors = []
  for per_dev, remat in attempts:
    cfg_model, config, mesh = _setup(preset, variant, n_dev, per_dev, remat, devices)
    try:
      with jax.set_mesh(mesh):
        step, init_state, abstract, state_sh, batch = _step_and_batch(config, mesh)
        _say(name, f'lowering (batch {per_dev}/device, remat {remat})')
        # The initial state is built in a thread while the step compiles (both take minutes
        # at full size on the device; XLA releases the GIL while compiling), and so are the
        # steps of the job's extras.
        init_out, extra_out = {}, {}

        def build():
          t_init = time.time()
          try:   # the key is an argument, as in train_and_evaluate (no constant folding)
            init_out['state'] = jax.block_until_ready(
                jax.jit(init_state, out_shardings=state_sh)(jax.random.key(config.train.seed)))
          except Exception as e:  # noqa: BLE001
            init_out['error'] = e
          init_out['seconds'] = time.time() - t_init

        def compile_extra(x_name):
          t0 = time.time()
          try:
            x_variant = JOBS[x_name][2]
            x_per_dev = _per_gpu(x_variant)
            x_cfg, x_config, x_mesh = _setup(preset, x_variant, n_dev, x_per_dev, remat, devices)
            with jax.set_mesh(x_mesh):
              x_step, _, x_abstract, _, x_batch = _step_and_batch(x_config, x_mesh)
              x_compiled = x_step.lower(x_abstract, x_batch).compile()
            extra_out[x_name] = (x_variant, x_per_dev, x_cfg, x_config, x_compiled, x_batch,
                                 time.time() - t0, x_abstract)
          except Exception as e:  # noqa: BLE001
            extra_out[x_name] = f'{type(e).__name__}: {str(e)[:300]}'

        threads = [threading.Thread(target=build)] + [
            threading.Thread(target=compile_extra, args=(x,)) for x in _extras(name)]
        for th in threads:
          th.start()
        t0 = time.time()
        try:
          compiled = step.lower(abstract, batch).compile()
          compile_s = time.time() - t0
        finally:   # nothing else may run on the GPU (compiles autotune there) while timing
          for th in threads:
            th.join()
        _say(name, f'step compiled in {compile_s:.1f} s; state built alongside in '
                   f'{init_out.get("seconds", 0):.1f} s')
        if 'error' in init_out:
          raise init_out['error']
        need = _need(compiled)
        if need and mem_limit and need > 0.97 * mem_limit:
          raise MemoryError(f'compiled step needs {need / 2**30:.1f} GiB per device '
                            f'> limit {mem_limit / 2**30:.1f} GiB')
        ep_path = bool(cfg_model.moe.n_experts) and dispatch.can_expert_parallel(
            config.train.batch_size * SEQ, cfg_model.moe.n_experts)
        state = init_out.pop('state')
        state, times, m, pipe = _time_steps(name, compiled, state, batch)
        peak_mem = max((d.memory_stats() or {}).get('peak_bytes_in_use', 0) for d in devices)
        state, profile = _maybe_profile(name, compiled, state, batch)
        del compiled
        emit(_result(
            name, preset, variant, n_dev, per_dev, remat, cfg_model, config, times, m,
            compile_s=compile_s, init_s=init_out.get('seconds'), compiled_bytes_per_device=need,
            step_s_pipelined=pipe,
            peak_bytes_in_use=peak_mem, device_kind=devices[0].device_kind,
            failed_attempts=errors, expert_parallel_path=ep_path, profile=profile))
        for x_name in _extras(name):   # in turn, on the state the last one left
          out = extra_out.pop(x_name)
          if isinstance(out, str):
            emit({'name': x_name, 'error': [out], 'measured_in': name})
            continue
          x_variant, x_per_dev, x_cfg, x_config, x_compiled, x_batch, x_compile_s, x_abstract = out
          del out
          # An extra may keep part of the state in other dtypes (train.adam_mu_dtype): it runs
          # on the state cast to its own, and the state is cast back after it.
          state = _cast_like(state, x_abstract)
          x_need = _need(x_compiled)
          if x_need and mem_limit and x_need > 0.97 * mem_limit:
            emit({'name': x_name, 'measured_in': name, 'error': [
                f'compiled step needs {x_need / 2**30:.1f} GiB per device > limit']})
            continue
          try:
            state, x_times, x_m, x_pipe = _time_steps(x_name, x_compiled, state, x_batch)
          except Exception as e:  # noqa: BLE001
            emit({'name': x_name, 'measured_in': name,
                  'error': [f'{type(e).__name__}: {str(e)[:300]}']})
            continue
          state, x_profile = _maybe_profile(x_name, x_compiled, state, x_batch)
          state = _cast_like(state, abstract)
          del x_compiled
          emit(_result(
              x_name, preset, x_variant, n_dev, x_per_dev, remat, x_cfg, x_config, x_times, x_m,
              compile_s=x_compile_s, compiled_bytes_per_device=x_need, peak_bytes_in_use=None,
              step_s_pipelined=x_pipe,
              device_kind=devices[0].device_kind, measured_in=name, profile=x_profile,
              note=f'measured in the process of {name}, after it, on its state (initial '
                   'state built once); compiled alongside; peak memory not separable: see '
                   'compiled_bytes_per_device'))
        del state
        return
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
  emit({'name': name, 'error': errors, 'stubbed_modules': STUBBED})


def profile_steps(compiled, state, batch, n_steps):
  """Runs n_steps under jax.profiler and sums the GPU time of each kernel on the trace's
  stream lines; returns (state, summary per step)."""
  import glob
  import gzip
  import tempfile
  from collections import defaultdict
  import jax
  log_dir = tempfile.mkdtemp(prefix='trace_')
  with jax.profiler.trace(log_dir):
    for _ in range(n_steps):
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
  files = glob.glob(os.path.join(log_dir, 'plugins', 'profile', '*', '*.trace.json.gz'))
  if not files:
    return state, {'error': f'no trace.json.gz under {log_dir}'}
  with gzip.open(files[0]) as f:
    events = json.load(f)['traceEvents']
  procs = {e['pid']: e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  threads = {(e['pid'], e['tid']): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  kernels = defaultdict(lambda: [0.0, 0])   # name: [ms per step, calls]
  args_of = {}   # name: the trace's args of its first event (the HLO op it runs, when given)
  for e in events:
    if (e.get('ph') == 'X' and 'GPU' in procs.get(e['pid'], '')
        and threads.get((e['pid'], e['tid']), '').startswith('Stream')):
      kernels[e['name']][0] += e.get('dur', 0) / 1e3 / n_steps
      kernels[e['name']][1] += 1
      args_of.setdefault(e['name'], {k: str(v)[:1500] for k, v in (e.get('args') or {}).items()})

  def kind(name):
    text = name.lower()
    for k, keys in (('attention (cuDNN)', ('cudnn', 'fmha', 'sdpa', 'flash')),
                    ('matmul', ('gemm', 'xmma', 'nvjet', 'cublas', 'cutlass', 'dot')),
                    ('collective', ('nccl', 'all-to-all', 'all-reduce')),
                    ('scatter/gather/sort', ('scatter', 'gather', 'sort', 'dynamic-slice'))):
      if any(w in text for w in keys):
        return k
    return 'other (elementwise, reductions, copies)'

  if not kernels:   # say what the trace held instead
    return state, {'error': 'no GPU stream events', 'lines': sorted(
        {f'{procs.get(p, p)} / {name}' for (p, _), name in threads.items()})[:40]}
  by_kind = defaultdict(float)
  for k, v in kernels.items():
    by_kind[kind(k)] += v[0]
  return state, {
      'steps': n_steps,
      'gpu_ms_per_step': round(sum(v[0] for v in kernels.values()), 2),
      'kernel_ms_by_kind': {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      'top_kernels': [{'name': k, 'ms': round(v[0], 3), 'calls': v[1] // n_steps,
                       'args': args_of.get(k, {})} for k, v in
                      sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]],
  }


def run_attention_check(name):
  """cuDNN attention (model.attention_impl='cudnn') against XLA's in the model's Attention
  layer at the S preset's shape: packed rows (several documents, padding), a global and a
  windowed layer, bf16. Reports the largest differences of outputs (real tokens) and of
  input gradients, next to bf16 XLA's own distance from an fp32 XLA reference."""
  _imports()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from configs.stages.common import PRESETS
  from mobilemoe_jax.model import layers
  b, t = 4, 2048
  seg = np.zeros((b, t), np.int32)
  pos = np.zeros((b, t), np.int32)
  for row, lengths in enumerate([[2048], [700, 900, 400], [1500, 500], [300, 300, 1000]]):
    start = 0
    for i, n in enumerate(lengths):   # the last row ends with 48 padding tokens
      seg[row, start:start + n], pos[row, start:start + n] = i + 1, np.arange(n)
      start += n
  x = jax.random.normal(jax.random.key(0), (b, t, 768), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (b, t, 768), jnp.float32) * (seg > 0)[..., None]
  out = {}
  for window in (0, 512):
    res = {}
    # cudnn: the mask as a bias with its gradient (model.attention_mask 'bias', JAX's public
    # call); cudnn_nograd: the bias without its gradient; cudnn_auto: 'auto', which on these
    # packed rows takes the 'bias_nograd' branch at run time (lax.cond).
    for key, impl, dtype, how in (('xla_float32', 'xla', 'float32', 'bias'),
                                  ('xla_bfloat16', 'xla', 'bfloat16', 'bias'),
                                  ('cudnn_bfloat16', 'cudnn', 'bfloat16', 'bias'),
                                  ('cudnn_nograd_bfloat16', 'cudnn', 'bfloat16', 'bias_nograd'),
                                  ('cudnn_auto_bfloat16', 'cudnn', 'bfloat16', 'auto')):
      cfg = PRESETS['mobilemoe_s']().model
      cfg.update(dict(attention_impl=impl, dtype=dtype, attention_mask=how))
      layer = layers.Attention(cfg, window, nnx.Rngs(0))

      def loss(x):
        y, _ = layer(x.astype(dtype), jnp.asarray(pos), jnp.asarray(seg))
        return jnp.sum(y.astype(jnp.float32) * w), y.astype(jnp.float32)
      try:
        (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
      except Exception as e:  # noqa: BLE001
        res[key] = f'{type(e).__name__}: {str(e)[:300]}'
        continue
      # real tokens only: padding queries differ between the paths (and carry no loss), and
      # so do the gradients that reach padding positions.
      res[key] = (np.asarray(y) * (seg > 0)[..., None], np.asarray(g) * (seg > 0)[..., None])
    ref_y, ref_g = res['xla_float32']
    err = lambda a, r: float(np.abs(a - r).max() / np.abs(r).max())
    out[f'window_{window}'] = {
        f'{k}_vs_xla_float32': {'output_max_rel_err': err(v[0], ref_y), 'grad_max_rel_err': err(v[1], ref_g)}
        if isinstance(v, tuple) else v for k, v in res.items() if k != 'xla_float32'}
    _say(name, f'window {window}: {out[f"window_{window}"]}')
  # Time of the attention op alone (forward + backward, batch 8 x 2048, 12 heads / 4 KV heads
  # of 64, bf16): XLA with the mask, cuDNN with the mask (as the model calls it), and cuDNN
  # with only the causal/window flags (exact for one document per row only).
  b8 = 8
  q = jax.random.normal(jax.random.key(2), (b8, t, 12, 64), jnp.bfloat16)
  kv = jax.random.normal(jax.random.key(3), (2, b8, t, 4, 64), jnp.bfloat16)
  p8 = jnp.broadcast_to(jnp.arange(t), (b8, t))
  s8 = jnp.ones((b8, t), jnp.int32)
  timing = {}
  for window in (0, 512):
    mask = layers.attention_mask(p8, p8, s8, s8, window)
    lw = (window - 1, 0) if window else None
    calls = {
        'cudnn_mask_nograd': lambda q, k, v: layers.cudnn_attention(q, k, v, mask, s8, window, 'bias_nograd'),
        'cudnn_auto': lambda q, k, v: layers.cudnn_attention(q, k, v, mask, s8, window, 'auto'),
        'xla_mask': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask),
        'cudnn_mask': lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=True, implementation='cudnn', local_window_size=lw),
        'cudnn_flags_only': lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation='cudnn', local_window_size=lw)}
    for impl, fn in calls.items():
      step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
      try:
        jax.block_until_ready(step(q, kv[0], kv[1]))
      except Exception as e:  # noqa: BLE001
        timing[f'window_{window}/{impl}'] = f'{type(e).__name__}: {str(e)[:300]}'
        continue
      ts = []
      for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(step(q, kv[0], kv[1]))
        ts.append(time.perf_counter() - t0)
      timing[f'window_{window}/{impl}'] = round(1e3 * statistics.median(ts), 3)
  _say(name, f'attention fwd+bwd ms per layer: {timing}')
  return {'name': name, 'impl': 'check', 'errors_relative_to_max': out,
          'rows': 'packed: [2048], [700, 900, 400], [1500, 500], [300, 300, 1000] + 48 padding',
          'attention_fwd_bwd_ms_per_layer_batch8': timing}


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
    emit(run_torch(name, preset))
  elif variant == 'attention_check':
    emit(run_attention_check(name))
  else:
    run_jax(name, preset, n_dev, variant)


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
          f'--batch={BATCH}', f'--warmup={WARMUP}', f'--steps={STEPS}', f'--pipelined={PIPELINED}']
  if args.platform:
    argv.append(f'--platform={args.platform}')
  if SMALL:
    argv.append('--small')
  if args.stub_grain:
    argv.append('--stub-grain')
  if args.profile:
    argv.append(f'--profile={args.profile}')
  if args.hlo_dir:
    argv.append(f'--hlo-dir={args.hlo_dir}')
  if args.extras is not None:
    argv.append(f'--extras={args.extras}')
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
  found = {}   # run name: result (a job's own run and its EXTRAS)
  for line in out.splitlines():
    if line.startswith('RESULT '):
      r = json.loads(line[7:])
      found[r['name']] = r
  tail = '\n'.join(l for l in out.splitlines() if not l.startswith('RESULT '))[-3000:]
  text = f'===== {name} ({time.time() - t_start:.0f} s, rc {proc.returncode})\n{tail}\n'
  print(text, flush=True)
  if logf:
    logf.write(text)
    logf.flush()
  if name not in found:
    found[name] = {'name': name, 'error': [f'no result (rc {proc.returncode}): {tail[-800:]}']}
  found[name]['wall_s'] = time.time() - t_start
  return found


def summarize(runs):
  """Headline MFU: MobileMoE-S as configured, model and training settings both: the preset's
  global batch of 256 x 2048 on one GPU as 8 accumulated micro-batches of 32. That is the run
  s_accum256_1gpu where it was measured with 'auto' resolved on the host (attention_mask_step
  'causal' for these one-document rows: the step train_and_evaluate runs, since call 11), else
  s_accum256_causal_1gpu (the same step, asked for by name, call 10); where neither exists,
  the 8 x 2048 step. MFU is from the median of the synced steps. The peer ratio compares
  equal batches (8 x 2048): s_chunked_ce_1gpu measured the same way, else s_causal_attn_1gpu,
  else s_chunked_ce_1gpu (before call 11) / s_cudnn_attn_1gpu (before train.loss_chunk_len).
  Weak scaling: s_cudnn_ep{2,4} against s_cudnn_1gpu_ref (cuDNN attention, measured on the
  same machine) where measured, else mobilemoe_s_ep{2,4} against mobilemoe_s_1gpu (XLA
  attention, as when those were measured)."""
  ok = lambda k: k in runs and 'error' not in runs[k]
  s = {}
  host = lambda k: ok(k) and runs[k].get('attention_mask_step') == 'causal'
  headline = next((k for k in ('s_accum256_1gpu', 's_accum256_causal_1gpu', 's_chunked_ce_1gpu',
                               's_causal_attn_1gpu', 's_cudnn_attn_1gpu')
                   if (host(k) if k in ('s_accum256_1gpu', 's_chunked_ce_1gpu') else ok(k))), None)
  if headline:
    head = runs[headline]
    s['headline_run'] = headline
    s['mfu_mobilemoe_s_1gpu'] = head['mfu']
    s['tokens_per_s_mobilemoe_s_1gpu'] = head['tokens_per_s']
  same_batch = ('s_chunked_ce_1gpu' if host('s_chunked_ce_1gpu') else
                next((k for k in ('s_causal_attn_1gpu', 's_chunked_ce_1gpu', 's_cudnn_attn_1gpu')
                      if ok(k)), None))
  if same_batch and ok('torch_peer_s_1gpu'):
    s['speedup_vs_torch_peer'] = runs[same_batch]['tokens_per_s'] / runs['torch_peer_s_1gpu']['tokens_per_s']
    s['speedup_vs_torch_peer_runs'] = [same_batch, 'torch_peer_s_1gpu']
  for n in (2, 4):
    for ep, ref in ((f's_cudnn_ep{n}', 's_cudnn_1gpu_ref'), (f'mobilemoe_s_ep{n}', 'mobilemoe_s_1gpu')):
      if ok(ep) and ok(ref) and runs[ep]['batch_per_gpu'] == runs[ref]['batch_per_gpu']:
        s[f'weak_scaling_efficiency_{n}gpu'] = runs[ep]['tokens_per_s_per_gpu'] / runs[ref]['tokens_per_s_per_gpu']
        s[f'weak_scaling_efficiency_{n}gpu_runs'] = [ep, ref]
        break
  if ok('mobilemoe_s_ep4') and ok('mobilemoe_s_1gpu'):
    s['weak_scaling_efficiency_4gpu_xla_attention'] = (
        runs['mobilemoe_s_ep4']['tokens_per_s_per_gpu'] / runs['mobilemoe_s_1gpu']['tokens_per_s_per_gpu'])
  if ok('mobilemoe_s_1gpu'):
    s['mfu_mobilemoe_s_1gpu_xla_attention'] = runs['mobilemoe_s_1gpu']['mfu']
  for k in runs:
    if ok(k) and 'mfu' in runs[k] and k != 'mobilemoe_s_1gpu':
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
  plan = PLAN
  if not cpu and n_gpu == 1:   # one GPU: the selected one-GPU jobs in turn, each with its own limit
    names = [n for n in SERIAL if only is None or n in only]
    for n in sorted(set(only or JOBS) - set(names)):
      result['runs'][n] = {'name': n, 'error': [f'needs {JOBS[n][1]} GPUs, have 1']}
    plan = [(args.job_limit_s, [([0], [n])]) for n in names]
  for limit, phase in plan:
    deadline = min(time.time() + limit * args.time_scale, t_all + args.deadline_s)
    procs = []
    for gpus, names in phase:
      names = [n for n in names if only is None or n in only]
      if not names:
        continue
      if not cpu and max(gpus) >= n_gpu:
        for n in names:   # (a run measured in an earlier phase of this call is kept)
          result['runs'].setdefault(n, {'name': n, 'error': [f'needs GPUs {gpus}, have {n_gpu}']})
        continue
      procs.append((gpus, names))
    if cpu:  # two cores: one job at a time
      for gpus, names in procs:
        for n in names:
          result['runs'].update(finish(n, launch(n, gpus, cpu), time.time(), logf, deadline))
    else:   # lanes side by side, jobs inside a lane in turn
      import threading

      def lane(gpus, names):
        for n in names:
          result['runs'].update(finish(n, launch(n, gpus, cpu), time.time(), logf, deadline))
      threads = [threading.Thread(target=lane, args=lp) for lp in procs]
      for th in threads:
        th.start()
      for th in threads:
        th.join()
    result['wall_s'] = time.time() - t_all
    merged = merge(result) if args.merge_into else result
    merged['summary'] = summarize(merged['runs'])
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, 'w') as f:
      json.dump(merged, f, indent=1)
  result = merged
  print(table(result))
  print(json.dumps(result['summary'], indent=1))
  print(f'wrote {out_path} ({time.time() - t_all:.0f} s)')


def merge(result):
  """The results in --merge-into with this call's runs put in (each tagged with its call)."""
  with open(args.merge_into) as f:
    old = json.load(f)
  calls = old.setdefault('calls', [])
  call = {'command': result['command'], 'date': result['date'], 'wall_s': result['wall_s'],
          'gpus': result['gpus'], 'versions': result['versions'], 'runs': list(result['runs'])}
  if calls and calls[-1]['date'] == call['date']:
    calls[-1] = call     # the same call, written again after its next job
  else:
    calls.append(call)
  runs, superseded = dict(old['runs']), old.setdefault('superseded', {})
  for name, r in result['runs'].items():
    if name in runs and runs[name].get('call') != len(calls):   # keep what it replaces
      superseded.setdefault(name, []).append(runs[name])
    runs[name] = dict(r, call=len(calls))
  return dict(old, runs=runs)


def table(result):
  rows = ['| run | GPUs | batch/GPU x seq | step ms | tokens/s | tokens/s/GPU | MFU | peak mem GiB | notes |',
          '|---|---|---|---|---|---|---|---|---|']
  for name, r in result['runs'].items():
    if 'error' in r:
      rows.append(f'| {name} | | | | | | | | failed: {"; ".join(r["error"])[:200]} |')
      continue
    if 'tokens_per_s' not in r:   # the attention check
      continue
    impl = r.get('attention_impl', 'xla')   # runs before the field existed used XLA's
    notes = [] if impl == 'xla' else ['cuDNN attention' + (' (auto)' if impl == 'auto' else '')]
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
