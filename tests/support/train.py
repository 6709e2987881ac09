"""The small training config the train, resume, sharding, QAT and pipeline tests share (one
compiled step for all of them), and a way to poison a batch."""
import itertools

import numpy as np

from configs.stages import pretrain
from mobilemoe_jax.data import pipeline

# Small enough to compile in seconds: 2 layers (dense, then MoE with 8 experts). Tests keep
# steps=6 and on_nonfinite='stop' unless they need otherwise, so they share compiled steps.
SMALL = {'model.n_layers': 2, 'model.d_model': 64, 'model.d_ff': 128, 'model.vocab_size': 512,
         'train.batch_size': 8, 'train.seq_len': 32, 'train.log_every': 1, 'train.eval_batches': 1,
         'train.warmup_steps': 2, 'train.progress': False, 'train.steps': 6,
         'train.checkpoint_every': 3}


def make_config(data_dir, stage=pretrain, **overrides):
  config = stage.get_config(f'tiny,data_dir={data_dir}')
  config.update_from_flattened_dict({**SMALL, **overrides})
  config.lock()
  return config


def poison_step(monkeypatch, bad_step):
  """Makes training batch `bad_step` (1-based) carry a NaN loss mask, as corrupt data would."""
  original = pipeline.make_dataset

  def make_dataset(data_config, **kw):
    ds = original(data_config, **kw)
    if data_config['num_epochs'] == 1:  # the held-out set stays clean
      return ds
    count = itertools.count(1)
    return ds.map(lambda b: dict(b, loss_mask=b['loss_mask'] * np.nan) if next(count) == bad_step else b)

  monkeypatch.setattr(pipeline, 'make_dataset', make_dataset)
