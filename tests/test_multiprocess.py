"""Two local processes joined by jax.distributed (gloo CPU collectives) train the tiny MoE
on data sharded by process, checkpoint, and a second launch resumes: the losses must be those
of one process running the same global batches on 2 local devices without a break.

The workers are this file run as a script (`python tests/test_multiprocess.py worker ...`):
each is a fresh interpreter, as on a real slice, so jax.distributed starts before any backend.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, GLOBAL_BATCH, SHARDS = 64, 4, 2  # data is always split 2 ways, as for 2 processes
FIRST, TOTAL = 3, 6  # the first launch stops (and saves) after FIRST steps; resume runs to TOTAL
LR = 0.1


# ------------------------------------------------------------------------------- the workers


def _worker(workdir: str, data_dir: str, steps: int):
  """Plain-SGD steps of the tiny MoE; process 0 writes {step: loss} to losses-<steps>.json."""
  from mobilemoe_jax import distributed

  distributed.initialize()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID

  import jax
  import optax
  import orbax.checkpoint as ocp
  from flax import nnx

  from configs import tiny
  from mobilemoe_jax.config import mesh_config
  from mobilemoe_jax.data import build, pipeline
  from mobilemoe_jax.model import Transformer
  from mobilemoe_jax.sharding import batch_sharding, make_mesh, state_shardings

  cfg = tiny.get_config('moe')
  mesh = make_mesh(mesh_config(data=-1))  # every global device on 'data'
  # Initialise eagerly on one local device before the mesh is set (eager ops under a mesh
  # compile each initialiser for every device), then place the (identical) values on the mesh.
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  state = jax.device_put(jax.device_get(state), state_shardings(state, mesh))
  jax.set_mesh(mesh)  # ambient for the rest of the process, as in the trainer
  graphdef, params, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)

  # One process reads both shards and concatenates them; two processes read one each, so the
  # global batch is the same either way.
  data_cfg = pipeline.bundled_data_config(data_dir, 'pretrain')
  shards = range(SHARDS) if jax.process_count() == 1 else [jax.process_index()]
  assert jax.process_count() in (1, SHARDS)
  iters = [iter(pipeline.make_dataset(data_cfg, seq_len=SEQ_LEN, batch_size=GLOBAL_BATCH // SHARDS,
                                      seed=0, process_index=i, process_count=SHARDS)) for i in shards]
  in_sharding = batch_sharding(mesh)

  def next_batch():
    rows = [next(it) for it in iters]
    return {k: jax.make_array_from_process_local_data(in_sharding, np.concatenate([r[k] for r in rows]))
            for k in ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')}

  @jax.jit
  def train_step(params, batch):
    def loss_fn(params):
      logits, _, _ = nnx.merge(graphdef, params, rest)(
          batch['inputs'], batch['positions'], batch['segment_ids'])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
      return (ce * batch['loss_mask']).sum() / batch['loss_mask'].sum()  # a global (all-reduced) mean
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(lambda p, g: p - LR * g, params, grads), loss

  # Resume: parameters and every process's data position come back from the latest step.
  ckpt = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  start = ckpt.latest_step() or 0
  if start:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
    restored = ckpt.restore(start, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract), data=pipeline.CheckpointRestore(iters[0])))
    params = restored['params']

  losses = {}
  for step in range(start + 1, steps + 1):
    params, loss = train_step(params, next_batch())
    losses[step] = float(loss)
  if jax.process_count() > 1:
    ckpt.save(steps, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), data=pipeline.CheckpointSave(iters[0])))
    ckpt.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'losses-{steps}.json'), 'w') as f:
      json.dump(losses, f)


# ------------------------------------------------------------------------------- the test


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _spawn(args, devices: int, process_id=None, port=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  for key in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(key, None)
  if process_id is not None:
    env.update(JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES=str(SHARDS),
               JAX_PROCESS_ID=str(process_id))
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), 'worker', *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=180):
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail('a worker hung (a process that never joined the collective?)')
    assert p.returncode == 0, f'worker failed (rc={p.returncode}):\n{out[-4000:]}'


def _two_processes(args):
  port = _free_port()
  return [_spawn(args, devices=1, process_id=i, port=port) for i in range(SHARDS)]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  from mobilemoe_jax.data import build
  out = str(tmp_path_factory.mktemp('data'))
  build.build(out, max_bytes=200_000, vocab_size=512, progress=False)
  return out


def test_two_processes_train_resume_match_one_process(tmp_path, data_dir):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  os.makedirs(multi)
  os.makedirs(single)
  # The single-process reference runs alongside the first 2-process launch.
  reference = _spawn([single, data_dir, str(TOTAL)], devices=SHARDS)
  _wait(_two_processes([multi, data_dir, str(FIRST)]))
  _wait(_two_processes([multi, data_dir, str(TOTAL)]))  # resumes from the step-FIRST checkpoint
  _wait([reference])

  def read(path):
    with open(path) as f:
      return {int(k): v for k, v in json.load(f).items()}

  first, resumed = read(f'{multi}/losses-{FIRST}.json'), read(f'{multi}/losses-{TOTAL}.json')
  want = read(f'{single}/losses-{TOTAL}.json')
  assert sorted(first) == list(range(1, FIRST + 1))
  assert sorted(resumed) == list(range(FIRST + 1, TOTAL + 1))  # it did resume, not restart
  got = {**first, **resumed}
  steps = sorted(want)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5)
  assert want[TOTAL] < want[1]  # it trains


if __name__ == '__main__':
  if sys.argv[1:2] != ['worker']:
    sys.exit('usage: test_multiprocess.py worker WORKDIR DATA_DIR STEPS (run by the test)')
  _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
