"""Resume after a real SIGKILL or SIGTERM gives the same losses, bit for bit, as a run that
was never interrupted: params, optimizer, step, RNG and the data position all come back."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mobilemoe_jax.train import metrics as metrics_lib
from mobilemoe_jax.train import train_and_evaluate
from tests.support.train import make_config

pytestmark = pytest.mark.slow   # trainings killed and resumed in subprocesses

N = 3  # interrupt after N steps of 2N; the config checkpoints every 3 steps
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child trains the same config as make_config() and pauses inside step N + 1 (after the
# step-N checkpoint has been started) so the parent can signal it at a known point.
CHILD = textwrap.dedent('''
    import os, signal, sys, time
    sys.path[:0] = [{repo!r}]
    from tests.support.train import make_config
    from mobilemoe_jax.train import train_and_evaluate

    def pause(step):
      if step != {n} + 1:
        return
      open(os.path.join({workdir!r}, 'paused'), 'w').close()
      for _ in range(1200):  # until SIGTERM is noticed (the trainer's flag) or SIGKILL lands
        handler = signal.getsignal(signal.SIGTERM)
        if getattr(getattr(handler, '__self__', None), 'requested', False):
          return
        time.sleep(0.05)

    train_and_evaluate(make_config({data!r}), {workdir!r}, step_callback=pause)
    print('child finished')
''')


def _losses(workdir):
  logged = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {s: m['train/loss'] for s, m in logged.items() if 'train/loss' in m}


def _interrupted_run(data_dir, workdir, sig):
  os.makedirs(workdir)
  script = CHILD.format(repo=REPO, n=N, workdir=workdir, data=data_dir)
  child = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  checkpoint = os.path.join(workdir, 'checkpoints', str(N))
  deadline = time.time() + 300
  # Orbax renames the step directory into place only once the async save has committed.
  while not (os.path.exists(os.path.join(workdir, 'paused')) and os.path.isdir(checkpoint)):
    assert child.poll() is None, child.stdout.read()
    assert time.time() < deadline, 'child never reached step N + 1'
    time.sleep(0.05)
  child.send_signal(sig)
  out, _ = child.communicate(timeout=300)
  return child.returncode, out


@pytest.fixture(scope='module')
def straight(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  train_and_evaluate(make_config(data_dir), workdir)
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 2 * N + 1))
  return losses


def test_resume_after_sigkill(data_dir, straight, tmp_path):
  workdir = str(tmp_path / 'run')
  code, out = _interrupted_run(data_dir, workdir, signal.SIGKILL)
  assert code == -signal.SIGKILL, out
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [str(N)]
  train_and_evaluate(make_config(data_dir), workdir)   # resumes from step N
  assert _losses(workdir) == straight


def test_sigterm_saves_and_exits_cleanly(data_dir, straight, tmp_path):
  workdir = str(tmp_path / 'run')
  code, out = _interrupted_run(data_dir, workdir, signal.SIGTERM)
  assert code == 0, out
  assert 'SIGTERM received' in out and 'child finished' in out
  # Saved at the step it was in when the signal came, not only at the periodic N.
  assert str(N + 1) in os.listdir(os.path.join(workdir, 'checkpoints'))
  summary = train_and_evaluate(make_config(data_dir), workdir)   # resumes from step N + 1
  assert summary['steps'] == 2 * N
  assert _losses(workdir) == straight
