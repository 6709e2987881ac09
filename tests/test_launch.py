"""launch/: the exact commands each script's --dry_run would run, argument errors, the
GKE manifest, SIGTERM passing through worker.sh, and shellcheck."""
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time

import pytest

STUBS = None  # set by the no_cloud_tools fixture
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
HOST = socket.gethostname()
LIBTPU = ('--xla_tpu_enable_async_collective_fusion=true '
          '--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true '
          '--xla_tpu_enable_async_collective_fusion_multiple_steps=true '
          '--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true')


@pytest.fixture(scope='module', autouse=True)
def no_cloud_tools(tmp_path_factory):
  """gcloud and kubectl stubs that fail loudly: a test never reaches a real cloud."""
  stubs = tmp_path_factory.mktemp('stubs')
  for tool in ('gcloud', 'kubectl'):
    (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} called for real in a test" >&2\nexit 99\n')
    (stubs / tool).chmod(0o755)
  global STUBS
  STUBS = str(stubs)


def _run(script, *args, env=None, check=True):
  # Stubbed cloud tools, a fixed TMPDIR (setup.sh's tarball path), no LIBTPU_INIT_ARGS.
  full_env = {k: v for k, v in os.environ.items() if k != 'LIBTPU_INIT_ARGS'}
  full_env.update(TMPDIR='/tmp/launch-test', PATH=f"{STUBS}:{os.environ['PATH']}", **(env or {}))
  p = subprocess.run(['bash', os.path.join(LAUNCH, script), *args], capture_output=True,
                     text=True, env=full_env, timeout=60)
  if check:
    assert p.returncode == 0, p.stderr
  return p


def dry(script, *args, env=None):
  """The commands a dry run prints, each as the argv list it would run. (--dry_run goes
  first: after `--` it would be a trainer flag.)"""
  out = _run(script, '--dry_run', *args, env=env).stdout
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith('+ ')]


SSH = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'tpu1', '--zone=us-east5-b']


# ---------------------------------------------------------------------- create / delete


def test_create_tpu_vm():
  assert dry('create.sh', '--name=tpu1', '--zone=us-east5-b', '--type=v6e-32') == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'tpu1', '--zone=us-east5-b',
       '--accelerator-type=v6e-32', '--version=v2-alpha-tpuv6e']]


def test_create_queued_spot_with_project():
  assert dry('create.sh', '--name=tpu1', '--zone=us-east5-b', '--project=proj',
             '--type=v5litepod-16', '--queued', '--spot') == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'tpu1', '--node-id=tpu1',
       '--zone=us-east5-b', '--project=proj', '--accelerator-type=v5litepod-16',
       '--runtime-version=v2-alpha-tpuv5-lite', '--spot'],
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'tpu1', '--zone=us-east5-b',
       '--project=proj', '--format=value(state.state)']]


def test_create_explicit_version():
  cmd, = dry('create.sh', '--name=tpu1', '--zone=z', '--type=v5p-64', '--version=my-image')
  assert cmd[-1] == '--version=my-image'


def test_delete():
  assert dry('delete.sh', '--name=tpu1', '--zone=us-east5-b') == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'tpu1', '--zone=us-east5-b', '--quiet']]
  assert dry('delete.sh', '--name=tpu1', '--zone=us-east5-b', '--queued') == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'tpu1', '--zone=us-east5-b',
       '--force', '--quiet']]


# ------------------------------------------------------------------- setup / run / stop


def test_setup():
  commands = dry('setup.sh', '--name=tpu1', '--zone=us-east5-b', '--ref=v1.2')
  assert commands == [
      ['git', '-C', ROOT, 'archive', '--format=tar.gz',
       '--output=/tmp/launch-test/mobilemoe-jax.tar.gz', 'v1.2'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '/tmp/launch-test/mobilemoe-jax.tar.gz',
       'tpu1:mobilemoe-jax.tar.gz', '--zone=us-east5-b', '--worker=all'],
      SSH + ['--worker=all', '--command=' + ' && '.join([
          'rm -rf mobilemoe-jax', 'mkdir mobilemoe-jax',
          'tar -xzf mobilemoe-jax.tar.gz -C mobilemoe-jax',
          'python3 -m pip install -q --user uv',
          '.local/bin/uv venv -q --python 3.12 --allow-existing venv',
          ".local/bin/uv pip install -q --python venv/bin/python -e ./mobilemoe-jax 'jax[tpu]' gcsfs",
          'cd mobilemoe-jax', '../venv/bin/python -m mobilemoe_jax.data.build --out data'])],
      SSH + ['--worker=all',
             '--command=cd mobilemoe-jax && ../venv/bin/python -m mobilemoe_jax.distributed']]


def _remote(command_flag):
  """What the worker's shell runs for a `--command=...` (its words, as that shell splits them)."""
  assert command_flag.startswith('--command=')
  return shlex.split(command_flag[len('--command='):])


def test_run():
  cmd, = dry('run.sh', '--name=tpu1', '--zone=us-east5-b', '--bucket=my-bucket', '--run=s-v1',
             '--config=configs/stages/pretrain.py:mobilemoe_s')
  assert cmd[:-1] == SSH + ['--worker=all']
  assert _remote(cmd[-1]) == [
      'cd', 'mobilemoe-jax', '&&', 'setsid', 'nohup', 'launch/worker.sh',
      '--workdir=gs://my-bucket/s-v1', '--config=configs/stages/pretrain.py:mobilemoe_s',
      '>/dev/null', '2>&1', '</dev/null', '&']


def test_run_passes_trainer_flags_and_libtpu_args_through_ssh_quoting():
  cmd, = dry('run.sh', '--name=tpu1', '--zone=us-east5-b', '--project=proj',
             '--bucket=gs://my-bucket/', '--run=s-v1', '--config=configs/stages/sft.py:tiny',
             '--libtpu_args=--xla_a=1 --xla_b=2', '--', "--config.train.stage=it's x",
             '--config.train.steps=10')
  assert cmd[:7] == SSH[:7] and cmd[7:9] == ['--project=proj', '--worker=all']
  assert _remote(cmd[-1])[5:-4] == [
      'launch/worker.sh', '--workdir=gs://my-bucket/s-v1', '--config=configs/stages/sft.py:tiny',
      '--libtpu_args=--xla_a=1 --xla_b=2', '--', "--config.train.stage=it's x",
      '--config.train.steps=10']


def test_logs_and_stop():
  cmd, = dry('logs.sh', '--name=tpu1', '--zone=us-east5-b')
  assert cmd == SSH + ['--worker=0', '--command=tail -n 100 -F mobilemoe-jax/logs/$(hostname).log']
  cmd, = dry('logs.sh', '--name=tpu1', '--zone=us-east5-b', '--worker=all')
  assert cmd[7] == '--worker=all'
  cmd, = dry('stop.sh', '--name=tpu1', '--zone=us-east5-b')
  assert cmd == SSH + ['--worker=all', '--command=pid=$(cat mobilemoe-jax/logs/trainer.pid '
                       '2>/dev/null) || exit 0; kill -TERM $pid; while kill -0 $pid 2>/dev/null; '
                       'do sleep 5; done']


# ------------------------------------------------------------------------------ worker.sh


def test_worker_environment_and_command(tmp_path):
  args = ('--workdir=gs://b/run1', '--config=configs/stages/pretrain.py:mobilemoe_s',
          '--python=/opt/py', f'--log_dir={tmp_path}', '--', '--config.train.steps=5')
  assert dry('worker.sh', *args) == [
      ['env', f'LIBTPU_INIT_ARGS={LIBTPU}', 'JAX_COMPILATION_CACHE_DIR=gs://b/run1/jax_cache',
       '/opt/py', '-m', 'mobilemoe_jax.train', '--config=configs/stages/pretrain.py:mobilemoe_s',
       '--workdir=gs://b/run1', '--config.train.steps=5'],
      ['gcloud', 'storage', 'cp', f'{tmp_path}/{HOST}.log', f'gs://b/run1/logs/{HOST}.log']]
  # An exported LIBTPU_INIT_ARGS wins over the default; --libtpu_args over both.
  assert dry('worker.sh', *args, env={'LIBTPU_INIT_ARGS': '--x=1'})[0][1] == 'LIBTPU_INIT_ARGS=--x=1'
  assert dry('worker.sh', '--libtpu_args=', *args)[0][1] == 'LIBTPU_INIT_ARGS='


def test_worker_passes_sigterm_to_the_trainer(tmp_path):
  """SIGTERM to worker.sh (GKE stops a pod) or to the trainer (launch/stop.sh): the trainer
  gets it, finishes its save, and the worker exits with the trainer's status."""
  fake = tmp_path / 'trainer.sh'
  fake.write_text('#!/usr/bin/env bash\n'
                  'trap \'echo saving; sleep 0.5; echo saved; exit 0\' TERM\n'
                  'echo started "$@"; for _ in $(seq 300); do sleep 0.1; done; exit 3\n')
  fake.chmod(0o755)
  logs = tmp_path / 'logs'
  for target in ('worker', 'trainer'):
    p = subprocess.Popen(['bash', f'{LAUNCH}/worker.sh', f'--workdir={tmp_path}/run', '--config=c',
                          f'--python={fake}', f'--log_dir={logs}'],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pid_file, log = logs / 'trainer.pid', logs / f'{HOST}.log'
    for _ in range(100):  # until the trainer has started and set its trap
      if pid_file.exists() and log.exists() and 'started' in log.read_text():
        break
      time.sleep(0.1)
    os.kill(p.pid if target == 'worker' else int(pid_file.read_text()), signal.SIGTERM)
    assert p.wait(timeout=20) == 0, p.stderr.read()
    text = log.read_text()
    assert 'started -m mobilemoe_jax.train --config=c' in text
    assert text.rstrip().endswith('saved\ntrainer exited with status 0'), text
    assert not pid_file.exists()
    log.unlink()


# ------------------------------------------------------------------------------ gke.sh


def _manifest(*args):
  out = _run('gke.sh', 'apply', '--dry_run', *args).stdout
  yaml_text, _, command = out.rpartition('+ ')
  assert command.strip() == 'kubectl apply -f -'
  return pytest.importorskip('yaml').safe_load(yaml_text)


def test_gke_jobset_manifest():
  m = _manifest('--name=s-v1', '--image=us-docker.pkg.dev/p/r/mobilemoe-jax:abc',
                '--bucket=my-bucket', '--run=s-v1', '--config=configs/stages/pretrain.py:mobilemoe_s',
                '--type=v5litepod-16', '--topology=4x4', '--', '--config.train.steps=10')
  assert (m['kind'], m['metadata']['name']) == ('JobSet', 's-v1')
  job = m['spec']['replicatedJobs'][0]['template']['spec']
  assert job['parallelism'] == job['completions'] == 4  # 16 chips, 4 per host
  pod = job['template']['spec']
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5-lite-podslice',
                                 'cloud.google.com/gke-tpu-topology': '4x4'}
  container, = pod['containers']
  assert container['image'] == 'us-docker.pkg.dev/p/r/mobilemoe-jax:abc'
  assert container['command'] == ['launch/worker.sh', '--workdir=gs://my-bucket/s-v1',
                                  '--config=configs/stages/pretrain.py:mobilemoe_s', '--',
                                  '--config.train.steps=10']
  assert container['resources']['limits'] == {'google.com/tpu': 4}
  assert m['spec']['failurePolicy']['maxRestarts'] == 10


def test_gke_v5p_topology_and_quoting():
  m = _manifest('--name=j', '--image=i', '--bucket=gs://b', '--run=r', '--config=c',
                '--type=v5p-64', '--topology=2x4x4', '--max_restarts=3', '--',
                '--config.train.stage=say "hi" \\o/')
  job = m['spec']['replicatedJobs'][0]['template']['spec']
  assert job['parallelism'] == 8  # 32 chips
  container = job['template']['spec']['containers'][0]
  assert container['command'][-1] == '--config.train.stage=say "hi" \\o/'
  assert job['template']['spec']['nodeSelector']['cloud.google.com/gke-tpu-accelerator'] == 'tpu-v5p-slice'
  assert m['spec']['failurePolicy']['maxRestarts'] == 3


def test_gke_logs_and_delete():
  assert dry('gke.sh', 'logs', '--name=j') == [
      ['kubectl', 'logs', '-f', '--tail=100',
       '--selector=jobset.sigs.k8s.io/jobset-name=j,batch.kubernetes.io/job-completion-index=0']]
  assert dry('gke.sh', 'delete', '--name=j') == [['kubectl', 'delete', 'jobset', 'j']]


# ----------------------------------------------------------------------------- errors

BASE = ['--name=tpu1', '--zone=z']


@pytest.mark.parametrize('script, args, message', [
    ('create.sh', ['--zone=z', '--type=v4-8'], 'missing required --name'),
    ('create.sh', ['--name=tpu1', '--type=v4-8'], 'missing required --zone'),
    ('create.sh', BASE, 'missing required --type'),
    ('create.sh', BASE + ['--type=tpu9-8'], 'no default runtime version for --type=tpu9-8'),
    ('delete.sh', ['--name=tpu1'], 'missing required --zone'),
    ('setup.sh', ['--zone=z'], 'missing required --name'),
    ('run.sh', BASE + ['--run=r', '--config=c'], 'missing required --bucket'),
    ('run.sh', BASE + ['--bucket=b', '--config=c'], 'missing required --run'),
    ('run.sh', BASE + ['--bucket=b', '--run=r'], 'missing required --config'),
    ('stop.sh', ['--zone=z'], 'missing required --name'),
    ('logs.sh', ['--name=tpu1'], 'missing required --zone'),
    ('worker.sh', ['--config=c'], 'missing required --workdir'),
    ('worker.sh', ['--workdir=w'], 'missing required --config'),
    ('run.sh', BASE + ['--bucket=b', '--run=r', '--config=c', '--steps=3'],
     'unknown argument: --steps=3'),
    ('gke.sh', ['--name=j'], 'say what to do: apply, logs or delete'),
    ('gke.sh', ['apply', '--name=j', '--image=i', '--bucket=b', '--run=r', '--config=c',
                '--type=v5litepod-16'], 'missing required --topology'),
    ('gke.sh', ['apply', '--name=j', '--image=i', '--bucket=b', '--run=r', '--config=c',
                '--type=v5litepod-16', '--topology=4x3', '--chips_per_worker=8'],
     '--topology=4x3 (12 chips) does not split into hosts of 8 chips'),
])
def test_bad_arguments_fail_with_a_clear_message(script, args, message):
  p = _run(script, '--dry_run', *args, check=False)
  assert p.returncode == 2 and p.stdout == ''
  assert f'error: {message}' in p.stderr


def test_help():
  p = _run('run.sh', '--help')
  assert p.stdout.startswith('Starts a training stage on every worker of a slice')
  assert '--config=configs/stages/pretrain.py:mobilemoe_s' in p.stdout


def test_shellcheck():
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed (apt-get install shellcheck); launch/*.sh unchecked')
  scripts = sorted(f for f in os.listdir(LAUNCH) if f.endswith('.sh'))
  p = subprocess.run(['shellcheck', '-x', *scripts], cwd=LAUNCH, capture_output=True, text=True)
  assert p.returncode == 0, p.stdout + p.stderr
