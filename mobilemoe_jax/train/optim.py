"""The optimizer: AdamW with decoupled weight decay, LR schedules, clipping.

Weight decay is masked off every parameter with fewer than two dims (norm scales, biases,
the expert-bias vector): decaying a norm's scale towards 0 fights the normalisation and
buys no regularisation.
"""
import jax
import optax


def schedule(train) -> optax.Schedule:
  """`train.schedule`:
  - 'wsd': linear warmup, constant, then linear decay to `min_lr_ratio * lr` over the last
    `decay_fraction` of the steps (warmup-stable-decay: a stage can stop or branch anywhere
    in the stable phase, and the decay is the anneal).
  - 'cosine': linear warmup, then cosine to `min_lr_ratio * lr` at `steps`.
  - 'constant': warmup, then constant.
  """
  lr, steps, warmup = train.lr, train.steps, min(train.warmup_steps, train.steps)
  end = lr * train.min_lr_ratio
  warm = optax.linear_schedule(0.0 if warmup else lr, lr, max(warmup, 1))
  if train.schedule == 'cosine':
    rest = optax.cosine_decay_schedule(lr, max(steps - warmup, 1), alpha=train.min_lr_ratio)
  elif train.schedule == 'wsd':
    decay = int(round(train.decay_fraction * (steps - warmup)))
    stable = steps - warmup - decay
    rest = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, end, max(decay, 1))], [stable])
  elif train.schedule == 'constant':
    rest = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config field `train.schedule`: expected 'wsd', 'cosine' or 'constant', "
                     f"got {train.schedule!r}")
  return optax.join_schedules([warm, rest], [warmup])


def decay_mask(params):
  """True for matrices (decayed), False for 1-D params. Same tree structure as `params`."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping, then AdamW. Returns (tx, lr schedule) so the loop can log the LR.

  train.adam_mu_dtype ('' = the params' dtype, fp32) stores AdamW's first moment in another
  dtype, e.g. 'bfloat16' as MaxText's `mu_dtype`: 2 fewer bytes read and written per
  parameter and step. It changes the update's rounding (the moment is rounded each step), so
  it is off unless asked for; the second moment stays in the params' dtype.
  """
  lr = schedule(train)
  tx = optax.chain(
      optax.clip_by_global_norm(train.clip_norm) if train.clip_norm else optax.identity(),
      optax.adamw(lr, b1=train.b1, b2=train.b2, eps=train.eps,
                  weight_decay=train.weight_decay, mask=decay_mask,
                  mu_dtype=train.get('adam_mu_dtype') or None),
  )
  return tx, lr
