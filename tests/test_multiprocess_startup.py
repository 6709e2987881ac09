"""distributed.initialize(): where the process group settings come from, and the errors
for incomplete ones (checked before anything is started)."""
import pytest

from mobilemoe_jax import distributed

ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'TPU_WORKER_HOSTNAMES')


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
  for key in ENV:
    monkeypatch.delenv(key, raising=False)


def test_arguments_win_over_env(monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'env-host:1')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert distributed.explicit_settings() == ('env-host:1', 4, 3)
  assert distributed.explicit_settings('arg-host:2', 2, 0) == ('arg-host:2', 2, 0)


def test_nothing_set_off_tpu_is_one_process():
  assert distributed.explicit_settings() == (None, None, None)
  assert not distributed.on_cloud_tpu()
  assert distributed.initialize() is False


def test_one_process_is_not_a_group():
  assert distributed.initialize('localhost:1', 1, 0) is False


def test_gke_tpu_env_counts_as_tpu(monkeypatch):
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'pod-0,pod-1')
  assert distributed.on_cloud_tpu()


@pytest.mark.parametrize('env, message', [
    ({'JAX_NUM_PROCESSES': '2'}, 'needs all of --coordinator_address, --num_processes and --process_id'),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_PROCESS_ID': '0'}, 'num_processes=None'),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2'},
     r'process_id 2 not in \[0, num_processes=2\)'),
])
def test_incomplete_or_wrong_settings_fail_clearly(monkeypatch, env, message):
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  with pytest.raises(ValueError, match=message):
    distributed.initialize()
