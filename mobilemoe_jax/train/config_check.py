"""Checks a stage config before anything is built: every `train` field against its range,
unknown `train` fields with the nearest known names, then the model config.

The defaults and comments of the fields live in mobilemoe_jax/config.py (`train_config`);
this table says which values work. Each rule: (test, what the field must be).
"""
import jax

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.data import tokenizer as tokenizer_lib

_INT, _NUM = int, (int, float)


def _number(v, kind) -> bool:
  return isinstance(v, kind) and not isinstance(v, bool)


def _positive(kind=_NUM):
  return lambda v: _number(v, kind) and v > 0, 'must be > 0'


def _at_least(low, kind=_INT):
  return lambda v: _number(v, kind) and v >= low, f'must be >= {low}'


def _fraction(closed_top=True):
  top = '1]' if closed_top else '1)'
  return (lambda v: _number(v, _NUM) and 0 <= v and (v <= 1 if closed_top else v < 1),
          f'must be in [0, {top}')


def _one_of(*choices):
  return lambda v: v in choices, f'must be one of {choices}'


def _is(kind):
  return lambda v: isinstance(v, kind), f'must be a {kind.__name__}'


TRAIN_RULES = {
    'stage': (lambda v: isinstance(v, str) and v, 'must be a non-empty name'),
    'seed': _at_least(0),
    'steps': _positive(_INT),
    'batch_size': _positive(_INT),
    'seq_len': _positive(_INT),
    'grad_accum': _at_least(1),
    'lr': _positive(),
    'schedule': _one_of('wsd', 'cosine', 'constant'),
    'warmup_steps': _at_least(0),
    'decay_fraction': _fraction(),
    'min_lr_ratio': _fraction(),
    'weight_decay': _at_least(0, _NUM),
    'b1': _fraction(closed_top=False),
    'b2': _fraction(closed_top=False),
    'eps': _positive(),
    'clip_norm': _at_least(0, _NUM),
    'adam_mu_dtype': _one_of('', 'float32', 'bfloat16'),
    'on_nonfinite': _one_of('stop', 'skip'),
    'max_consecutive_skips': _at_least(0),
    'max_skip_fraction': _fraction(),
    'log_every': _at_least(1),
    'eval_every': _at_least(0),
    'eval_batches': _at_least(0),
    'checkpoint_every': _at_least(1),
    'keep_checkpoints': _at_least(1),
    'async_checkpoints': _is(bool),
    'checkpoint_fallback': _is(bool),
    'allow_config_change': _is(bool),
    'init_from': _is(str),
    'restore_optimizer': _is(bool),
    'progress': _is(bool),
    'loss_chunk_len': _at_least(0),
    'distill_weight': _at_least(0, _NUM),
    'distill_temperature': _positive(),
}


def check(config):
  """Raises config.ConfigError naming the first bad field (one line)."""
  t, req = config.train, config_lib._require
  for key in t.keys():
    if key not in TRAIN_RULES:
      raise config_lib.ConfigError(config_lib.unknown_field({'train': TRAIN_RULES}, f'train.{key}'))
  for key, (ok, what) in TRAIN_RULES.items():
    if key in t:
      req(bool(ok(t[key])), f'train.{key}', f'{what}, got {t[key]!r}')
  config_lib.validate(config.model)
  req(t.warmup_steps <= t.steps, 'train.warmup_steps',
      f'must be <= train.steps={t.steps}, got {t.warmup_steps}')
  req(t.batch_size % t.grad_accum == 0, 'train.grad_accum',
      f'must divide batch_size={t.batch_size}, got {t.grad_accum}')
  req(t.batch_size % jax.process_count() == 0, 'train.batch_size',
      f'must split over {jax.process_count()} processes, got {t.batch_size}')
  req(t.seq_len <= config.model.max_seq_len, 'train.seq_len',
      f'exceeds model.max_seq_len={config.model.max_seq_len}, got {t.seq_len}')
  req(not t.distill_weight or config.model.quant.weights is not None, 'train.distill_weight',
      'self-distillation teaches the fake-quantized model from the float one: set '
      'model.quant.weights (the QAT stage does)')
  vocab = tokenizer_lib.load_tokenizer(config.data.train.tokenizer).vocab_size
  req(vocab <= config.model.vocab_size, 'model.vocab_size',
      f'{config.model.vocab_size} is smaller than the tokenizer vocabulary ({vocab}) of '
      f'{config.data.train.tokenizer}')
