"""The train loop: non-finite handling, checkpoint mismatch/corruption errors, SFT loss mask."""
import glob
import os

import jax
import numpy as np
import pytest

from mobilemoe_jax import sharding
from mobilemoe_jax.data import pipeline
from mobilemoe_jax.train import CheckpointError, NonFiniteError, optim, train_and_evaluate, trainer
from mobilemoe_jax.train import metrics as metrics_lib
from tests.support.train import make_config, poison_step


def test_nonfinite_stop_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
  poison_step(monkeypatch, 4)
  config = make_config(data_dir)
  with pytest.raises(NonFiniteError, match=r'step 4 .*last good checkpoint is .*checkpoints/3'):
    train_and_evaluate(config, str(tmp_path))
  saved = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / 'checkpoints' / '[0-9]*')))
  assert saved == [3]


def test_nonfinite_skip_is_recorded(data_dir, tmp_path, monkeypatch):
  poison_step(monkeypatch, 2)
  config = make_config(data_dir, **{'train.on_nonfinite': 'skip'})
  summary = train_and_evaluate(config, str(tmp_path))
  logged = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [logged[s]['train/nonfinite_skipped'] for s in range(1, 7)] == [0, 1, 1, 1, 1, 1]
  assert summary['skipped'] == 1 and summary['steps'] == 6
  assert np.isnan(logged[2]['train/loss'])
  assert all(np.isfinite(logged[s]['train/loss']) for s in (1, 3, 4, 5, 6))


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A finished 6-step pre-training run, shared by the checkpoint tests."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  train_and_evaluate(make_config(data_dir), workdir)
  return workdir


def test_workdir_layout(trained):
  """Checkpoints, TensorBoard events and the JSONL log each in their place (launch/README.md)."""
  assert sorted(os.listdir(trained)) == ['checkpoints', 'metrics.jsonl', 'tensorboard']
  assert glob.glob(os.path.join(trained, 'tensorboard', 'events.out.tfevents.*'))
  assert sorted(metrics_lib.read_jsonl(os.path.join(trained, 'metrics.jsonl'))) == list(range(7))


def test_unknown_workdir_scheme_fails_before_training(data_dir):
  with pytest.raises(ValueError, match="'gcs://bucket/run': unsupported scheme 'gcs://'"):
    train_and_evaluate(make_config(data_dir), 'gcs://bucket/run')


def test_mismatched_checkpoint_names_the_parameter(data_dir, trained, tmp_path):
  config = make_config(data_dir, **{'train.steps': 7, 'model.d_ff': 96})
  with pytest.raises(CheckpointError) as err:
    train_and_evaluate(config, trained)
  msg = str(err.value)
  assert 'params/blocks/0/ffn/gate' in msg and '(64, 128)' in msg and '(64, 96)' in msg, msg


def test_corrupt_checkpoint_names_the_checkpoint(data_dir, trained, tmp_path):
  import shutil
  workdir = tmp_path / 'copy'
  shutil.copytree(trained, workdir)
  step_dir = workdir / 'checkpoints' / '6'
  for path in glob.glob(str(step_dir / 'state' / '**' / '*'), recursive=True):
    if os.path.isfile(path) and 'metadata' not in os.path.basename(path).lower():
      with open(path, 'r+b') as f:  # keep the size, destroy the bytes
        f.write(b'\xff' * os.path.getsize(path))
  # Without fallback (test_train_integrity.py has the fallback to step 3).
  config = make_config(data_dir, **{'train.steps': 7, 'train.checkpoint_fallback': False})
  with pytest.raises(CheckpointError, match=str(step_dir)) as err:
    train_and_evaluate(config, str(workdir))
  assert 'corrupt' in str(err.value) and str(step_dir / 'state') in str(err.value)  # the file


def test_stage_lineage_and_init_from(data_dir, trained, tmp_path):
  """A stage started from another's checkpoint takes its params, restarts the optimizer
  and records where it came from."""
  import json
  config = make_config(data_dir, **{'train.stage': 'midtrain',
                                    'train.init_from': os.path.join(trained, 'checkpoints')})
  summary = train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(summary['checkpoint'], 'meta', 'metadata')) as f:
    meta = json.load(f)
  assert [(e['stage'], e['step']) for e in meta['lineage']] == [('pretrain', 6), ('midtrain', 6)]
  assert meta['lineage'][0]['checkpoint'] == os.path.join(trained, 'checkpoints', '6')
  # Same params and held-out set: step 0 of this stage scores exactly what the last one did.
  assert summary['ppl_start'] == trainer.stage_summary(trained, 'pretrain')['ppl_end']
  # A fresh optimizer: the LR warms up from 0 again.
  logged = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert logged[1]['train/lr'] == 0.0


def test_sft_prompt_tokens_carry_no_loss(data_dir):
  """Changing a prompt token's target leaves the loss and gradient of the train step
  unchanged, bit for bit; changing an assistant token's target does not."""
  config = make_config(data_dir)  # the trainer's own step, jitted as it jits it
  data = pipeline.bundled_data_config(data_dir, 'sft')
  batch = next(iter(pipeline.make_dataset(data, seq_len=32, batch_size=8, seed=0)))
  prompt = (batch['loss_mask'] == 0) & (batch['segment_ids'] > 0)
  answer = batch['loss_mask'] > 0
  assert prompt.any() and answer.any()
  tx, lr = optim.make_optimizer(config.train)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    init = trainer.make_init_fn(config, tx)
    state_sharding = sharding.state_shardings(jax.eval_shape(init), mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    init = jax.jit(init, out_shardings=state_sharding)
    step = jax.jit(trainer.make_train_step(config, tx, lr), donate_argnums=0,
                   in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None))

    def loss_and_grad_norm(targets):
      _, m = step(init(), jax.device_put(dict(batch, targets=targets), batch_sharding))
      return float(m['loss']), float(m['grad_norm'])

    base = loss_and_grad_norm(batch['targets'])
    other = (batch['targets'] + 7) % 512
    assert loss_and_grad_norm(np.where(prompt, other, batch['targets'])) == base
    changed = loss_and_grad_norm(np.where(answer, other, batch['targets']))
  assert changed[0] != base[0] and changed[1] != base[1]


def test_schedules_and_decay_mask(data_dir):
  config = make_config(data_dir, **{'train.steps': 100, 'train.warmup_steps': 10,
                                    'train.decay_fraction': 0.5, 'train.min_lr_ratio': 0.1})
  lr = optim.schedule(config.train)
  peak = config.train.lr
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(50), lr(55), lr(100)],
                             [0, peak / 2, peak, peak, peak, peak * 0.1], rtol=1e-5)
  assert peak * 0.1 < lr(75) < peak  # decaying over the last 45 steps
  with config.unlocked():
    config.train.schedule = 'cosine'
  cos = optim.schedule(config.train)
  np.testing.assert_allclose([cos(10), cos(100)], [peak, peak * 0.1], rtol=1e-5)
  tx, _ = optim.make_optimizer(config.train)
  params = jax.eval_shape(trainer.make_init_fn(config, tx))['params']
  mask = optim.decay_mask(params)
  assert not mask['blocks'][0]['attn_norm']['scale'].get_value()    # 1-D: no weight decay
  assert mask['blocks'][0]['attn']['q'].get_value() and mask['embed'].get_value()


def test_gradient_accumulation_matches_one_batch(data_dir):
  """grad_accum=2 over the same 8 rows: same loss and update as one batch of 8. (The router
  losses are per-micro-batch statistics, so they are switched off for the comparison.)"""
  batch = next(iter(pipeline.make_dataset(make_config(data_dir).data.train, seq_len=32,
                                          batch_size=8, seed=0)))
  out = []
  for accum in (1, 2):
    config = make_config(data_dir, **{'train.grad_accum': accum, 'model.moe.aux_loss_coef': 0.0,
                                      'model.moe.z_loss_coef': 0.0})
    tx, lr = optim.make_optimizer(config.train)
    state = jax.jit(trainer.make_init_fn(config, tx))()
    state, m = jax.jit(trainer.make_train_step(config, tx, lr))(state, batch)
    out.append((float(m['loss']), float(m['grad_norm']), state['params']['embed'][...]))
  np.testing.assert_allclose(out[0][:2], out[1][:2], rtol=1e-5)
  np.testing.assert_allclose(out[0][2], out[1][2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('dispatch,cf,dtype', [('gather', 1.25, 'bfloat16'), ('dense', 0.0, 'bfloat16'),
                                               ('grouped', 0.0, 'float32')])   # XLA:CPU: no bf16 -> fp32 dot
def test_stacked_pairs_into_the_model_same_step(data_dir, monkeypatch, dispatch, cf, dtype):
  """The model taking each SwiGLU's gate and up as the stacked pair (trainer.STACKED_PAIRS;
  `gather` and `grouped` multiply by it, the other dispatches take it apart): the step of
  the model given gate and up apart."""
  batch = next(iter(pipeline.make_dataset(make_config(data_dir).data.train, seq_len=32,
                                          batch_size=8, seed=0)))
  config = make_config(data_dir, **{'train.grad_accum': 2, 'model.dtype': dtype,
                                    'model.moe.dispatch': dispatch,
                                    'model.moe.capacity_factor': cf})
  tx, lr = optim.make_optimizer(config.train)
  state = jax.jit(trainer.make_init_fn(config, tx))()
  out = []
  for stacked in (True, False):
    monkeypatch.setattr(trainer, 'STACKED_PAIRS', stacked)
    new, m = jax.jit(trainer.make_train_step(config, tx, lr))(state, batch)
    out.append((float(m['loss']), float(m['grad_norm']), new['params']))
  np.testing.assert_allclose(out[0][:2], out[1][:2], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               out[0][2], out[1][2])


def test_adam_mu_dtype(data_dir):
  """train.adam_mu_dtype='bfloat16' stores the first moment in bf16 (the second stays fp32);
  one step's update stays close to the fp32 one (it only rounds the moment)."""
  batch = next(iter(pipeline.make_dataset(make_config(data_dir).data.train, seq_len=32,
                                          batch_size=8, seed=0)))
  out = {}
  for mu in ('', 'bfloat16'):
    config = make_config(data_dir, **{'train.adam_mu_dtype': mu, 'train.warmup_steps': 0})
    tx, lr = optim.make_optimizer(config.train)
    state = jax.jit(trainer.make_init_fn(config, tx))()
    adam = state['opt'][1][0]
    dtypes = {str(a.dtype) for a in jax.tree.leaves(adam.mu)}
    assert dtypes == {mu or 'float32'}, dtypes
    assert {str(a.dtype) for a in jax.tree.leaves(adam.nu)} == {'float32'}
    before = np.asarray(state['params']['embed'][...])
    state, _ = jax.jit(trainer.make_train_step(config, tx, lr))(state, batch)
    out[mu] = np.asarray(state['params']['embed'][...]) - before
  assert np.abs(out['']).max() > 0
  np.testing.assert_allclose(out['bfloat16'], out[''], rtol=2e-2, atol=1e-3 * np.abs(out['']).max())


def test_compute_copy_hoists_the_cast_without_changing_the_step(data_dir, monkeypatch):
  """With bf16 compute, the matrices are cast (router and norm scales stay fp32) and each
  SwiGLU's gate and up stacked once per step; the step equals the one that casts and stacks
  inside every micro-batch."""
  batch = next(iter(pipeline.make_dataset(make_config(data_dir).data.train, seq_len=32,
                                          batch_size=8, seed=0)))
  config = make_config(data_dir, **{'train.grad_accum': 2, 'model.dtype': 'bfloat16'})
  tx, lr = optim.make_optimizer(config.train)
  state = jax.jit(trainer.make_init_fn(config, tx))()
  params = state['params']
  copy = trainer.compute_copy(params, config.model)
  moe = copy['blocks'][1]['ffn']
  assert moe['gate'][...].dtype == 'bfloat16' and copy['embed'][...].dtype == 'bfloat16'
  assert moe['router'][...].dtype == 'float32'
  assert copy['blocks'][1]['ffn_norm']['scale'][...].dtype == 'float32'
  stacked = trainer.stack_gate_up(params)
  e, d, f = params['blocks'][1]['ffn']['gate'][...].shape
  assert stacked['blocks'][1]['ffn']['gate'][...].shape == (e, d, 2, f)
  assert stacked['blocks'][0]['ffn']['gate'][...].shape[-2] == 2          # the dense MLP too
  assert stacked['blocks'][1]['ffn']['up'][...].size == 0
  jax.tree.map(np.testing.assert_array_equal, trainer.unstack_gate_up(stacked), params)
  out = []
  for hoist in (True, False):
    if not hoist:   # the cast and the stack left to the model, inside every micro-batch
      for name in ('compute_copy', 'stack_gate_up', 'unstack_gate_up'):
        monkeypatch.setattr(trainer, name, lambda params, *cfg: params)
    new, m = jax.jit(trainer.make_train_step(config, tx, lr))(state, batch)
    out.append((float(m['loss']), float(m['grad_norm']), new['params']))
  assert out[0][:2] == out[1][:2]
  jax.tree.map(np.testing.assert_array_equal, out[0][2], out[1][2])
