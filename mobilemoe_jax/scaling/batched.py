"""Many tiny training runs in one process: the seeds of one shape trained side by side.

A tiny model leaves a GPU idle (each step is a few hundred microsecond-sized kernels), and
start-up plus compiling costs more than training it. So `train_seeds` trains S copies of one
shape (one per seed) as one program: the trainer's own init, optimizer and update step
(`trainer.make_init_fn`, `optim.make_optimizer`, `trainer.make_train_step`), vmapped over the
seed axis and scanned over `chunk` steps per call, with every batch already on the device.
Each seed keeps its own init and its own data order, so seed s here trains what
`python -m mobilemoe_jax.train --config.train.seed=s` trains (tests check the losses agree),
with two differences: no checkpoints are written, and the held-out loss is the mean over the
whole validation split (one unshuffled pass), not the first `train.eval_batches` batches.

The batches come from the data pipeline (`pipeline.make_dataset`, the trainer's stream for
that seed). Because they depend only on (seed, batch size, seq_len, data), `save_batches`
writes them once to a compact .npz that a machine without the pipeline's dependencies (the
device tool's GPU) can read with `load_batches`: uint16 tokens (vocabulary <= 65536), uint8
positions and segment ids (seq_len <= 256), a bool mask.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.data import pipeline

# Stored dtype of each feature in the .npz (the trainer's dtypes are restored on load).
_STORED = {'inputs': np.uint16, 'targets': np.uint16, 'segment_ids': np.uint8,
           'positions': np.uint8, 'loss_mask': np.bool_}
_LOADED = {'inputs': np.int32, 'targets': np.int32, 'segment_ids': np.int32,
           'positions': np.int32, 'loss_mask': np.float32}


def take_batches(data_cfg, *, seq_len: int, batch_size: int, seed: int, n: int | None) -> dict:
  """The first n batches of the pipeline's stream (all of it for a one-pass config and
  n=None), stacked: {feature: [n, B, T]}."""
  batches = []
  for batch in pipeline.make_dataset(data_cfg, seq_len=seq_len, batch_size=batch_size,
                                     seed=seed, process_index=0, process_count=1):
    batches.append(batch)
    if n is not None and len(batches) == n:
      break
  if n is not None and len(batches) < n:
    raise ValueError(f'the data stream ended after {len(batches)} of {n} batches')
  return {k: np.stack([b[k] for b in batches]) for k in pipeline.FEATURES}


def save_batches(path: str, batches: dict, **meta):
  """Compact .npz of stacked batches; refuses values the small dtypes cannot hold."""
  out = {}
  for k, kind in _STORED.items():
    a = batches[k]
    if kind is not np.bool_ and (a.min() < 0 or a.max() > np.iinfo(kind).max):
      raise ValueError(f'{path}: feature {k!r} has values in [{a.min()}, {a.max()}], '
                       f'outside {np.dtype(kind).name}')
    out[k] = a.astype(kind)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  np.savez_compressed(path, **out, **{f'meta_{k}': np.asarray(v) for k, v in meta.items()})


def load_batches(path: str) -> dict:
  with np.load(path) as f:
    missing = [k for k in _STORED if k not in f]
    if missing:
      raise ValueError(f'{path}: not a batch file (missing {missing})')
    return {k: f[k].astype(_LOADED[k]) for k in _STORED}


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def train_seeds(config, seeds, train_batches, eval_batches, *, chunk: int) -> list[dict]:
  """Trains one copy of `config`'s model per seed, side by side, for `config.train.steps`.

  train_batches: one {feature: [>= steps, B, T]} per seed (that seed's stream);
  eval_batches: {feature: [n, B, T]}, the validation split, the same for every seed.
  Evaluates every `chunk` steps (steps % chunk == 0). Returns per seed
  {'seed', 'loss' (final held-out), 'curve' [[step, held-out loss], ...], 'train_losses'
  (per step), 'bad_step' (first non-finite step, 0 = none: then training stopped there)}.
  """
  from mobilemoe_jax.train import optim, trainer   # the trainer imports this package's parent

  t = config.train
  config_lib.validate(config.model)
  if t.steps % chunk:
    raise ValueError(f'train.steps={t.steps} is not a multiple of chunk={chunk}')
  if t.grad_accum != 1:
    raise ValueError('train_seeds runs grad_accum=1 only')
  for s, b in zip(seeds, train_batches):
    if b['inputs'].shape[0] < t.steps or b['inputs'].shape[1:] != (t.batch_size, t.seq_len):
      raise ValueError(f'seed {s}: batches {b["inputs"].shape} do not cover {t.steps} steps '
                       f'of {t.batch_size}x{t.seq_len}')
  tx, lr_schedule = optim.make_optimizer(t)
  states = []
  for s in seeds:   # the trainer's init, once per seed; eager: a jit would compile per seed
    cfg = config.copy_and_resolve_references()
    cfg.train.seed = s
    states.append(trainer.make_init_fn(cfg, tx)())
  state = _stack(states)              # every leaf [S, ...]
  step_fn = jax.vmap(trainer.make_train_step(config, tx, lr_schedule))
  graphdef = trainer.model_graphdef(config)

  @jax.jit
  def run_chunk(state, batches):      # batches: {feature: [chunk, S, B, T]}
    def body(st, batch):
      st, m = step_fn(st, batch)
      return st, m['loss']            # [S]
    return jax.lax.scan(body, state, batches)

  @jax.jit
  def eval_sums(params, rest, batches):  # held-out CE summed over loss_mask: [S]
    def one(p, r):
      model = nnx.merge(graphdef, p, r)
      def body(total, batch):
        logits, _, _ = model(batch['inputs'], positions=batch['positions'],
                             segment_ids=batch['segment_ids'])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
        return total + jnp.sum(ce * batch['loss_mask']), None
      return jax.lax.scan(body, jnp.zeros(()), batches)[0]
    return jax.vmap(one)(params, rest)

  eval_dev = jax.device_put(eval_batches)
  n_eval_tokens = float(eval_batches['loss_mask'].sum())
  evaluate = lambda: np.asarray(eval_sums(state['params'], state['rest'], eval_dev)) / n_eval_tokens

  # [steps, B, T] per seed -> [steps, S, B, T] on the device, sliced per chunk.
  data = jax.device_put({k: np.stack([b[k][:t.steps] for b in train_batches], 1)
                         for k in pipeline.FEATURES})
  curve, train_losses = [], []
  for start in range(0, t.steps, chunk):
    state, losses = run_chunk(state, jax.tree.map(lambda a: a[start:start + chunk], data))
    train_losses.append(np.asarray(losses))                 # [chunk, S]
    curve.append((start + chunk, evaluate()))
  train_losses = np.concatenate(train_losses)                # [steps, S]
  bad = np.asarray(state['bad_step'])
  return [{'seed': s, 'loss': float(curve[-1][1][i]),
           'curve': [[step, round(float(l[i]), 5)] for step, l in curve],
           'train_losses': train_losses[:, i].tolist(), 'bad_step': int(bad[i])}
          for i, s in enumerate(seeds)]
