"""A SIGTERM that reaches only one of two processes stops both at the same step
(distributed.stop_requested), so their collectives never mismatch."""
import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow   # two jax.distributed processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(out_dir: str):
  from mobilemoe_jax import distributed

  distributed.initialize()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  import jax
  import jax.numpy as jnp
  import numpy as np

  me = jax.process_index()
  mesh = jax.make_mesh((jax.device_count(),), ('d',))
  x = jax.make_array_from_process_local_data(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d')), np.ones((1,), np.float32))
  total = jax.jit(jnp.sum)  # a cross-process collective every step, like a train step
  for step in range(1, 3000):
    assert float(total(x)) == jax.process_count()
    if step == 5:
      open(os.path.join(out_dir, f'running-{me}'), 'w').close()
    if distributed.stop_requested(step, sigterm_seen=False):
      break
    time.sleep(0.02)
  with open(os.path.join(out_dir, f'stopped-{me}'), 'w') as f:
    f.write(str(step))


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(i), JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
               XLA_FLAGS='--xla_force_host_platform_device_count=1')
    procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), str(tmp_path)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    deadline = time.time() + 120
    while not all((tmp_path / f'running-{i}').exists() for i in range(2)):
      assert time.time() < deadline and all(p.poll() is None for p in procs), 'workers did not start'
      time.sleep(0.2)
    procs[1].terminate()  # SIGTERM to process 1 only
    outs = [p.communicate(timeout=60)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  steps = [int((tmp_path / f'stopped-{i}').read_text()) for i in range(2)]
  assert steps[0] == steps[1] > 5


if __name__ == '__main__':
  _worker(sys.argv[1])
