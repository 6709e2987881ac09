"""Test setup: 8 fake CPU devices so sharding and expert parallelism are tested for real.
Must run before jax is imported anywhere."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _jax_stays_32_bit():
  """litert_torch turns on jax_enable_x64 process-wide when some of its modules are imported
  (export/ guards the paths it controls with export.keep_jax_x64). Tests share worker
  processes, so a test that converts must not switch the next one (say, a bit-exact resume
  test) to 64-bit."""
  yield
  import jax
  jax.config.update('jax_enable_x64', False)


@pytest.fixture
def require():
  """require(ok, what): a test that needs a tool skips without it, except in CI (.ci/run sets
  CI, and installs every tool these tests need), where a missing tool fails the test."""
  def check(ok, what):
    if not ok:
      (pytest.fail if os.environ.get('CI') else pytest.skip)(f'needs {what}')
  return check
