"""The train loop: `train_and_evaluate(config, workdir)`, one function read top to bottom.

Sections, in order: config checks, mesh, data, shapes (nnx.eval_shape, nothing allocated),
shardings, optimizer, the jitted update step, resume (or start from the previous stage),
the loop (log, evaluate, checkpoint, preemption), the summary.

State is a plain pytree, so jit, Orbax and optax all see the same thing:
  params    nnx.State of the trained Params
  rest      nnx.State of everything else in the model (the MoE expert biases)
  opt       optax state (mu/nu mirror params, sharding metadata included)
  step      int32 []  completed steps; step s consumed batch s (1-based)
  rng       uint32 [2] the stage's key: randomness for step s is fold_in(rng, s)
  skipped   int32 []  steps skipped for a non-finite loss/gradient (on_nonfinite='skip')
  bad_step  int32 []  first non-finite step with on_nonfinite='stop' (0: none); once set,
                      the state no longer changes, so what is saved is the last good one

  teacher   the float params QAT distils from (only with train.distill_weight > 0)

Loss = masked CE (mean over loss_mask tokens of the global batch; with train.loss_chunk_len
       computed a chunk of positions at a time, train/loss.py)
     + moe.aux_loss_coef * aux + moe.z_loss_coef * z  (summed over MoE layers)
     + train.distill_weight * KL(teacher || model)  (QAT only; mean over loss_mask tokens).
"""
import functools
import math
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from mobilemoe_jax import config as config_lib
from mobilemoe_jax import distributed, sharding
from mobilemoe_jax.data import pipeline
from mobilemoe_jax.model import Transformer, moe_layers
from mobilemoe_jax.model.layers import QuantScale
from mobilemoe_jax.quant import qat
from mobilemoe_jax.scaling import accounting
from mobilemoe_jax.train import checkpoint as ckpt_lib
from mobilemoe_jax.train import config_check
from mobilemoe_jax.train import loss as loss_lib
from mobilemoe_jax.train import metrics as metrics_lib
from mobilemoe_jax.train import optim, paths


class NonFiniteError(RuntimeError):
  """The loss or gradient became NaN/inf with train.on_nonfinite='stop'."""


def train_and_evaluate(config, workdir: str, *, step_callback=None) -> dict:
  """Trains one stage in `workdir` (resuming if it holds checkpoints); returns its summary.

  step_callback(step) runs after every step (tests use it to pause a run before killing it).
  """
  t = config.train
  config_check.check(config)
  workdir = paths.as_path(workdir)          # a local directory or gs://BUCKET/RUN
  workdir.mkdir(parents=True, exist_ok=True)

  # ---------------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  n_batch_shards = math.prod(mesh.shape[a] for a in sharding.RULES['batch'])
  micro = t.batch_size // t.grad_accum
  if micro % n_batch_shards:
    raise config_lib.ConfigError(
        f'config field `train.batch_size`: {t.batch_size} / grad_accum {t.grad_accum} = {micro} '
        f'rows per micro-batch must split over the {n_batch_shards} batch shards of mesh {dict(mesh.shape)}')

  # Closing the checkpointer waits for a save in flight, also when an error (say, a bad
  # record) ends the run: that save holds a good state, so it is finished, not abandoned.
  ckpt = ckpt_lib.Checkpointer(workdir / 'checkpoints', keep=t.keep_checkpoints,
                               async_save=t.async_checkpoints)
  with jax.set_mesh(mesh), ckpt:
    # -------------------------------------------------------------------------- data
    # Each process reads its own share; the global batch is assembled from the shares.
    local_batch = t.batch_size // jax.process_count()
    make = functools.partial(pipeline.make_dataset, seq_len=t.seq_len, batch_size=local_batch,
                             seed=t.seed)
    train_iter = iter(make(config.data.train))
    eval_ds = make(config.data.eval)
    batch_sharding = sharding.batch_sharding(mesh)

    def to_global(batch):  # {name: [B/processes, T] numpy} -> {name: [B, T] jax.Array}
      return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}

    # ------------------------------------------------------------------------ shapes
    tx, lr_schedule = optim.make_optimizer(t)        # optimizer: AdamW, schedule, clipping
    init_state = make_init_fn(config, tx)
    abstract_state = jax.eval_shape(init_state)      # nothing is allocated
    graphdef = model_graphdef(config)

    # --------------------------------------------------------------------- shardings
    # Params and their optimizer moments follow the logical axes; scalars are replicated.
    state_sharding = sharding.state_shardings(abstract_state, mesh)

    # ------------------------------------------------------------------- update step
    # One jitted step per attention mask mode the batches need (step_config): with
    # model.attention_mask 'auto' on cuDNN and one process, a batch of one-document rows and a
    # packed batch get different steps, each compiled when first needed.
    steps = {}

    def train_step(state, host_batch):
      step_cfg = step_config(config, host_batch['segment_ids'], host_batch['positions'])
      key = (step_cfg.model.get('attention_mask'), step_cfg.model.get('attention_segments', 0))
      if key not in steps:
        steps[key] = jax.jit(make_train_step(step_cfg, tx, lr_schedule),
                             in_shardings=(state_sharding, batch_sharding),
                             out_shardings=(state_sharding, None), donate_argnums=0)
      return steps[key](state, to_global(host_batch))

    @functools.partial(jax.jit, in_shardings=(state_sharding, batch_sharding))
    def eval_step(state, batch):
      """Summed CE and token count over loss_mask; perplexity = exp(sum / count)."""
      model = nnx.merge(graphdef, state['params'], state['rest'])
      logits, _, _ = model(batch['inputs'], positions=batch['positions'],
                           segment_ids=batch['segment_ids'])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
      return jnp.sum(ce * batch['loss_mask']), batch['loss_mask'].sum()

    def evaluate(state) -> dict:
      ce_sum, count = 0.0, 0.0
      for i, batch in enumerate(eval_ds):  # a fresh, unshuffled pass each time
        if i == t.eval_batches:
          break
        c, n = jax.device_get(eval_step(state, to_global(batch)))
        ce_sum, count = ce_sum + float(c), count + float(n)
      loss = ce_sum / max(count, 1.0)
      return {'eval/loss': loss, 'eval/ppl': math.exp(min(loss, 50.0)), 'eval/tokens': count}

    # ------------------------------------------------- resume, or start from a stage
    resumed = ckpt.restore_latest(abstract_state, state_sharding, train_iter,
                                  config=config.to_dict(), log=_log,
                                  allow_config_change=t.allow_config_change,
                                  fallback=t.checkpoint_fallback)
    restored_step = None
    if resumed is not None:
      restored_step, state, meta, diffs = resumed
      lineage = meta['lineage'][:-1]  # the last entry is this stage; it is rewritten on save
      _log(f'{t.stage}: resumed from {ckpt.path(restored_step)}')
      if diffs:
        _log(f'{t.stage}: the config differs from the checkpoint\'s (train.allow_config_change):\n'
             + '\n'.join(diffs))
    else:
      state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(t.seed))
      lineage = []
      if t.init_from:
        # The previous stage's weights; the optimizer restarts unless restore_optimizer.
        parts = ('params', 'rest') + (('opt',) if t.restore_optimizer else ())
        if config.model.quant.learnable_scale and not _holds_quant_scales(t.init_from):
          loaded, meta, where = _load_into_lsq(config, tx, mesh, state, state_sharding, parts)
        else:
          loaded, meta, where = ckpt_lib.load_for_init(t.init_from, abstract_state, state_sharding, parts)
        state.update(loaded)
        if t.distill_weight:  # QAT self-distillation: the teacher is the model we start from
          state['teacher'] = jax.tree.map(jnp.copy, state['params'])
        lineage = meta['lineage']
        _log(f'{t.stage}: initialised {", ".join(parts)} from {where}')

    def save(step):
      entry = {'stage': t.stage, 'checkpoint': ckpt.path(step), 'step': step}
      ckpt.save(step, state, train_iter, {'stage': t.stage, 'step': step,
                                          'lineage': lineage + [entry], 'config': config.to_dict()})

    # -------------------------------------------------------------------------- loop
    writer = metrics_lib.Writer(workdir)
    flops_per_token = accounting.train_flops_per_token(config.model, t.seq_len)
    peak = metrics_lib.peak_flops()
    step = int(jax.device_get(state['step']))
    counts = accounting.count(config.model)
    _log(f'{t.stage}: {counts.active_params / 1e6:.2f}M active / {counts.total_params / 1e6:.2f}M '
         f'params, mesh {dict(mesh.shape)}, {t.batch_size}x{t.seq_len} tokens per step, '
         f'step {step} of {t.steps}')
    if step == 0 and t.eval_batches:
      writer.write(0, evaluate(state))
    pending = []  # per-step metrics (device arrays) since the last log: no per-step sync
    nonfinite = _NonfiniteWatch(t, ckpt, restored_step)
    window_start, preempt = time.time(), _Preemption()
    bar = tqdm(total=t.steps, initial=step, desc=t.stage, unit='step',
               disable=not t.progress or jax.process_index() != 0)
    preempted = False
    with preempt:
      while step < t.steps:
        state, m = train_step(state, next(train_iter))
        step += 1
        pending.append(m)
        if step_callback is not None:
          step_callback(step)
        last = step == t.steps

        if step == 1 or step % t.log_every == 0 or last:
          nonfinite.check(state, pending, step)
          scalars, hist = _summarize(pending, time.time() - window_start,
                                     t.batch_size * t.seq_len, flops_per_token, peak)
          writer.write(step, scalars, hist)
          mfu = f"{scalars['train/mfu']:.1%}" if 'train/mfu' in scalars else 'n/a'
          bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", lr=f"{scalars['train/lr']:.1e}",
                          tok_s=f"{scalars['train/tokens_per_s']:.0f}", mfu=mfu)
          pending, window_start = [], time.time()

        if t.eval_every and (step % t.eval_every == 0 or last) and t.eval_batches:
          writer.write(step, evaluate(state))

        # The same answer on every process (read once: SIGTERM may land between two uses).
        preempted = distributed.stop_requested(step, preempt.requested)
        if step % t.checkpoint_every == 0 or last or preempted:
          nonfinite.check(state, pending, step)  # never save past a bad step
          save(step)
        bar.update()
        if preempted:
          ckpt.wait()
          _log(f'{t.stage}: SIGTERM received; saved {ckpt.path(step)}; exiting cleanly.')
          break

    bar.close()
    ckpt.wait()
    writer.close()
  summary = stage_summary(workdir, t.stage)
  summary['preempted'] = preempted
  return summary


# ---------------------------------------------------------------------- state and step


def model_graphdef(config):
  """The model's structure without its arrays (for nnx.merge inside jitted functions)."""
  abstract = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(config.train.seed)))
  return nnx.split(abstract, nnx.Param, ...)[0]


def make_init_fn(config, tx):
  """(key=None) -> a fresh train state (see the module docstring); jit it with out_shardings.

  key defaults to jax.random.key(train.seed). Pass that key as a jit argument: with no
  argument the whole init is a constant, and XLA may try to fold it at compile time.
  """
  t = config.train

  def init_state(key=None):
    key = jax.random.key(t.seed) if key is None else key
    model = Transformer(config.model, rngs=nnx.Rngs(key))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    zero = jnp.zeros((), jnp.int32)
    state = {'params': params, 'rest': rest, 'opt': tx.init(params), 'step': zero,
             'rng': jax.random.key_data(key), 'skipped': zero, 'bad_step': zero}
    if t.distill_weight:
      state['teacher'] = jax.tree.map(jnp.copy, params)   # frozen; set from init_from
    return state

  return init_state


def step_config(config, segment_ids, positions=None):
  """The config of the train step for a batch with these (host, numpy) segment ids and
  positions [B, T].

  With model.attention_mask 'auto' where attention runs on cuDNN, and one process, the
  choice is made here on the host, per batch: 'causal' for a batch whose rows are each one
  document without padding; 'segments' (cuDNN's packed layout, only the tiles inside each
  document computed) for rows packed as the data pipeline packs them (`packed_runs`) in a
  model without a sliding window, with model.attention_segments the batch's most runs per row
  rounded up to a power of two (few distinct steps); else 'bias_nograd' (with a window, cuDNN
  skips the tiles outside it either way, and the packed layout was the slower of the two in
  bench/attention_check.py). The same attention on every real token; the step has
  no conditional, whose backward pass made every layer write a [B, 1, T, T] placeholder for
  the branch not taken. With several processes each sees only its rows, so the device keeps
  the choice ('auto': causal flags or the bias). Else `config` itself.
  """
  from mobilemoe_jax.model.layers import attention_kernel
  m = config.model
  if (m.attention_mask != 'auto' or attention_kernel(m) != 'cudnn'
      or jax.process_count() != 1):
    return config
  out = config.copy_and_resolve_references()
  segment_ids = np.asarray(segment_ids)
  runs = None if positions is None else packed_runs(segment_ids, np.asarray(positions))
  with out.unlocked():
    if np.all(segment_ids == 1):
      out.model.attention_mask = 'causal'
    elif runs is not None and not m.sliding_window:
      out.model.attention_mask = 'segments'
      out.model.attention_segments = 1 << (runs - 1).bit_length()
    else:
      out.model.attention_mask = 'bias_nograd'
  return out


def packed_runs(segment_ids, positions):
  """The most runs of equal segment ids in one row [B, T], when rows are packed so that
  cuDNN's packed layout is exact ('segments'): every document (id > 0) one run whose
  positions step by one; else None. Padding (id 0) may be anywhere."""
  same = segment_ids[:, 1:] == segment_ids[:, :-1]
  inside = same & (segment_ids[:, 1:] != 0)
  if np.any(positions[:, 1:][inside] - positions[:, :-1][inside] != 1):
    return None
  runs = 1 + (~same).sum(1)                                               # [B]
  for row, n in zip(segment_ids, runs):
    starts = np.concatenate([[True], row[1:] != row[:-1]])
    ids = row[starts]
    if len(set(ids[ids != 0].tolist())) != int((ids != 0).sum()):   # a document in two runs
      return None
  return int(runs.max())


# The model takes each SwiGLU's gate and up as the stacked pair (moe/dispatch.py, gate_up)
# that stack_gate_up makes once per step; False: apart (unstack_gate_up), as under QAT.
STACKED_PAIRS = True

FP32_MATRICES = ('router',)   # matrices the model uses in fp32 (MoE.__call__)


def compute_copy(params, model_cfg):
  """params with every matrix the model casts to model.dtype at use already in that dtype
  (the router stays fp32; the norm scales are vectors). Unchanged under QAT: its fake
  quantization reads the fp32 weights."""
  dt = jnp.dtype(model_cfg.dtype)
  if model_cfg.quant.weights is not None:
    return params

  def cast(path, p):
    name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    return p.astype(dt) if p.ndim >= 2 and name not in FP32_MATRICES else p
  return jax.tree_util.tree_map_with_path(cast, params)


def _renamed(path, old: str, new: str):
  """path with its last dict key renamed from `old` to `new`; None if that key is not `old`."""
  i = max(j for j, k in enumerate(path) if isinstance(k, jax.tree_util.DictKey))
  if path[i].key != old:
    return None
  return path[:i] + (jax.tree_util.DictKey(new),) + path[i + 1:]


def stack_gate_up(params):
  """Every SwiGLU's gate and up as the one [..., D, 2, F] weight `swiglu_hidden` multiplies
  by, in `gate` (`up` an empty placeholder): stacked once per step, not per micro-batch."""
  leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])

  def pair(path, p):
    if _renamed(path, 'gate', 'up') in leaves:
      return jnp.stack([p, leaves[_renamed(path, 'gate', 'up')]], -2)
    return jnp.zeros((0,), p.dtype) if _renamed(path, 'up', 'gate') in leaves else p
  return jax.tree_util.tree_map_with_path(pair, params)


def unstack_gate_up(params):
  """The inverse of stack_gate_up."""
  leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])

  def half(path, p):
    if _renamed(path, 'gate', 'up') in leaves:
      return p[..., 0, :]
    gate = _renamed(path, 'up', 'gate')
    return leaves[gate][..., 1, :] if gate in leaves else p
  return jax.tree_util.tree_map_with_path(half, params)


def make_train_step(config, tx, lr_schedule):
  """(state, batch {name: [B, T]}) -> (new state, per-step metrics); pure, for jax.jit."""
  t, moe = config.train, config.model.moe
  graphdef = model_graphdef(config)
  micro = t.batch_size // t.grad_accum
  # Chunked cross-entropy (train.loss_chunk_len). Self-distillation's KL needs the student's
  # full logits, so with train.distill_weight the loss stays unchunked.
  chunk_len = 0 if t.distill_weight else t.loss_chunk_len
  if t.distill_weight:  # the same model without fake quantization
    float_config = config.copy_and_resolve_references()
    float_config.model.quant.weights = None
    float_config.model.quant.kv_cache = None
    teacher_graphdef = model_graphdef(float_config)

  def distill_kl(teacher, rest, batch, logits):
    """Summed KL(teacher || student) over loss_mask tokens, at train.distill_temperature."""
    temp = t.distill_temperature
    weights = nnx.filter_state(teacher, nnx.Not(QuantScale))    # the float model has no learned scales
    model = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(weights), rest)
    target, _, _ = model(batch['inputs'], positions=batch['positions'],
                         segment_ids=batch['segment_ids'])
    p = jax.nn.log_softmax(jax.lax.stop_gradient(target) / temp, -1)
    q = jax.nn.log_softmax(logits / temp, -1)
    kl = jnp.sum(jnp.exp(p) * (p - q), -1) * temp ** 2                          # [b, T]
    return jnp.sum(kl * batch['loss_mask'])

  def micro_loss(params, rest, batch, n_tokens, teacher=None):
    """One micro-batch [b, T]. Returns (objective, (ce_sum, stats)); the objective is
    scaled so the gradients of all micro-batches add up to the full batch's gradient."""
    if not STACKED_PAIRS or config.model.quant.weights is not None:
      params = unstack_gate_up(params)   # QAT fake-quantizes gate and up each on its own grid
    model = nnx.merge(graphdef, params, rest)
    inputs = dict(positions=batch['positions'], segment_ids=batch['segment_ids'])
    # loss_mask is 0 on padding and (SFT) on prompt tokens: they carry no gradient.
    if chunk_len:   # the head's logits a chunk of positions at a time (train/loss.py)
      (hidden, head), stats, _ = model(batch['inputs'], **inputs, return_hidden=True)
      ce_sum = loss_lib.chunked_cross_entropy(hidden, head, batch['targets'],
                                              batch['loss_mask'], chunk_len)
    else:
      logits, stats, _ = model(batch['inputs'], **inputs)                            # [b, T, V]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])  # [b, T]
      ce_sum = jnp.sum(ce * batch['loss_mask'])
    objective = ce_sum / n_tokens + (moe.aux_loss_coef * stats['aux_loss']
                                     + moe.z_loss_coef * stats['z_loss']) / t.grad_accum
    # QAT: fake quantization happens in the layers (config.model.quant); here, optionally,
    # self-distillation from the float model we started from.
    if teacher is not None:
      objective += t.distill_weight * distill_kl(teacher, rest, batch, logits) / n_tokens
    return objective, (ce_sum, stats)

  def train_step(state, batch):
    """batch: {name: [B, T]} -> (new state, per-step metrics)."""
    params, rest = state['params'], state['rest']
    n_tokens = jnp.maximum(batch['loss_mask'].sum(), 1.0)
    # [B, T] -> [A, B/A, T] taking rows A apart, so each device keeps its own rows.
    micros = jax.tree.map(
        lambda x: x.reshape(micro, t.grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    # The matrices in the compute dtype and each SwiGLU's gate and up stacked once per step
    # instead of once per micro-batch; the micro-batch gradients come back in that dtype,
    # as they did through the cast, and add up in fp32 in the carry, stacked.
    cparams = stack_gate_up(compute_copy(params, config.model))

    def accumulate(carry, mb):
      (obj, (ce_sum, stats)), g = grad_fn(cparams, rest, mb, n_tokens, state.get('teacher'))
      acc = (obj, ce_sum, stats['aux_loss'], stats['z_loss'], stats['tokens_per_expert'],
             stats['dropped'], g)
      return jax.tree.map(jnp.add, carry, acc), None

    zero = jnp.zeros(())
    zeros = (zero, zero, zero, zero, _zero_load(config.model), jnp.zeros((), jnp.int32),
             jax.tree.map(jnp.zeros_like, stack_gate_up(params)))
    (objective, ce_sum, aux, z, tokens_per_expert, dropped, grads), _ = jax.lax.scan(
        accumulate, zeros, micros)
    grads = unstack_gate_up(grads)

    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
    updates, opt = tx.update(grads, state['opt'], params)
    new_params = optax.apply_updates(params, updates)
    new_rest = rest
    if moe.expert_bias:  # aux-loss-free balancing: nudge selection biases from the load
      model = nnx.merge(graphdef, new_params, rest)
      for layer, load in zip(moe_layers(model), tokens_per_expert):
        layer.update_expert_bias(load, moe.bias_update_rate)
      _, _, new_rest = nnx.split(model, nnx.Param, ...)

    # A non-finite step changes nothing but the counters; with 'stop' nothing changes
    # after the first one, so a later save still holds the last good state.
    frozen = state['bad_step'] > 0
    apply = ok & ~frozen
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
    bad = ~ok & ~frozen
    if t.on_nonfinite == 'stop':
      step = state['step'] + apply.astype(jnp.int32)
      bad_step = jnp.where(bad, state['step'] + 1, state['bad_step'])
    else:
      step = state['step'] + 1
      bad_step = state['bad_step']
    new_state = {'params': keep(new_params, params), 'rest': keep(new_rest, rest),
                 'opt': keep(opt, state['opt']), 'step': step, 'rng': state['rng'],
                 'skipped': state['skipped'] + bad.astype(jnp.int32), 'bad_step': bad_step}
    if 'teacher' in state:
      new_state['teacher'] = state['teacher']
    # lr of this update (optax counts only applied updates; after skips it lags `step`).
    step_metrics = {
        'loss': ce_sum / n_tokens, 'objective': objective, 'aux_loss': aux / t.grad_accum,
        'z_loss': z / t.grad_accum, 'grad_norm': grad_norm, 'lr': lr_schedule(state['step']),
        'tokens_per_expert': tokens_per_expert, 'dropped': dropped, 'ok': ok,
        'skipped': new_state['skipped'], 'loss_tokens': n_tokens}
    return new_state, step_metrics

  return train_step


# ------------------------------------------------------------------------------ helpers


def _holds_quant_scales(path) -> bool:
  """Whether a checkpoint's params include learned (LSQ) scales (`<weight>_scale`)."""
  import orbax.checkpoint as ocp
  directory, step = ckpt_lib.resolve(path)
  manager = ocp.CheckpointManager(directory, item_handlers={'state': ocp.PyTreeCheckpointHandler()})
  try:
    params = manager.item_metadata(step)['state']['params']
  finally:
    manager.close()
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return any(ckpt_lib._key_name(k).endswith('_scale') for p, _ in paths for k in p)


def _load_into_lsq(config, tx, mesh, state, state_sharding, parts):
  """train.init_from a checkpoint without learned scales (the float SFT model) into an LSQ
  model: loads it as the same model without scales, then starts every scale from the
  max-abs scale of its loaded weight, exactly as a fresh LSQ init computes it."""
  t = config.train
  config_lib._require(not t.restore_optimizer, 'train.restore_optimizer',
                      f'{t.init_from} holds no learned quantization scales, hence no optimizer '
                      'state for them: start LSQ with a fresh optimizer')
  plain = config.copy_and_resolve_references()
  plain.model.quant.learnable_scale = False
  abstract = jax.eval_shape(make_init_fn(plain, tx))
  loaded, meta, where = ckpt_lib.load_for_init(
      t.init_from, abstract, sharding.state_shardings(abstract, mesh), parts)
  graphdef = model_graphdef(config)

  @functools.partial(jax.jit, out_shardings=state_sharding['params'])
  def with_scales(params, rest, loaded_params):
    model = nnx.merge(graphdef, params, rest)
    nnx.update(model, loaded_params)
    return nnx.state(qat.init_scales_from_weights(model), nnx.Param)

  loaded['params'] = with_scales(state['params'], loaded['rest'], loaded['params'])
  return loaded, meta, where


def _zero_load(model_cfg):
  """tokens_per_expert [L_moe, E] of one step ([0, 0] for a dense model)."""
  n_moe = sum(config_lib.is_moe_layer(model_cfg, i) for i in range(model_cfg.n_layers))
  return jnp.zeros((n_moe, model_cfg.moe.n_experts) if n_moe else (0, 0), jnp.float32)


def _summarize(pending, seconds, tokens_per_step, flops_per_token, peak):
  """Averages the window's per-step metrics (finite steps only) into scalars + a histogram."""
  host = jax.device_get(pending)
  ok = [m for m in host if m['ok']] or host
  mean = lambda k: float(np.mean([m[k] for m in ok]))
  tokens_per_s = tokens_per_step * len(host) / max(seconds, 1e-9)
  scalars = {
      'train/loss': mean('loss'), 'train/objective': mean('objective'),
      'train/aux_loss': mean('aux_loss'), 'train/z_loss': mean('z_loss'),
      'train/grad_norm': mean('grad_norm'), 'train/lr': float(host[-1]['lr']),
      'train/tokens_per_s': tokens_per_s, 'train/nonfinite_skipped': int(host[-1]['skipped']),
      'train/loss_tokens': mean('loss_tokens'),
  }
  if peak:  # MFU needs a known peak: on CPU it is n/a and not logged
    scalars['train/mfu'] = tokens_per_s * flops_per_token / (peak * jax.device_count())
  hist = {}
  load = np.sum([m['tokens_per_expert'] for m in ok], 0)     # [L_moe, E]
  if load.size:
    rel = load / np.maximum(load.mean(-1, keepdims=True), 1e-9)  # 1.0 = perfectly balanced
    scalars['moe/max_load'] = float(rel.max())
    scalars['moe/min_load'] = float(rel.min())
    scalars['moe/dropped'] = float(np.mean([m['dropped'] for m in ok]))
    hist['moe/load'] = rel
  return scalars, hist


class _NonfiniteWatch:
  """Acts on non-finite steps, from the per-step metrics of the steps since the last call.

  on_nonfinite='stop': raises NonFiniteError at the first one, naming the last good
  checkpoint, or the restored one as suspect when it is the first step after a resume.
  on_nonfinite='skip': reports every skipped step on the console and raises once more than
  max_consecutive_skips in a row were skipped, or once more than that many were skipped in
  all and they are over max_skip_fraction of the steps so far.
  """

  def __init__(self, t, ckpt, restored_step: int | None):
    self.t, self.ckpt, self.restored_step = t, ckpt, restored_step
    self.checked = 0       # last step looked at
    self.in_a_row = 0

  def check(self, state, pending, step):
    if self.t.on_nonfinite == 'stop':
      bad = int(jax.device_get(state['bad_step']))
      if bad:
        self._stop_at(bad, jax.device_get(pending))
      return
    host = jax.device_get(pending)   # the metrics of steps step - len + 1 .. step
    for s, m in enumerate(host, start=step - len(host) + 1):
      if s <= self.checked:
        continue
      self.checked = s
      if m['ok']:
        self.in_a_row = 0
        continue
      self.in_a_row += 1
      skipped, t = int(m['skipped']), self.t
      _log(f"{t.stage}: step {s}: non-finite loss ({float(m['loss'])}) or gradient "
           f"(norm {float(m['grad_norm'])}); update skipped ({skipped} skipped in {s} steps)"
           + self._after_restore(s))
      if self.in_a_row > t.max_consecutive_skips or (
          skipped > t.max_consecutive_skips and skipped > t.max_skip_fraction * s):
        self.ckpt.wait()
        raise NonFiniteError(
            f'{t.stage}: {self.in_a_row} steps in a row and {skipped} of {s} skipped for a '
            f'non-finite loss or gradient, over the limits (train.max_consecutive_skips='
            f'{t.max_consecutive_skips}, train.max_skip_fraction={t.max_skip_fraction}); '
            f'stopped; {self._kept()}. Check the data and train.lr.')

  def _after_restore(self, step) -> str:
    if self.restored_step is None or step != self.restored_step + 1:
      return ''
    return (f'; the first step after resuming from {self.ckpt.path(self.restored_step)}: that '
            'checkpoint is suspect (it passed its integrity check, so it was saved this way or '
            'the batch at this data position is bad)')

  def _kept(self) -> str:
    self.ckpt.wait()
    latest = self.ckpt.latest_step()
    return (f'the last good checkpoint is {self.ckpt.path(latest)}' if latest is not None
            else 'no checkpoint was saved before it')

  def _stop_at(self, bad, host):
    t = self.t
    bad_m = next((m for m in host if not m['ok']), None)
    detail = '' if bad_m is None else (f" (loss={float(bad_m['loss'])}, "
                                       f"grad_norm={float(bad_m['grad_norm'])})")
    if after := self._after_restore(bad):
      raise NonFiniteError(f'{t.stage}: non-finite loss or gradient at step {bad}{detail}{after}. '
                           'Resume from an older checkpoint or check the data.')
    raise NonFiniteError(
        f"{t.stage}: non-finite loss or gradient at step {bad}{detail}; stopped and "
        f"{self._kept()}. Lower train.lr or check the data, or set "
        "train.on_nonfinite='skip' to skip such steps.")


class _Preemption:
  """SIGTERM (TPU/cloud preemption) sets a flag; the loop saves and leaves at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    # With several processes JAX's preemption sync catches SIGTERM (distributed.stop_requested).
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _log(msg: str):
  if jax.process_index() == 0:
    tqdm.write(msg)


def stage_summary(workdir: str, stage: str) -> dict:
  """Loss at the first and last logged step and held-out perplexity at start and end, from
  `metrics.jsonl` (so a resumed stage reports its whole history)."""
  workdir = paths.as_path(workdir)
  path = workdir / 'metrics.jsonl'
  logged = metrics_lib.read_jsonl(path) if path.exists() else {}
  train = sorted(s for s, m in logged.items() if 'train/loss' in m)
  evals = sorted(s for s, m in logged.items() if 'eval/ppl' in m)
  get = lambda steps, i, k: logged[steps[i]][k] if steps else None
  return {'stage': stage, 'steps': train[-1] if train else 0,
          'loss_start': get(train, 0, 'train/loss'), 'loss_end': get(train, -1, 'train/loss'),
          'ppl_start': get(evals, 0, 'eval/ppl'), 'ppl_end': get(evals, -1, 'eval/ppl'),
          'skipped': get(train, -1, 'train/nonfinite_skipped'),
          'checkpoint': str(workdir / 'checkpoints' / str(train[-1]))
          if train else None}
