"""Two local processes joined by jax.distributed (gloo CPU collectives) run the real trainer
(`python -m mobilemoe_jax.train`) on the tiny MoE with data sharded by process; a second
launch resumes from the first one's checkpoint. The losses must be those of one process
training the same global batches on 2 local devices without a break.

The single-process reference is this file run as a script: it calls `train_and_evaluate`
with the data pipeline wrapped so that one process reads both process shards and joins
them, which is exactly the global batch the 2 processes assemble.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow   # three trainer launches as subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 2
FIRST, TOTAL = 3, 6  # the first launch stops (and saves) after FIRST steps; resume runs to TOTAL
# Short rows, no eval, a constant LR (so stopping at FIRST does not change the schedule).
OVERRIDES = dict(batch_size=4, seq_len=64, schedule='constant', warmup_steps=0, eval_batches=0,
                 log_every=1, checkpoint_every=1000, progress=False)


def _config_arg(data_dir):
  return f'configs/stages/pretrain.py:tiny,data_dir={data_dir}'


# ------------------------------------------------------------- the single-process reference


class _JoinedShards:
  """A dataset whose batches join every process shard's batch in process order, as
  make_array_from_process_local_data does across processes."""

  def __init__(self, shards):
    self.shards = shards

  def __iter__(self):
    return _JoinedIterator([iter(s) for s in self.shards])


class _JoinedIterator:
  """Checkpointable like a Grain iterator (the trainer saves it): the state is every shard's."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self.iterators]).encode()

  def set_state(self, state: bytes):
    for it, s in zip(self.iterators, json.loads(state)):
      it.set_state(s)

  def start_prefetch(self):
    pass


def _reference(data_dir: str, workdir: str, steps: int):
  from configs.stages import pretrain
  from mobilemoe_jax.data import pipeline
  from mobilemoe_jax.train import train_and_evaluate

  make_dataset, calls = pipeline.make_dataset, []

  def joined(data_config, *, batch_size, **kw):
    calls.append(data_config)
    shards = [make_dataset(data_config, batch_size=batch_size // PROCESSES, process_index=i,
                           process_count=PROCESSES, **kw) for i in range(PROCESSES)]
    return _JoinedShards(shards)

  pipeline.make_dataset = joined
  config = pretrain.get_config(_config_arg(data_dir).split(':', 1)[1])
  config.train.update(dict(OVERRIDES, steps=steps))
  train_and_evaluate(config, workdir)
  if not calls:
    sys.exit('the trainer no longer reads data through pipeline.make_dataset: this reference '
             'did not see the joined shards; update _reference')


# ------------------------------------------------------------------------------- the test


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _spawn(cmd, devices: int, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  for key in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(key, None)
  env.update(env_extra or {})
  return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=300):
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail('a process hung (one that never joined the collective?)')
    assert p.returncode == 0, f'{p.args} failed (rc={p.returncode}):\n{out[-4000:]}'


def _train_two_processes(data_dir, workdir, steps):
  """Both processes of one launch, as launch/ starts them on a slice (env, one per host).
  They share a compilation cache (as launch/worker.sh sets up): the resumed launch does not
  compile the step again."""
  port = _free_port()
  flags = [f'--config.train.{k}={v}' for k, v in dict(OVERRIDES, steps=steps).items()]
  cmd = ['-m', 'mobilemoe_jax.train', f'--config={_config_arg(data_dir)}', f'--workdir={workdir}',
         *flags]
  return [_spawn(cmd, devices=1, env_extra=dict(
      JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES=str(PROCESSES),
      JAX_PROCESS_ID=str(i), JAX_COMPILATION_CACHE_DIR=f'{workdir}/jax_cache'))
      for i in range(PROCESSES)]


def _losses(workdir):
  from mobilemoe_jax.train.metrics import read_jsonl
  return {s: m['train/loss'] for s, m in read_jsonl(f'{workdir}/metrics.jsonl').items()}


def test_two_processes_train_and_resume_like_one_process(tmp_path, data_dir):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  # The reference runs alongside the first 2-process launch (3 processes, 2 cores: fine).
  reference = _spawn([os.path.abspath(__file__), data_dir, single, str(TOTAL)], devices=PROCESSES)
  _wait(_train_two_processes(data_dir, multi, FIRST))
  first = _losses(multi)
  assert sorted(os.listdir(f'{multi}/checkpoints')) == [str(FIRST)]
  _wait(_train_two_processes(data_dir, multi, TOTAL))  # resumes from the step-FIRST checkpoint
  _wait([reference])

  assert sorted(first) == list(range(1, FIRST + 1))
  got, want = _losses(multi), _losses(single)
  assert sorted(got) == sorted(want) == list(range(1, TOTAL + 1))
  # Steps FIRST+1.. come from the resumed launch: its restored params, optimizer state and
  # per-process data positions must reproduce the uninterrupted run.
  steps = sorted(want)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-6)
  assert got[TOTAL] < got[1]  # it trains


if __name__ == '__main__':
  if len(sys.argv) != 4:
    sys.exit('usage: test_multiprocess.py DATA_DIR WORKDIR STEPS (the reference run of the test)')
  _reference(sys.argv[1], sys.argv[2], int(sys.argv[3]))
