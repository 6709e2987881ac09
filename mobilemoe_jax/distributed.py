"""Multi-host start-up: call `initialize()` once at the top of an entry point, before any
other JAX call (it must run before the backend starts).

Where the process group comes from, first match wins:
  1. explicit values: arguments, else flags --coordinator_address / --num_processes /
     --process_id, else env JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
     (GPU hosts, local CPU processes in the tests);
  2. a Cloud TPU VM (a slice from launch/create.sh, or a GKE TPU pod from launch/jobset.yaml):
     `jax.distributed.initialize()` with no arguments reads the worker list and this
     worker's id from the TPU metadata server / the TPU_WORKER_* env GKE sets;
  3. neither: one process, nothing is started.

Cross-process collectives on CPU go through gloo (set explicitly: older jax versions had
none by default, and a 2-process CPU run then fails only at its first collective).

  python -m mobilemoe_jax.distributed [--coordinator_address=... ...]   # smoke check a slice
"""
import glob
import importlib.util
import logging
import os

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 (env JAX_COORDINATOR_ADDRESS); not needed on TPU')
flags.DEFINE_integer('num_processes', None, 'processes in the job (env JAX_NUM_PROCESSES)')
flags.DEFINE_integer('process_id', None, 'this process, 0-based (env JAX_PROCESS_ID)')


def _flag(name):
  # Library code may run before (or without) absl parsing; then flags read as unset.
  return FLAGS[name].value if FLAGS.is_parsed() else None


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value not in (None, '') else None


def explicit_settings(coordinator_address=None, num_processes=None, process_id=None):
  """(address, count, id) from arguments, flags, then env; any may be None."""
  address = coordinator_address or _flag('coordinator_address') or os.environ.get(
      'JAX_COORDINATOR_ADDRESS') or None
  count = next((v for v in (num_processes, _flag('num_processes'), _env_int('JAX_NUM_PROCESSES'))
                if v is not None), None)
  pid = next((v for v in (process_id, _flag('process_id'), _env_int('JAX_PROCESS_ID'))
              if v is not None), None)
  return address, count, pid


def on_cloud_tpu() -> bool:
  """True on a TPU VM, found without starting a backend: libtpu is installed and TPU chips
  show up as /dev/accel* (v2-v5e) or /dev/vfio/<n> (v5p, v6e); libtpu is checked because
  other machines may have VFIO devices too. GKE TPU pods also get TPU_WORKER_HOSTNAMES."""
  if os.environ.get('TPU_WORKER_HOSTNAMES'):
    return True
  chips = glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')
  return bool(chips) and importlib.util.find_spec('libtpu') is not None


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> bool:
  """Joins the process group if this is a multi-process run; returns whether there are
  several processes."""
  import jax  # here, not at module import, so `--help` and flag parsing stay fast

  address, count, pid = explicit_settings(coordinator_address, num_processes, process_id)
  given = [v is not None for v in (address, count, pid)]
  if any(given) and not all(given):
    raise ValueError(
        'multi-process start needs all of --coordinator_address, --num_processes and '
        f'--process_id (or env JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); '
        f'got address={address!r} num_processes={count!r} process_id={pid!r}')
  if all(given):
    if count == 1:
      return False
    if not 0 <= pid < count:
      raise ValueError(f'process_id {pid} not in [0, num_processes={count})')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(address, num_processes=count, process_id=pid)
  elif on_cloud_tpu():
    jax.distributed.initialize()  # auto-detect; a single-host slice gets one process
  else:
    return False
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return jax.process_count() > 1


def stop_requested(step: int, sigterm_seen: bool) -> bool:
  """Whether to save and stop after `step`, the same answer on every process.

  A preemption (or launch/stop.sh) delivers SIGTERM to each host at a slightly different
  time. If each process stopped at the step it saw the signal, one would be saving (Orbax
  collectives) while another ran the next step (training collectives): on CPU that aborts
  with a gloo "collective mismatch", on TPU it hangs. So with several processes the answer
  comes from JAX's preemption sync manager: it catches SIGTERM itself, tells every process,
  and they agree on the first step all of them reach. It must see the signal, so a
  multi-process run must not install a Python SIGTERM handler (that would replace JAX's);
  `sigterm_seen` (the trainer's own handler) is used only by a single process.
  Call it after every step, on every process.
  """
  import jax
  if jax.process_count() == 1:
    return sigterm_seen
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)


def _smoke(argv):
  """Prints who is who and checks a cross-process sum: run it on a new slice before training."""
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  initialize()
  mesh = jax.make_mesh((jax.device_count(),), ('all',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('all'))
  # Every device holds its global device index + 1; the sum checks every process took part.
  local = [jax.device_put(np.array([d.id + 1.0], np.float32), d) for d in jax.local_devices()]
  ids = jax.make_array_from_single_device_arrays((jax.device_count(),), sharding, local)
  total = float(jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))(ids))
  expected = sum(d.id + 1.0 for d in jax.devices())
  print(f'process {jax.process_index()}/{jax.process_count()} '
        f'devices local={jax.local_device_count()} global={jax.device_count()} '
        f'kind={jax.devices()[0].device_kind} sum={total:g} expected={expected:g}', flush=True)
  if total != expected:
    raise SystemExit('cross-process sum is wrong')


if __name__ == '__main__':
  from absl import app
  app.run(_smoke)
