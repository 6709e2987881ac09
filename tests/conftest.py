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
def bench_script():
  """bench_script('ondevice'): a bench/ script loaded as a module (bench/ is no package)."""
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, 'bench', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
  return load
