"""Training throughput: tokens/s and MFU of the project's train step over named workloads.

A workload (WORKLOADS below) says what is measured: a model preset, rows per device per
optimizer step, sequence length, devices (expert parallel when > 1), micro-batches,
one document per row or packed rows (several documents per row with segment ids, as the
data pipeline feeds pretraining), config overrides, and the kind of machine. Every JAX
workload jits `mobilemoe_jax.train.trainer.make_train_step` with the trainer's own init
function, optimizer and shardings, for the step `trainer.step_config` picks for the batch
(the step `train_and_evaluate` runs), on random tokens, so no data files are needed.
`peer_*` workloads train a PyTorch peer built to the same shape.

Timing: compile (not timed), `--warmup` steps, then `--steps` steps each ended by
block_until_ready; tokens/s = tokens per step / median step time. MFU = tokens/s per device x
accounting.train_flops_per_token (6 x active params + attention at each layer's visible
context) / the device's dense bf16 peak (PEAK_FLOPS; none on CPU). A workload with `vs`
is measured in the same run as that one, and its row keeps the ratio of per-device tokens/s.

Results: bench/results/train_throughput.json holds one row per workload and GPU model
(`rows`: {device kind: {workload: row}}), the newest measurement on that GPU, with the
command, date, commit and machine that produced it; a run replaces the rows of the workloads
it measured on its GPU, keeps the others (an H100's row beside an H200's) and drops rows of
workloads no longer in WORKLOADS (a row has to be reproducible by its name). `summary` names
the GPU, workload, commit and date of each figure, and keeps each GPU's own under `by_gpu`.
A run on another machine writes its own --out; `--merge FILE` puts its rows into the file here.

  python bench/train_throughput.py --headline               # HEADLINE, on one GPU
  python bench/train_throughput.py --workload=rs_b8,rs_ep2  # by name (rs_ep2 needs 2 GPUs)
  python bench/train_throughput.py --workload=tiny_cpu,tiny_cpu_packed   # CPU, any machine
  python bench/train_throughput.py --list                   # the workload table
  python bench/train_throughput.py --table                  # the results as markdown
  python bench/train_throughput.py --merge device/train_throughput.json   # a device run's rows
"""
import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, ROOT)
from bench import runinfo  # noqa: E402
RESULTS = os.path.join(ROOT, 'bench', 'results', 'train_throughput.json')
# Dense bf16 peak per device, datasheet (SXM parts); MFU is not computed for other devices.
PEAK_FLOPS = {'NVIDIA H200': 989e12, 'NVIDIA H100 80GB HBM3': 989e12}


@dataclasses.dataclass
class Workload:
  what: str                   # one line: what is measured
  preset: str                 # a key of configs/stages/common.PRESETS
  batch: int                  # rows per device per optimizer step
  seq: int = 2048
  devices: int = 1            # mesh expert=devices: expert parallel when > 1
  grad_accum: int = 1         # micro-batches per optimizer step (train.grad_accum)
  packed: bool = False        # several documents per row with segment ids; else one per row
  model: dict = dataclasses.field(default_factory=dict)   # model-config overrides (a.b keys)
  train: dict = dataclasses.field(default_factory=dict)   # train-config overrides
  impl: str = 'jax'           # a key of RUNNERS: 'jax' | 'transformers' | 'torchtitan' (peers)
  peer: dict = dataclasses.field(default_factory=dict)    # peer options (torchtitan: compile, attention)
  machine: str = 'gpu'        # 'gpu' | 'cpu' (cpu: fake host devices)
  vs: str = ''                # workload measured in the same run; the row keeps the ratio


# The presets mobilemoe_s / mobilemoe_m are the released models (configs/mobilemoe_s.py, field
# for field from config.json, QK-norm and Llama-3 RoPE scaling included); each row records the
# shape and parameter counts it ran (model_summary). Training workloads add a capacity.
CAPACITY = {'moe.capacity_factor': 1.25}
DROPLESS = {'moe.capacity_factor': 0.0}
# The torchtitan peer as its Qwen3-MoE users run it on one GPU: FSDP2 mixed precision (bf16
# params, fp32 reductions), grouped-GEMM experts, dropless; per-TransformerBlock torch.compile
# or eager; attention 'varlen' (flash attention over documents) or 'flex' (its default).
TORCHTITAN_COMPILED = {'compile': True, 'attention': 'varlen'}


# The presets as configured (bf16 compute on GPU, capacity 1.25, chunked loss, cuDNN attention
# on GPU, XLA's on CPU) unless a workload overrides a field.
WORKLOADS = {
    'rs_b256_accum16_packed': Workload(
        'released MobileMoE-S, 256 x 2048 per step as 16 accumulated micro-batches of 16, '
        'packed rows, capacity 1.25 (the largest micro-batch of the preset batch that fits one '
        'H100 80GB)', 'mobilemoe_s', 256, grad_accum=16, packed=True, model=CAPACITY),
    'rs_b256_accum8_packed': Workload(
        'the same global batch as 8 accumulated micro-batches of 32 (twice the activation '
        'memory: 78.4 GB, over an H100\'s 80 GB at the 0.92 allocator fraction)', 'mobilemoe_s',
        256, grad_accum=8, packed=True, model=CAPACITY, vs='rs_b256_accum16_packed'),
    'rs_b256_accum4_packed': Workload(
        'the same global batch as 4 accumulated micro-batches of 64 (four times the activation '
        'memory: larger matmuls where the GPU holds them)', 'mobilemoe_s', 256, grad_accum=4,
        packed=True, model=CAPACITY, vs='rs_b256_accum16_packed'),
    'rs_b256_accum16_dropless_packed': Workload(
        'the same step with dropless experts (capacity_factor 0): no routed compute spent on '
        'capacity padding, none dropped', 'mobilemoe_s', 256, grad_accum=16, packed=True,
        model=DROPLESS, vs='rs_b256_accum16_packed'),
    'rs_b8': Workload('released MobileMoE-S, 8 x 2048 per step, one document per row, '
                      'capacity 1.25', 'mobilemoe_s', 8, model=CAPACITY),
    'rs_b8_packed': Workload('released MobileMoE-S, 8 x 2048 per step, packed rows, capacity 1.25',
                             'mobilemoe_s', 8, packed=True, model=CAPACITY, vs='rs_b8'),
    'rs_b256_accum8_packed_bias': Workload(
        'the same step with packed rows attended through the mask as a bias (cuDNN, no bias '
        "gradient) instead of cuDNN's packed layout", 'mobilemoe_s', 256, grad_accum=8,
        packed=True, model={**CAPACITY, 'attention_mask': 'bias_nograd'}, vs='rs_b256_accum8_packed'),
    'rs_b8_packed_bias': Workload(
        'released MobileMoE-S, 8 x 2048 packed rows attended through the mask as a bias (cuDNN, '
        "no bias gradient) instead of cuDNN's packed layout", 'mobilemoe_s', 8, packed=True,
        model={**CAPACITY, 'attention_mask': 'bias_nograd'}, vs='rs_b8_packed'),
    'rs_b8_dropless_packed': Workload(
        'released MobileMoE-S, 8 x 2048 packed rows, dropless experts (capacity_factor 0)',
        'mobilemoe_s', 8, packed=True, model=DROPLESS,
        vs='rs_b8_packed'),
    'rm_b256_accum64_packed': Workload(
        'released MobileMoE-M (2.8B total / 528M active), 256 x 2048 per step as 64 accumulated '
        'micro-batches of 4, packed rows, capacity 1.25 (fp32 master weights, AdamW states and '
        'gradient accumulators plus the bf16 copy: ~51 GB of the 80 GB by arithmetic, before '
        'activations)', 'mobilemoe_m', 256, grad_accum=64,
        packed=True, model=CAPACITY),
    'rm_b256_accum16_packed': Workload(
        'the released M at the same global batch as 16 accumulated micro-batches of 16 (the '
        "released S's MFU micro-batch): a quarter of the accumulation passes over M's 2.8B fp32 "
        'gradient sums, four times the activation memory (where the GPU holds it)',
        'mobilemoe_m', 256, grad_accum=16, packed=True, model=CAPACITY,
        vs='rm_b256_accum64_packed'),
    'rm_b256_accum8_packed': Workload(
        'the released M as 8 accumulated micro-batches of 32 (eight times the activation memory '
        'of rm_b256_accum64_packed)', 'mobilemoe_m', 256, grad_accum=8, packed=True,
        model=CAPACITY, vs='rm_b256_accum64_packed'),
    # Weak scaling: rs_b8_packed's step on 2 and 4 GPUs (mesh expert=devices), 8 x 2048 rows
    # per GPU; the ratio to rs_b8_packed (the 1-GPU point) is the efficiency.
    'rs_ep2': Workload('released MobileMoE-S expert parallel on 2 GPUs, 8 x 2048 per GPU, packed '
                       'rows (weak scaling)', 'mobilemoe_s', 8, devices=2, packed=True,
                       model=CAPACITY, vs='rs_b8_packed'),
    'rs_ep4': Workload('released MobileMoE-S expert parallel on 4 GPUs, 8 x 2048 per GPU, packed '
                       'rows (weak scaling)', 'mobilemoe_s', 8, devices=4, packed=True,
                       model=CAPACITY, vs='rs_b8_packed'),
    'peer_torchtitan_rs_b8_packed': Workload(
        "torchtitan Qwen3-MoE built to the released MobileMoE-S's shape, compiled blocks, "
        'varlen attention; 8 x 2048 packed rows', 'mobilemoe_s', 8, packed=True,
        impl='torchtitan', peer=TORCHTITAN_COMPILED, vs='rs_b8_packed'),
    'peer_torchtitan_flex_rs_b8_packed': Workload(
        'the same torchtitan model, compiled blocks, flex attention (its default attention); '
        '8 x 2048 packed rows', 'mobilemoe_s', 8, packed=True,
        impl='torchtitan', peer={'compile': True, 'attention': 'flex'}, vs='rs_b8_packed'),
    'peer_torchtitan_eager_rs_b8_packed': Workload(
        "the same torchtitan model with its defaults: eager (no torch.compile), flex attention; "
        '8 x 2048 packed rows', 'mobilemoe_s', 8, packed=True,
        impl='torchtitan', peer={'compile': False, 'attention': 'flex'}, vs='rs_b8_packed'),
    'peer_transformers_rs_b8': Workload(
        "transformers Qwen2-MoE built to the released MobileMoE-S's shape (softmax routing, "
        'gated shared expert: its model has no other); 8 x 2048, one document per row',
        'mobilemoe_s', 8, impl='transformers', vs='rs_b8'),
    'tiny_gpu_torchtitan': Workload(
        'the torchtitan peer at the tiny preset on a GPU, 4 x 128 packed (code-path check)',
        'tiny', 4, seq=128, packed=True, impl='torchtitan', peer=TORCHTITAN_COMPILED),
    'tiny_cpu': Workload('tiny preset on CPU, 4 x 128 (code-path check, not a speed claim)',
                         'tiny', 4, seq=128, machine='cpu'),
    'tiny_cpu_packed': Workload('tiny preset on CPU, 4 x 128 packed rows', 'tiny', 4, seq=128,
                                packed=True, machine='cpu', vs='tiny_cpu'),
    'peer_transformers_tiny_cpu': Workload(
        'the transformers peer at the tiny preset on CPU, 4 x 128 (code-path check)', 'tiny', 4,
        seq=128, impl='transformers', machine='cpu', vs='tiny_cpu'),
    'tiny_cpu_ep2': Workload('tiny preset on 2 fake CPU devices, expert parallel, 4 x 128 each',
                             'tiny', 4, seq=128, devices=2, machine='cpu', vs='tiny_cpu'),
}
# The headline rows: the released S on packed rows at the preset's batch (MFU, with a capacity
# and dropless) and at 8 x 2048 beside one-document rows and its dropless variant, and the
# peers at 8 x 2048. One H100/H200.
HEADLINE = ('rs_b256_accum16_packed', 'rs_b256_accum16_dropless_packed', 'rs_b8',
            'rs_b8_packed', 'rs_b8_dropless_packed', 'peer_torchtitan_rs_b8_packed',
            'peer_torchtitan_flex_rs_b8_packed', 'peer_torchtitan_eager_rs_b8_packed',
            'peer_transformers_rs_b8')


# --------------------------------------------------------------------------------- batches


def packed_rows(rng, rows, seq, vocab):
  """Random rows of several documents each, in the layout mobilemoe_jax.data.pipeline feeds
  ({inputs, targets, segment_ids, positions, loss_mask}: [rows, seq]): segment ids 1, 2, ...
  per document, 0 on padding; positions restart at 0 in every document; targets are the next
  token of the same document (a document of n tokens gives n - 1 input/target pairs).
  Lengths (pairs) are log-uniform in [seq / 32, seq] (64..2048 at seq 2048), the last
  document of a row cut to fit; a row ends in padding only when less than seq / 32 is left."""
  import numpy as np
  out = {k: np.zeros((rows, seq), np.int32) for k in ('inputs', 'targets', 'segment_ids',
                                                      'positions')}
  out['loss_mask'] = np.zeros((rows, seq), np.float32)
  lo, hi = max(2, seq // 32), seq
  for r in range(rows):
    start, seg = 0, 0
    while seq - start >= lo:
      n = min(int(np.exp(rng.uniform(np.log(lo), np.log(hi)))), seq - start)   # pairs
      ids = rng.integers(1, vocab, n + 1, dtype=np.int32)
      seg += 1
      sl = slice(start, start + n)
      out['inputs'][r, sl], out['targets'][r, sl] = ids[:-1], ids[1:]
      out['segment_ids'][r, sl], out['positions'][r, sl] = seg, np.arange(n)
      out['loss_mask'][r, sl] = 1.0
      start += n
  return out


def one_document_rows(rng, rows, seq, vocab):
  """Random rows of one document each, no padding (the same layout as packed_rows)."""
  import numpy as np
  ids = rng.integers(0, vocab, (rows, seq + 1), dtype=np.int32)
  return {'inputs': ids[:, :-1], 'targets': ids[:, 1:],
          'positions': np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
          'segment_ids': np.ones((rows, seq), np.int32),
          'loss_mask': np.ones((rows, seq), np.float32)}


# ----------------------------------------------------------------------------- JAX worker


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
  does not import (a GPU image without grain), it is stubbed; each row records which."""
  import importlib
  for mod in ('grain', 'grain.checkpoint', 'orbax.checkpoint', 'tensorboard.compat.proto',
              'tensorboard.summary.writer.event_file_writer'):
    try:
      importlib.import_module(mod)
    except Exception:  # noqa: BLE001
      _stub(mod)


def model_cfg(w: Workload):
  """The preset's model config with the workload's overrides (bf16 compute on GPU)."""
  from configs.stages.common import PRESETS
  cfg = PRESETS[w.preset]().model
  if w.machine == 'gpu':
    cfg.dtype = 'bfloat16'
  cfg.max_seq_len = max(cfg.max_seq_len, w.seq)
  cfg.update_from_flattened_dict(w.model)
  return cfg


def model_summary(cfg):
  """The shape a row was measured at (presets change; the row keeps what it ran)."""
  from mobilemoe_jax.scaling import accounting
  counts = accounting.count(cfg)
  m = cfg.moe
  return {'vocab_size': cfg.vocab_size, 'd_model': cfg.d_model, 'n_layers': cfg.n_layers,
          'n_experts': m.n_experts, 'top_k': m.top_k if m.n_experts else 0,
          'd_expert': m.d_expert if m.n_experts else 0,
          'd_shared': m.n_shared * m.d_shared if m.n_experts else 0,
          'capacity_factor': m.capacity_factor if m.n_experts else None,
          'total_params': counts.total_params, 'active_params': counts.active_params}


def _config(w: Workload, devices):
  """(model config, experiment config, mesh) of a workload."""
  from mobilemoe_jax import sharding
  from mobilemoe_jax.config import experiment, mesh_config, train_config
  cfg_model = model_cfg(w)
  config = experiment(cfg_model, mesh=mesh_config(data=1, expert=w.devices),
                      train=train_config('bench', small=w.machine == 'cpu',
                                         batch_size=w.batch * w.devices, seq_len=w.seq,
                                         grad_accum=w.grad_accum, steps=100_000, **w.train))
  return cfg_model, config, sharding.make_mesh(config.mesh, devices)


def _say(name, msg):
  print(f'[{name}] {msg}', flush=True)


def _time_steps(name, compiled, state, batch, warmup, steps):
  """warmup + steps steps, each ended by block_until_ready: (state, step times, metrics)."""
  import jax
  times, metrics = [], None
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  _say(name, f'{steps} steps, median {statistics.median(times):.4f} s')
  return state, times, jax.device_get(metrics)


def _compiled_bytes(compiled):
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes
          + mem.temp_size_in_bytes - mem.alias_size_in_bytes)


def step_parts(w, cfg_model, config, mesh):
  """What a workload's step is built from (under `jax.set_mesh(mesh)`): optimizer (tx, lr),
  init function and its abstract state, state and batch shardings, the host batch (seed 0)
  and the step config `trainer.step_config` picks for it."""
  import types
  import jax
  import numpy as np
  from mobilemoe_jax import sharding
  from mobilemoe_jax.train import optim, trainer
  tx, lr = optim.make_optimizer(config.train)
  init_state = trainer.make_init_fn(config, tx)
  abstract = jax.eval_shape(init_state)
  rows = packed_rows if w.packed else one_document_rows
  host = rows(np.random.default_rng(0), config.train.batch_size, w.seq, cfg_model.vocab_size)
  return types.SimpleNamespace(
      tx=tx, lr=lr, init_state=init_state, abstract=abstract,
      state_sh=sharding.state_shardings(abstract, mesh), batch_sh=sharding.batch_sharding(mesh),
      host=host, step_cfg=trainer.step_config(config, host['segment_ids'], host['positions']))


def run_jax(names, a):
  """Measures workloads of one preset and device count in this process, in turn: the
  initial state is built once (most of a run's minutes at full size) and each step trains
  on from the state the one before left. Emits one result per workload."""
  _imports()
  import jax
  from mobilemoe_jax.scaling import accounting
  from mobilemoe_jax.train import trainer
  state, state_key = None, None
  for name in names:
    w = WORKLOADS[name]
    devices = jax.devices()[:w.devices]
    if len(devices) != w.devices or (w.machine == 'gpu') != (devices[0].platform == 'gpu'):
      emit({'workload': name, 'error': f'needs {w.devices} {w.machine} devices, have '
                                       f'{len(jax.devices())} {jax.devices()[0].platform}'})
      continue
    try:
      cfg_model, config, mesh = _config(w, devices)
      with jax.set_mesh(mesh):
        p = step_parts(w, cfg_model, config, mesh)
        tx, lr, init_state, abstract = p.tx, p.lr, p.init_state, p.abstract
        state_sh, batch_sh, host, step_cfg = p.state_sh, p.batch_sh, p.host, p.step_cfg
        step = jax.jit(trainer.make_train_step(step_cfg, tx, lr),
                       in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                       donate_argnums=0)
        batch = {k: jax.device_put(v, batch_sh) for k, v in host.items()}
        t0 = time.time()
        compiled = step.lower(abstract, batch).compile()
        compile_s = time.time() - t0
        _say(name, f'compiled in {compile_s:.1f} s')
        key = (jax.tree.structure(abstract), [(l.shape, l.dtype) for l in jax.tree.leaves(abstract)],
               tuple(d.id for d in devices))
        init_s = None
        if key != state_key:   # shapes differ from the state in hand: a fresh one
          state = None
          t0 = time.time()
          state = jax.block_until_ready(jax.jit(init_state, out_shardings=state_sh)(
              jax.random.key(config.train.seed)))
          init_s, state_key = time.time() - t0, key
        state, times, m = _time_steps(name, compiled, state, batch, a.warmup, a.steps)
        profile = None
        if a.profile:
          state, profile = profile_steps(compiled, state, batch, 2, a.profile_dir and
                                         os.path.join(a.profile_dir, name))
        peak = max((d.memory_stats() or {}).get('peak_bytes_in_use', 0) for d in devices)
        compiled_bytes = _compiled_bytes(compiled)
        del compiled
    except Exception as e:  # noqa: BLE001  out of memory, a device missing a kernel, ...
      emit({'workload': name, 'error': f'{type(e).__name__}: {str(e)[:500]}'})
      state, state_key = None, None
      jax.clear_caches()
      continue
    tokens = config.train.batch_size * w.seq
    real = float(host['loss_mask'].sum())
    flops_tok = accounting.train_flops_per_token(cfg_model, w.seq)
    med = statistics.median(times)
    peak_flops = PEAK_FLOPS.get(devices[0].device_kind)
    n_assign = tokens * cfg_model.moe.top_k * max(
        0, cfg_model.n_layers - cfg_model.moe.first_dense) if cfg_model.moe.n_experts else 0
    emit({'workload': name, 'result': {
        'step_s_median': med, 'step_s_all': times, 'tokens_per_step': tokens,
        'real_tokens_per_step': real,
        'tokens_per_s': tokens / med, 'tokens_per_s_per_device': tokens / med / w.devices,
        'train_flops_per_token': flops_tok,
        'mfu': tokens / med / w.devices * flops_tok / peak_flops if peak_flops else None,
        'peak_flops_per_device': peak_flops,
        'compile_s': compile_s, 'init_s': init_s, 'compiled_bytes_per_device': compiled_bytes,
        # a process's peak: the highest of this and the workloads before it in the process
        'process_peak_bytes_in_use': peak or None,
        'loss_last': float(m['loss']),
        'dropped_frac': float(m['dropped']) / n_assign if n_assign else 0.0,
        'attention_impl': cfg_model.attention_impl,
        'attention_mask_step': step_cfg.model.get('attention_mask'),
        'attention_segments_step': step_cfg.model.get('attention_segments', 0),
        'loss_chunk_len': config.train.loss_chunk_len,
        'ep_overlap_chunks': cfg_model.moe.ep_overlap_chunks if w.devices > 1 else None,
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'stubbed_modules': STUBBED, 'profile': profile},
        'model': model_summary(cfg_model), 'device_kind': devices[0].device_kind})


def profile_steps(compiled, state, batch, n_steps, keep=None):
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
  hlo_text = compiled.as_text()
  if keep:   # the trace and the compiled HLO, for a closer look (`keep`.trace.json.gz, .hlo.txt.gz)
    os.makedirs(os.path.dirname(keep), exist_ok=True)
    shutil.copy(files[0], keep + '.trace.json.gz')
    with gzip.open(keep + '.hlo.txt.gz', 'wt') as f:
      f.write(hlo_text)
  with gzip.open(files[0]) as f:
    events = json.load(f)['traceEvents']
  procs = {e['pid']: e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  threads = {(e['pid'], e['tid']): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}

  def kind(name):
    text = name.lower()
    for k, keys in (('attention (cuDNN)', ('cudnn', 'fmha', 'sdpa', 'flash')),
                    ('matmul', ('gemm', 'xmma', 'nvjet', 'cublas', 'cutlass', 'dot')),
                    ('collective', ('nccl', 'all-to-all', 'all-reduce')),
                    ('scatter/gather/sort', ('scatter', 'gather', 'sort', 'dynamic-slice'))):
      if any(word in text for word in keys):
        return k
    return 'other (elementwise, reductions, copies)'

  kernels = defaultdict(lambda: [0.0, 0])   # name: [ms per step, calls]
  sources = _hlo_sources(hlo_text)
  by_source = defaultdict(float)
  for e in events:
    if (e.get('ph') == 'X' and 'GPU' in procs.get(e['pid'], '')
        and threads.get((e['pid'], e['tid']), '').startswith('Stream')):
      kernels[e['name']][0] += e.get('dur', 0) / 1e3 / n_steps
      kernels[e['name']][1] += 1
      # XLA's kernels are named after their HLO fusion; library kernels (cuBLAS, cuDNN) are
      # not, and inside a command buffer (CUDA graph) hlo_op names only the buffer.
      op = (e.get('args') or {}).get('hlo_op', '')
      where = sources.get(e['name']) or sources.get(op) or f"{kind(e['name'])}: not attributed"
      by_source[where] += e.get('dur', 0) / 1e3 / n_steps
  if not kernels:
    return state, {'error': 'no GPU stream events in the trace'}

  by_kind = defaultdict(float)
  for k, v in kernels.items():
    by_kind[kind(k)] += v[0]
  return state, {
      'steps': n_steps, 'gpu_ms_per_step': round(sum(v[0] for v in kernels.values()), 2),
      'kernel_ms_by_kind': {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      'top_kernels': [{'name': k, 'ms': round(v[0], 3), 'calls': v[1] // n_steps}
                      for k, v in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]],
      'top_sources': [{'source': k, 'ms': round(v, 3)}
                      for k, v in sorted(by_source.items(), key=lambda kv: -kv[1])[:60]]}


def _hlo_sources(hlo_text):
  """{HLO instruction name (also with '.' as '_', as kernels are named): 'file:line function
  op'} from the compiled module's metadata (the innermost frame in mobilemoe_jax/ of its
  stack, else the innermost), '(bwd)' marking ops of the backward pass: where each kernel's
  time comes from in the model's code."""
  import re
  tables = {}   # FileNames / FunctionNames / FileLocations / StackFrames: {id: text}
  section = None
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = tables.setdefault(line, {})
    elif section is not None and re.match(r'^\d+ ', line):
      i, rest = line.split(' ', 1)
      section[int(i)] = rest
    else:
      section = None
  field = lambda text, name: int(re.search(name + r'=(\d+)', text).group(1))

  def frame_label(frame):
    where, seen = [], set()
    while frame in tables.get('StackFrames', {}) and frame not in seen:
      seen.add(frame)
      entry = tables['StackFrames'][frame]
      loc = tables['FileLocations'][field(entry, 'file_location_id')]
      file = tables['FileNames'][field(loc, 'file_name_id')].strip('"')
      func = tables['FunctionNames'][field(loc, 'function_name_id')].strip('"')
      where.append((file, f"{os.path.basename(file)}:{field(loc, 'line')} {func}"))
      frame = field(entry, 'parent_frame_id')
    ours = [label for file, label in where if 'mobilemoe_jax' in file]
    return (ours or [label for _, label in where] or ['?'])[0]

  out = {}
  pattern = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*metadata=\{([^}]*)\}')
  for line in hlo_text.splitlines():
    m = pattern.match(line)
    if not m:
      continue
    meta = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', m.group(2)))
    op = meta.get('op_name', '').strip('"')
    if 'stack_frame_id' in meta:
      where = frame_label(int(meta['stack_frame_id']))
    else:
      where = os.path.basename(meta.get('source_file', '?').strip('"')) + ':' + meta.get('source_line', '?')
    label = f"{where} {op.rsplit('/', 1)[-1]}" + (' (bwd)' if 'transpose(' in op else '')
    out[m.group(1)] = out[m.group(1).replace('.', '_')] = label
  return out


# -------------------------------------------------------------------------- PyTorch worker


def run_transformers(names, a):
  """transformers' Qwen2-MoE built to the JAX preset's shape (layer 0 dense, tied head,
  GQA, top-k with renormalised weights, one shared expert, aux loss), trained the way a
  transformers user does: eager, fp32 master weights, autocast bf16, fused AdamW, SDPA
  attention (global causal on every layer; MFU counts the JAX model's windowed FLOPs)."""
  _imports()
  import numpy as np
  import torch
  from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
  from mobilemoe_jax.scaling import accounting
  for name in names:
    w = WORKLOADS[name]
    c = model_cfg(w)
    dev = 'cuda' if w.machine == 'gpu' else 'cpu'
    if dev == 'cuda' and not torch.cuda.is_available():
      emit({'workload': name, 'error': 'needs a CUDA GPU, torch sees none'})
      continue
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
    torch.manual_seed(0)
    with torch.device(dev):
      model = Qwen2MoeForCausalLM(hf_cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, fused=dev == 'cuda')
    if w.packed:
      raise ValueError(f'{name}: the transformers peer trains one-document rows only')
    ids = torch.from_numpy(one_document_rows(np.random.default_rng(0), w.batch, w.seq,
                                             c.vocab_size)['inputs']).long().to(dev)
    sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
    times = []
    for i in range(a.warmup + a.steps):
      t0 = time.perf_counter()
      with torch.autocast(dev, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss   # the model shifts the labels
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
      sync()
      if i >= a.warmup:
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = w.batch * w.seq
    flops_tok = accounting.train_flops_per_token(c, w.seq)
    kind = torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'
    peak_flops = PEAK_FLOPS.get(kind)
    emit({'workload': name, 'result': {
        'step_s_median': med, 'step_s_all': times, 'tokens_per_step': tokens,
        'tokens_per_s': tokens / med, 'tokens_per_s_per_device': tokens / med,
        'train_flops_per_token': flops_tok,
        'mfu': tokens / med * flops_tok / peak_flops if peak_flops else None,
        'peak_flops_per_device': peak_flops, 'loss_last': float(loss.detach()),
        'process_peak_bytes_in_use': torch.cuda.max_memory_allocated() if dev == 'cuda' else None,
        'torch_params': sum(p.numel() for p in model.parameters())},
        'model': model_summary(c), 'device_kind': kind})
    del model, opt


def torchtitan_model(c, attention: str):
  """torchtitan's Qwen3 decoder (GQA with QK-norm) built to the JAX config `c` from its own
  config helpers: MoE layers of grouped-GEMM experts with `c`'s routing (score function,
  normalised top-k, routed scale), a shared expert, and its aux-loss-free expert bias when
  `c` has one (torchtitan's load_balance_coeff is the bias update rate). Returns the config."""
  from functools import partial
  from torch import nn
  from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
  from torchtitan.models.common import config_utils as cu
  from torchtitan.models.qwen3.model import Qwen3Model, Qwen3TransformerBlock
  m, head_dim = c.moe, c.head_dim or c.d_model // c.n_heads
  init = {'weight': partial(nn.init.normal_, std=c.init_std), 'bias': nn.init.zeros_}
  out_init = {'weight': partial(nn.init.normal_, std=c.init_std / (2 * c.n_layers) ** 0.5),
              'bias': nn.init.zeros_}

  def norm(dim):
    return RMSNorm.Config(normalized_shape=dim, eps=c.norm_eps,
                          param_init={'weight': nn.init.ones_})

  def ffn(hidden):
    return cu.make_ffn_config(dim=c.d_model, hidden_dim=hidden, w1_param_init=init,
                              w2w3_param_init=out_init)

  rope = ComplexRoPE.Config(dim=head_dim, max_seq_len=c.max_seq_len, theta=c.rope_theta)
  layers = []
  for i in range(c.n_layers):
    moe = None
    if m.n_experts and i >= m.first_dense:
      moe = cu.make_moe_config(
          num_experts=m.n_experts,
          router=cu.make_router_config(
              dim=c.d_model, num_experts=m.n_experts, gate_param_init=init, top_k=m.top_k,
              score_func=m.score_func, route_norm=m.norm_topk_prob, route_scale=m.routed_scale),
          routed_experts=cu.make_routed_experts_config(
              dim=c.d_model, hidden_dim=m.d_expert, num_experts=m.n_experts, top_k=m.top_k,
              param_init={'w1_EFD': init['weight'], 'w3_EFD': init['weight'],
                          'w2_EDF': out_init['weight']}, comm_backend='standard'),
          shared_experts=ffn(m.n_shared * m.d_shared) if m.n_shared else None,
          load_balance_coeff=m.bias_update_rate if m.expert_bias else None)
    layers.append(Qwen3TransformerBlock.Config(
        attention_norm=norm(c.d_model), ffn_norm=norm(c.d_model),
        attention=cu.make_gqa_config(
            dim=c.d_model, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=head_dim,
            wqkv_param_init=init, wo_param_init=out_init,
            inner_attention=cu.get_attention_config(attention), fuse_qkv=True, rope=rope,
            qk_norm=norm(head_dim)),
        moe=moe, feed_forward=None if moe else ffn(c.d_ff)))
  return Qwen3Model.Config(
      vocab_size=c.vocab_size, dim=c.d_model, norm=norm(c.d_model),
      enable_weight_tying=c.tie_embeddings,
      tok_embeddings=Embedding.Config(num_embeddings=c.vocab_size, embedding_dim=c.d_model,
                                      param_init={'weight': partial(nn.init.normal_, std=c.init_std)}),
      lm_head=Linear.Config(in_features=c.d_model, out_features=c.vocab_size, param_init=init),
      layers=layers)


class _OneGpu:
  """The ParallelDims fields torchtitan's compile and expert-bias helpers read, on one GPU."""
  tp_enabled = ep_enabled = False
  tp = 1

  def get_optional_mesh(self, name):
    return None


ONE_GPU = _OneGpu()


def _torchtitan_on_this_torch():
  """torchtitan 0.3.0 is built against torch nightlies; on an older torch (the device image's
  2.11) names and keywords it uses are missing. Patches what is missing; returns what it
  patched (each row records it)."""
  import importlib.util
  import inspect
  import torch
  import torch.distributed.fsdp as torch_fsdp
  from torch.nn.attention.flex_attention import create_block_mask
  shims = []
  if not hasattr(torch_fsdp, 'DataParallelMeshDims'):
    # its FSDP helper imports this name but uses it only for a multi-dimensional SPMD mesh
    torch_fsdp.DataParallelMeshDims = type('DataParallelMeshDims', (), {})
    shims.append('torch.distributed.fsdp.DataParallelMeshDims (unused placeholder)')
  import torchtitan.models.common.attention as tt_attention
  import torchtitan.tools.utils as tt_utils
  if (tt_utils.get_cuda_flash_attention_impl() == 'FA3'
      and importlib.util.find_spec('flash_attn_interface') is None):
    # On Hopper its varlen attention asks for FlashAttention-3 (the flash_attn_interface
    # package, built from source); without it, torch's built-in flash attention (FA2).
    tt_utils.get_cuda_flash_attention_impl = lambda: None
    shims.append('varlen attention on torch built-in flash attention (FA2): no FA3 installed')
  from torch.nn.attention import varlen
  takes = frozenset(inspect.signature(varlen.varlen_attn).parameters)
  missing = sorted({'window_size', 'num_splits', 'enable_gqa'} - takes)
  if missing:
    # torchtitan passes keywords of the nightly's varlen_attn (dynamo: "failed to bind
    # arguments"); _varlen_attn_for maps them onto this torch's.
    tt_attention.varlen_attn = _varlen_attn_for(varlen.varlen_attn, takes)
    shims.append(f'varlen_attn without {missing} (this torch lacks them; _varlen_attn_for)')
  if 'separate_full_blocks' not in inspect.signature(create_block_mask).parameters:
    # torch 2.11's create_block_mask lacks this flag; True is its fixed behaviour.
    def block_mask(*args, separate_full_blocks=True, **kw):
      del separate_full_blocks
      return create_block_mask(*args, **kw)
    tt_attention._compiled_create_block_mask = torch.compile(block_mask)
    shims.append('flex create_block_mask without separate_full_blocks (torch 2.11)')
  return shims


def _varlen_attn_for(varlen_attn, takes):
  """torchtitan 0.3.0's call of torch's varlen_attn on a torch whose varlen_attn has fewer
  keywords (`takes`: its parameter names): a causal window (-1, 0) becomes is_causal=True; the
  split count (a heuristic of FA2's) and enable_gqa (its flash kernel takes KV with fewer
  heads as they are) are dropped where not taken."""
  def call(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), **kw):
    kw = {n: x for n, x in kw.items() if n in takes}
    if 'window_size' in takes:
      kw['window_size'] = window_size
    elif tuple(window_size) in ((-1, 0), (-1, -1)) and 'is_causal' in takes:
      kw['is_causal'] = tuple(window_size) == (-1, 0)
    elif tuple(window_size) != (-1, -1):
      raise NotImplementedError(f'varlen_attn of this torch has no window_size {window_size}')
    return varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, **kw)
  return call


def run_torchtitan(names, a):
  """torchtitan (its Qwen3-MoE model family, torchtitan_model) trained as its trainer does on
  one GPU: model built on the meta device in fp32 and initialised by its init_weights,
  per-TransformerBlock torch.compile when asked (and the loss compiled), FSDP2 over a
  1-device mesh for its MixedPrecisionPolicy (bf16 params and compute, fp32 gradient
  reduction, fp32 master weights), attention masks from per-document positions each step,
  sum cross-entropy / valid tokens, grad-norm clipping 1.0, fused AdamW, and its
  expert-bias update as an optimizer pre-step hook."""
  _imports()
  import numpy as np
  import torch
  import torch.distributed as dist
  import torch.nn.functional as F
  from torch.distributed.device_mesh import init_device_mesh
  from torchtitan.components.optimizer.optimizer import register_moe_load_balancing_hook
  from torchtitan.config.configs import CompileConfig
  from torchtitan.distributed.compile import apply_compile
  shims = _torchtitan_on_this_torch()
  from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
  from mobilemoe_jax.scaling import accounting
  if not torch.cuda.is_available():
    for name in names:
      emit({'workload': name, 'error': 'needs a CUDA GPU, torch sees none'})
    return
  os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
  os.environ.setdefault('MASTER_PORT', '29517')
  dist.init_process_group('nccl', rank=0, world_size=1)
  mesh = init_device_mesh('cuda', (1,), mesh_dim_names=('fsdp',))
  for name in names:
    w = WORKLOADS[name]
    c = model_cfg(w)
    try:
      torch.manual_seed(0)
      with torch.device('meta'):
        model = torchtitan_model(c, w.peer.get('attention', 'varlen')).build()
      if w.peer.get('compile'):
        apply_compile(model, compile_config=CompileConfig(enable=True), parallel_dims=ONE_GPU)
      apply_fsdp_to_decoder(model, mesh, param_dtype=torch.bfloat16,
                            reduce_dtype=torch.float32, pp_enabled=False)
      model.to_empty(device='cuda')
      with torch.no_grad():
        model.init_weights(buffer_device=torch.device('cuda'))
      model.train()
      params = [p for p in model.parameters() if p.requires_grad]
      opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                              fused=True)
      register_moe_load_balancing_hook(opt, [model], ONE_GPU)

      def loss_fn(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1),
                               reduction='sum', ignore_index=-100)
      if w.peer.get('compile'):
        loss_fn = torch.compile(loss_fn)
      rows = packed_rows if w.packed else one_document_rows
      host = rows(np.random.default_rng(0), w.batch, w.seq, c.vocab_size)
      tokens_in = torch.from_numpy(host['inputs']).long().cuda()
      labels = torch.from_numpy(np.where(host['loss_mask'] > 0, host['targets'], -100)).long().cuda()
      positions = torch.from_numpy(host['positions']).long().cuda()
      times = []
      for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        masks = model.get_attention_masks(positions)   # torchtitan builds these every step
        n_valid = (labels != -100).sum()
        loss = loss_fn(model(tokens_in, positions, masks), labels) / n_valid
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= a.warmup:
          times.append(time.perf_counter() - t0)
      med = statistics.median(times)
      tokens = w.batch * w.seq
      flops_tok = accounting.train_flops_per_token(c, w.seq)
      kind = torch.cuda.get_device_name()
      peak_flops = PEAK_FLOPS.get(kind)
      emit({'workload': name, 'result': {
          'step_s_median': med, 'step_s_all': times, 'tokens_per_step': tokens,
          'real_tokens_per_step': float(host['loss_mask'].sum()),
          'tokens_per_s': tokens / med, 'tokens_per_s_per_device': tokens / med,
          'train_flops_per_token': flops_tok,
          'mfu': tokens / med * flops_tok / peak_flops if peak_flops else None,
          'peak_flops_per_device': peak_flops, 'loss_last': float(loss.detach()),
          'process_peak_bytes_in_use': torch.cuda.max_memory_allocated(),
          'torch_params': sum(p.numel() for p in model.parameters()),
          'peer': dict(w.peer), 'torch': torch.__version__, 'shims': shims},
          'model': model_summary(c), 'device_kind': kind})
    except Exception as e:  # noqa: BLE001  a missing kernel, out of memory, ...
      import traceback
      traceback.print_exc()
      emit({'workload': name, 'error': f'{type(e).__name__}: {str(e)[:500]}'})
    model = opt = None
    torch.cuda.empty_cache()
  dist.destroy_process_group()


# impl: the worker that measures it (a peer = a runner here + table rows).
RUNNERS = {'jax': run_jax, 'transformers': run_transformers, 'torchtitan': run_torchtitan}


def emit(res):
  """One workload's result, read by the orchestrator from the worker's output."""
  print('RESULT ' + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- orchestrator


def groups(names):
  """Workloads measured in one worker process each: same impl, preset, devices, machine."""
  out = {}
  for n in names:
    w = WORKLOADS[n]
    out.setdefault((w.impl, w.preset, w.devices, w.machine), []).append(n)
  return list(out.values())


# XLA's latency-hiding scheduler on GPU: lets the expert-parallel all-to-alls (async
# collectives on GPU) run beside the compute that does not need them (README.md, sharding).
# Only where there is a collective to hide: one-GPU steps keep XLA's default schedule.
GPU_COLLECTIVE_XLA_FLAGS = '--xla_gpu_enable_latency_hiding_scheduler=true'


def worker_env(w: Workload, environ=os.environ):
  """The environment of the worker process that measures `w`."""
  env = dict(environ, PYTHONUNBUFFERED='1')
  if w.machine == 'cpu':
    env['JAX_PLATFORMS'] = 'cpu'
    env['XLA_FLAGS'] = (f"{env.get('XLA_FLAGS', '')} "
                        f'--xla_force_host_platform_device_count={w.devices}').strip()
  else:
    env['CUDA_VISIBLE_DEVICES'] = ','.join(map(str, range(w.devices)))
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
    if w.devices > 1 and w.impl == 'jax':
      env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} {GPU_COLLECTIVE_XLA_FLAGS}".strip()
  return env


def launch(names, a, deadline=None):
  """Runs one worker process, stopped at --limit-s or at `deadline` (time.time()), whichever
  comes first; returns {workload: result} (those it finished before a stop too)."""
  env = worker_env(WORKLOADS[names[0]])
  limit = a.limit_s if deadline is None else max(1.0, min(a.limit_s, deadline - time.time()))
  argv = [sys.executable, os.path.abspath(__file__), '--worker=' + ','.join(names),
          f'--warmup={a.warmup}', f'--steps={a.steps}'] + (['--profile'] if a.profile else []) \
      + ([f'--profile-dir={a.profile_dir}'] if a.profile_dir else [])
  t0 = time.time()
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  try:
    out, _ = proc.communicate(timeout=limit)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    out += f'\nkilled after {limit:.0f} s (--limit-s / --deadline-s)'
  found = {}
  for line in out.splitlines():
    if line.startswith('RESULT '):
      r = json.loads(line[7:])
      found[r.pop('workload')] = r
  log = '\n'.join(l for l in out.splitlines() if not l.startswith('RESULT '))
  print(f'===== {",".join(names)} ({time.time() - t0:.0f} s, rc {proc.returncode})\n{log[-3000:]}',
        flush=True)
  for n in names:
    found.setdefault(n, {'error': f'no result (rc {proc.returncode}): {log[-800:]}'})
  return found


def select(a):
  """The workloads to measure: the named ones, plus each one's `vs` (measured in the same
  run, so the ratio compares rows of one machine and one window), baselines first."""
  names = list(HEADLINE) if a.headline else [n for n in a.workload.split(',') if n]
  unknown = [n for n in names if n not in WORKLOADS]
  if unknown:
    raise SystemExit(f'unknown workload(s) {unknown}; --list shows {sorted(WORKLOADS)}')
  out = []

  def add(n):
    if WORKLOADS[n].vs and not a.alone:
      add(WORKLOADS[n].vs)
    if n not in out:
      out.append(n)
  for n in names:
    add(n)
  kinds = {WORKLOADS[n].machine for n in out}
  if len(kinds) > 1:
    raise SystemExit(f'{out} mix machine kinds {sorted(kinds)}: run them in separate commands')
  return out


def row_device(row, w: Workload):
  """The device a row was measured on: the device kind its worker saw ('NVIDIA H200',
  'NVIDIA H100 80GB HBM3', 'cpu'); for a row that failed before naming one, nvidia-smi's name
  of the run's first GPU (or 'cpu' for a CPU workload)."""
  if row.get('device_kind'):
    return row['device_kind']
  if w.machine == 'cpu':
    return 'cpu'
  gpus = row.get('run', {}).get('machine', {}).get('gpus') or ['unknown GPU']
  return gpus[0].split(',')[0].strip()


def load(path):
  """A results file, {'benchmark', 'rows': {device: {workload: row}}, 'summary'}; a file of the
  earlier shape (rows keyed by workload alone) is keyed by device on reading. A missing file
  gives an empty one."""
  try:
    results = runinfo.read_results(path)
  except FileNotFoundError:
    return {'benchmark': 'bench/train_throughput.py', 'rows': {}}
  rows = results.get('rows', {})
  if any('run' in r for r in rows.values()):   # the earlier shape: {workload: row}
    by_device = {}
    for n, r in rows.items():
      if n in WORKLOADS:
        by_device.setdefault(row_device(r, WORKLOADS[n]), {})[n] = r
    results['rows'] = by_device
  return results


def put(results, rows):
  """Puts rows ({device: {workload: row}}) into `results`, replacing those of the same workload
  on the same device and keeping the others (another GPU's row of a workload stays beside
  it); drops workloads no longer in WORKLOADS; recomputes the summary."""
  for device, new in rows.items():
    results['rows'].setdefault(device, {}).update(new)
  results['rows'] = {d: {n: r[n] for n in WORKLOADS if n in r}
                     for d, r in sorted(results['rows'].items())}
  results['summary'] = summary(results['rows'])
  return results


def save(results, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)


def write(found, names, run, a):
  """Puts this run's rows (`run`: its record) into the results file, replacing those of the
  same workloads on the same device."""
  results, rows = load(a.out), {}
  for n in names:
    w = WORKLOADS[n]
    row = dict(found[n], workload=dataclasses.asdict(w), run=run)
    vs = found.get(w.vs, {})
    if w.vs and 'result' in row and 'result' in vs:
      row['vs'] = {'workload': w.vs, 'tokens_per_s_per_device': vs['result']['tokens_per_s_per_device'],
                   'ratio': (row['result']['tokens_per_s_per_device']
                             / vs['result']['tokens_per_s_per_device'])}
    rows.setdefault(row_device(row, w), {})[n] = row
  results = put(results, rows)
  save(results, a.out)
  return results


def merge(paths, a):
  """Merges the rows of results files written elsewhere (a device machine's --out) into
  a.out, as if the runs had written there: the rows of the same workload and device are
  replaced, the others kept."""
  results = put(load(a.out), {})   # the stored rows, summary recomputed
  for path in paths:
    results = put(results, load(path)['rows'])
  save(results, a.out)
  return results


# The released S against its peers (bench/README.md's targets): MFU at the preset's batch on
# packed rows (capacity 1.25, the best of the micro-batch sizes measured on a GPU; and
# dropless); tokens/s at 8 x 2048 packed rows (capacity 1.25, and dropless) against the
# fastest peer row measured in the same run; weak scaling 1 -> 2 -> 4 GPUs. The released M's
# MFU likewise.
SUMMARY = {'mfu': ('rs_b256_accum16_packed', 'rs_b256_accum8_packed', 'rs_b256_accum4_packed'),
           'mfu_dropless': ('rs_b256_accum16_dropless_packed',),
           'mfu_m': ('rm_b256_accum64_packed', 'rm_b256_accum16_packed', 'rm_b256_accum8_packed'),
           'ours': 'rs_b8_packed',
           'ours_dropless': 'rs_b8_dropless_packed',
           'weak_scaling': {2: 'rs_ep2', 4: 'rs_ep4'}}
MFU_KEYS = {'mfu_released_s_1gpu': 'mfu', 'mfu_released_s_1gpu_dropless': 'mfu_dropless',
            'mfu_released_m_1gpu': 'mfu_m'}
# Peers with no runner, and why (checked against PyPI and the device machines' image).
PEERS_NOT_RUN = {
    'maxtext': (
        'maxtext 0.2.5 (PyPI) supports Python 3.12, but declares its GPU dependencies only in '
        "its 'cuda12' extra (262 packages): CUDA 12 builds (jax-cuda12-plugin/pjrt, "
        'transformer-engine-cu12 and transformer-engine-jax >= 2.19, nvidia-*-cu12 libraries) '
        'beside the image\'s JAX 0.11.2 on CUDA 13 (jax-cuda13-plugin), plus tokamax, aqtp (its '
        'MoE layer imports aqt), grain and google-cloud-*; the device machines have no internet '
        'and a call carries at most 64 MiB of wheels. Not installed, not run.')}


def _ok(rows, n):
  return n in rows and 'result' in rows[n]


def gpu_summary(rows):
  """The headline figures from one GPU model's rows ({workload: row}): each MFU figure is the
  best of its workloads (SUMMARY) with the workload, commit and date it came from, beside
  every candidate's MFU or failure; the peer speedup from one run."""
  out = {}
  for key, kind in MFU_KEYS.items():
    names = SUMMARY[kind]
    done = [n for n in names if _ok(rows, n)]
    best = max(done, key=lambda n: rows[n]['result']['mfu'] or 0, default=None)
    out[key] = rows[best]['result']['mfu'] if best else None
    if best:
      run = rows[best]['run']
      out[key + '_workload'] = best
      out[key + '_commit'], out[key + '_date'] = run.get('commit'), run['date']
    else:
      out[key + '_reason'] = '; '.join(rows[n]['error'] if n in rows else f'{n} not measured'
                                       for n in names)
    if len(names) > 1:
      out[key + '_by_workload'] = {
          n: rows[n]['result']['mfu'] if _ok(rows, n) else 'failed: ' + rows[n]['error'][:200]
          for n in names if n in rows}
  ours = SUMMARY['ours']
  peers = [n for n in rows if n.startswith('peer_') and n in WORKLOADS and
           WORKLOADS[n].vs in (ours, 'rs_b8') and _ok(rows, n) and _ok(rows, WORKLOADS[n].vs) and
           _ok(rows, ours) and rows[n]['run']['date'] == rows[ours]['run']['date']]   # one run
  best = max(peers, key=lambda n: rows[n]['result']['tokens_per_s_per_device'], default=None)
  out['best_peer'] = best
  if best:   # against the row of ours with the same rows (packed or one document)
    peer_tps, ours = rows[best]['result']['tokens_per_s_per_device'], WORKLOADS[best].vs
    out['best_peer_tokens_per_s'] = peer_tps
    out['speedup_vs_best_peer'] = rows[ours]['result']['tokens_per_s_per_device'] / peer_tps
    out['speedup_vs_best_peer_workloads'] = f'{ours} / {best}'
    out['speedup_vs_best_peer_commit'] = rows[ours]['run'].get('commit')
    out['speedup_vs_best_peer_date'] = rows[ours]['run']['date']
    dropless = SUMMARY['ours_dropless']
    same_run = _ok(rows, dropless) and rows[dropless]['run']['date'] == rows[best]['run']['date']
    out['speedup_dropless_vs_best_peer'] = (
        rows[dropless]['result']['tokens_per_s_per_device'] / peer_tps if same_run else None)
    if not same_run:
      out['speedup_dropless_vs_best_peer_reason'] = (
          rows[dropless]['error'] if dropless in rows and 'error' in rows[dropless] else
          f'{dropless} not measured in the same run as {best}')
  else:
    out['speedup_vs_best_peer'] = None
    out['speedup_vs_best_peer_reason'] = f'no peer row measured in the same run as {ours}'
  for n_gpu, ep in SUMMARY['weak_scaling'].items():   # per-GPU tokens/s vs the same step on 1
    key, vs = f'weak_scaling_efficiency_{n_gpu}gpu', WORKLOADS[ep].vs
    out[key] = rows[ep]['vs']['ratio'] if _ok(rows, ep) and rows[ep].get('vs') else None
    if out[key] is None:
      out[key + '_reason'] = (
          rows[ep]['error'] if ep in rows and 'error' in rows[ep] else
          f'{ep} was measured without {vs} in the same run' if _ok(rows, ep) else
          f'{ep} not measured: it needs a machine with {n_gpu} GPUs')
  return out


def summary(rows):
  """The headline figures over every GPU model's rows ({device: {workload: row}}), each naming
  the GPU it was measured on: an MFU figure is the best over GPUs (and over its workloads), the
  peer speedup the lowest over GPUs (the target has to hold on each), a weak-scaling
  efficiency the first GPU's that has one; `by_gpu` keeps each GPU's own figures (the H100's
  beside the H200's), with workload, commit and date."""
  by_gpu = {d: gpu_summary(r) for d, r in rows.items() if d != 'cpu'}
  out = {}
  for key in MFU_KEYS:
    have = [d for d, s in by_gpu.items() if s[key] is not None]
    best = max(have, key=lambda d: by_gpu[d][key], default=None)
    out[key] = by_gpu[best][key] if best else None
    if best:
      out[key + '_gpu'] = best
      for k in ('workload', 'commit', 'date'):
        out[f'{key}_{k}'] = by_gpu[best][f'{key}_{k}']
    else:
      out[key + '_reason'] = '; '.join(f"{d}: {s[key + '_reason']}" for d, s in by_gpu.items()) \
          or 'no GPU rows'
  have = [d for d, s in by_gpu.items() if s['speedup_vs_best_peer'] is not None]
  low = min(have, key=lambda d: by_gpu[d]['speedup_vs_best_peer'], default=None)
  if low:
    out.update({k: v for k, v in by_gpu[low].items()
                if k.startswith(('best_peer', 'speedup_'))})
    out['speedup_vs_best_peer_gpu'] = low
  else:
    out.update(best_peer=None, speedup_vs_best_peer=None,
               speedup_vs_best_peer_reason='; '.join(
                   f"{d}: {s['speedup_vs_best_peer_reason']}" for d, s in by_gpu.items())
               or 'no GPU rows')
  for n_gpu in SUMMARY['weak_scaling']:
    key = f'weak_scaling_efficiency_{n_gpu}gpu'
    have = [d for d, s in by_gpu.items() if s[key] is not None]
    out[key] = by_gpu[have[0]][key] if have else None
    if have:
      out[key + '_gpu'] = have[0]
    else:
      reasons = sorted({s[key + '_reason'] for s in by_gpu.values()})
      out[key + '_reason'] = '; '.join(reasons) or (
          f"{SUMMARY['weak_scaling'][n_gpu]} not measured: it needs a machine with {n_gpu} GPUs")
  out['by_gpu'] = by_gpu
  out['peers_not_run'] = PEERS_NOT_RUN
  return out


def workload_table():
  """WORKLOADS as markdown (bench/README.md); * = in HEADLINE."""
  lines = ['| workload | preset | rows x seq / device | devices | rows | overrides | impl | machine | '
           'vs | what |', '|---|---|---|---|---|---|---|---|---|---|']
  for n, w in WORKLOADS.items():
    shape = f'{w.batch} x {w.seq}' + (f' ({w.grad_accum} micro)' if w.grad_accum > 1 else '')
    over = ', '.join(f'{k}={v}' for k, v in {**w.model, **w.train, **w.peer}.items()) or '-'
    lines.append(f"| {n}{' *' if n in HEADLINE else ''} | {w.preset} | {shape} | {w.devices} | "
                 f"{'packed' if w.packed else 'one document'} | {over} | {w.impl} | {w.machine} | "
                 f"{w.vs or '-'} | {w.what} |")
  return '\n'.join(lines)


def table(results):
  """The markdown table of a results file (bench/README.md): workloads in WORKLOADS' order,
  each GPU's row of a workload beside the others. GPU memory: the compiled step's bytes for
  a JAX row (arguments + outputs + temporaries - aliased), the process's peak allocation for
  a PyTorch peer."""
  lines = ['| workload | rows x seq / device | devices | step ms | tokens/s/device | MFU | '
           'GPU memory GB | vs (same run) | machine | date, commit |',
           '|---|---|---|---|---|---|---|---|---|---|']
  rows = results['rows']
  for n in WORKLOADS:
    for device in sorted(rows):
      if n not in rows[device]:
        continue
      r = rows[device][n]
      w, run = r['workload'], r['run']
      shape = f"{w['batch']} x {w['seq']}" + (f" ({w['grad_accum']} micro)" if w['grad_accum'] > 1 else '') \
          + (' packed' if w['packed'] else '')
      where = device if w['machine'] == 'gpu' else run['machine']['cpu']
      when = f"{run['date'][:10]}, {run.get('commit') or 'not recorded'}"
      if 'result' not in r:
        error = ' '.join(r['error'].split())[:120].replace('|', '/')
        lines.append(f"| {n} | {shape} | {w['devices']} | failed: {error} | | | | | {where} | "
                     f'{when} |')
        continue
      x = r['result']
      mfu = f"{100 * x['mfu']:.1f}%" if x.get('mfu') else '-'
      mem = (x.get('compiled_bytes_per_device') or x.get('process_peak_bytes_in_use')) \
          if w['machine'] == 'gpu' else None
      mem = f'{mem / 1e9:.1f}' if mem else '-'
      vs = f"{r['vs']['ratio']:.3f} x {r['vs']['workload']}" if r.get('vs') else '-'
      lines.append(f"| {n} | {shape} | {w['devices']} | {1e3 * x['step_s_median']:.1f} | "
                   f"{x['tokens_per_s_per_device']:,.0f} | {mfu} | {mem} | {vs} | {where} | {when} |")
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workload', default='', help='comma-separated workload names (--list)')
  p.add_argument('--headline', action='store_true', help='the HEADLINE workloads')
  p.add_argument('--alone', action='store_true',
                 help="measure only the named workloads, not their `vs` (the rows keep no ratio)")
  p.add_argument('--list', action='store_true', help='print the workload table')
  p.add_argument('--table', action='store_true', help='print the results file as markdown')
  p.add_argument('--summarize', action='store_true',
                 help="recompute the results file's summary from its stored rows (no measuring)")
  p.add_argument('--merge', nargs='+', default=[], metavar='FILE',
                 help='merge the rows of results files written elsewhere (a device machine\'s '
                      '--out) into --out: rows of the same workload and GPU replaced, the '
                      'others kept; no measuring')
  p.add_argument('--out', default=RESULTS, help='results JSON (default %(default)s)')
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--limit-s', type=float, default=900, help='time limit per worker process')
  p.add_argument('--deadline-s', type=float, default=0,
                 help='stop every worker this many seconds after the start (0: none), e.g. '
                      "inside a device call's limit; rows finished by then are kept")
  p.add_argument('--profile', action='store_true',
                 help='trace 2 more steps of each JAX workload (GPU time per kernel in the row)')
  p.add_argument('--profile-dir', default='',
                 help='with --profile: keep each workload\'s trace and compiled HLO here')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)   # internal
  a = p.parse_args()
  if a.worker:
    names = a.worker.split(',')
    return RUNNERS[WORKLOADS[names[0]].impl](names, a)
  if a.list:
    return print(workload_table())
  if a.table or a.summarize or a.merge:
    if not a.merge:
      runinfo.read_results(a.out)   # a missing or broken --out is an error here
    if a.table:
      return print(table(load(a.out)))
    results = merge(a.merge, a)   # none: the stored rows, summary recomputed
    if a.merge:
      print(table(results))
    return print(json.dumps(results['summary'], indent=1))
  if not (a.headline or a.workload):
    p.error('name --workload=... or --headline (--list shows the workloads)')
  names = select(a)
  run = dict(runinfo.run_record('bench/train_throughput.py', WORKLOADS[names[0]].machine == 'gpu'),
             warmup_steps=a.warmup, timed_steps=a.steps)
  deadline = time.time() + a.deadline_s if a.deadline_s else None
  found = {}
  for group in groups(names):   # written after each group: a run cut short keeps what it measured
    found.update(launch(group, a, deadline))
    results = write(found, group, run, a)
  print(table({'rows': {d: {n: r for n, r in rows.items() if r['run']['date'] == run['date']}
                         for d, rows in results['rows'].items()}}))
  print(f'wrote {a.out}')
  return None


if __name__ == '__main__':
  main()
