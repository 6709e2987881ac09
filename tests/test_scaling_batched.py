"""The in-process sweep: seeds trained side by side must train what the trainer trains."""
import json
import os

import numpy as np
import pytest

from mobilemoe_jax.scaling import batched, sweep
from mobilemoe_jax.train import train_and_evaluate

# The tiny MoE (8 experts top-2 + a shared expert) cut to 2 layers, one of them MoE.
SMALL = {'model.n_layers': 2, 'model.d_model': 64, 'model.d_ff': 128, 'model.vocab_size': 512,
         'train.batch_size': 8, 'train.seq_len': 32, 'train.warmup_steps': 2, 'train.steps': 4,
         'train.log_every': 1, 'train.eval_batches': 10_000, 'train.progress': False}


@pytest.mark.slow   # three trainings (the in-process sweep, the trainer, a resume)
def test_in_process_seeds_match_the_trainer_and_resume(data_dir, tmp_path):
  runs = [('d64_moe_s4', SMALL)]
  bdir, out = str(tmp_path / 'batches'), str(tmp_path / 'records.jsonl')
  sweep.prepare_batches(runs, 'tiny', [0, 1], bdir, data_dir, log=lambda m: None)
  logs = []
  sweep.run_in_process(runs, 'tiny', out, bdir, [0, 1], chunk=1, data_dir=data_dir,
                       code='test', log=logs.append)
  recs = {r['name']: r for r in map(json.loads, open(out))}
  assert sorted(recs) == ['d64_moe_s4_seed0', 'd64_moe_s4_seed1']
  r = recs['d64_moe_s4_seed1']
  assert (r['seed'], r['run'], r['steps'], r['bad_step'], r['code']) == (1, 'd64_moe_s4', 4, 0, 'test')
  assert r['loss'] != recs['d64_moe_s4_seed0']['loss']     # another seed, another init and data

  # The trainer, seed 1, on 8 devices: the same per-step losses and final held-out loss
  # (eval_batches covers the whole validation split, as the in-process mode always does).
  work = str(tmp_path / 'trainer')
  train_and_evaluate(sweep.build_config('tiny', {**SMALL, 'train.seed': 1}, data_dir), work)
  logged = [json.loads(l) for l in open(os.path.join(work, 'metrics.jsonl'))]
  train = [m['train/loss'] for m in logged if 'train/loss' in m]
  np.testing.assert_allclose([l for _, l in r['train_curve']], train, rtol=2e-4)
  np.testing.assert_allclose(r['loss'], [m['eval/loss'] for m in logged if 'eval/loss' in m][-1],
                             rtol=2e-4)

  # Re-running finds every (run, seed) recorded and trains nothing.
  sweep.run_in_process(runs, 'tiny', out, bdir, [0, 1], chunk=1, data_dir=data_dir,
                       code='test', log=logs.append)
  assert logs[-1].startswith('1 runs already in') and len(open(out).readlines()) == 2


def test_batch_files_round_trip_and_refuse_what_they_cannot_hold(tmp_path):
  rng = np.random.default_rng(0)
  b = {'inputs': rng.integers(0, 2048, (3, 2, 8)).astype(np.int32),
       'targets': rng.integers(0, 2048, (3, 2, 8)).astype(np.int32),
       'segment_ids': rng.integers(0, 4, (3, 2, 8)).astype(np.int32),
       'positions': rng.integers(0, 8, (3, 2, 8)).astype(np.int32),
       'loss_mask': rng.integers(0, 2, (3, 2, 8)).astype(np.float32)}
  path = str(tmp_path / 'b.npz')
  batched.save_batches(path, b, seed=3)
  back = batched.load_batches(path)
  for k in b:
    assert back[k].dtype == b[k].dtype and np.array_equal(back[k], b[k])
  with pytest.raises(ValueError, match="'inputs' has values in"):
    batched.save_batches(path, dict(b, inputs=b['inputs'] + 70_000))
  np.savez(str(tmp_path / 'other.npz'), x=np.zeros(3))
  with pytest.raises(ValueError, match='not a batch file'):
    batched.load_batches(str(tmp_path / 'other.npz'))


def test_train_seeds_refuses_short_streams_and_odd_chunks(data_dir):
  cfg = sweep.build_config('tiny', SMALL, data_dir)
  short = {k: np.zeros((2, 8, 32), np.int32) for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  short['loss_mask'] = np.zeros((2, 8, 32), np.float32)
  with pytest.raises(ValueError, match='not a multiple of chunk'):
    batched.train_seeds(cfg, [0], [short], short, chunk=3)
  with pytest.raises(ValueError, match='do not cover 4 steps'):
    batched.train_seeds(cfg, [0], [short], short, chunk=2)
