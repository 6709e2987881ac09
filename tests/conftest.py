"""Test setup and the fixtures several test files share. Plain helpers: tests/support/.

8 fake CPU devices so sharding and expert parallelism are tested for real (set before jax is
imported anywhere)."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compiling dominates the training tests. XLA's on-disk cache lets the processes of one run
# (both pytest workers, the resume / multi-process / CLI subprocesses, which inherit these
# variables) compile a step once, and makes reruns faster. It lives in the checkout
# (git-ignored), so a fresh clone starts cold.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.environ.get(
    'MOBILEMOE_TEST_XLA_CACHE',
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.cache', 'jax')))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


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


# Text a synthetic Llama-3-style tokenizer learns its merges from (ids below 1000).
LLAMA3_TRAIN_TEXTS = [
    'Name one JVM language. Kotlin, Scala and Clojure run on the JVM.',
    'Hello, MobileMoE! The user asks; the assistant answers.',
    'Three newlines\n\n\nmerge into one token,\n\n\nso a header\'s "\\n\\n" can merge with content.',
]


@pytest.fixture(scope='session')
def llama3_tokenizer_dir(tmp_path_factory):
  """A directory laid out like a released MobileMoE snapshot's tokenizer files
  (tokenizer.json + tokenizer_config.json with the Jinja chat template): a small byte-level BPE
  with the Llama-3 pre-tokenizer and the special tokens at their real ids."""
  import inspect
  import json
  import os as os_mod
  from mobilemoe_jax.data import tokenizer as tokenizer_lib
  texts = [inspect.getdoc(m) for m in (json, os_mod, inspect)] + LLAMA3_TRAIN_TEXTS * 4
  return tokenizer_lib.train_llama3_style_bpe(texts, str(tmp_path_factory.mktemp('llama3_tok')))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The bundled corpus, small: ArrayRecord shards, a 512-piece SentencePiece tokenizer and
  the SFT chat JSONL (mobilemoe_jax.data.build)."""
  from mobilemoe_jax.data import build
  out = str(tmp_path_factory.mktemp('data'))
  build.build(out, max_bytes=200_000, vocab_size=512, progress=False)
  return out


@pytest.fixture(scope='session')
def spm_tokenizer(tmp_path_factory):
  """A 512-piece SentencePiece tokenizer (the demo's kind), trained in a second."""
  from tests.support.eval import make_tokenizer
  return make_tokenizer(tmp_path_factory.mktemp('spm'))


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


@pytest.fixture
def require():
  """require(ok, what): a test that needs a tool skips without it, except in CI (.ci/run sets
  CI, and installs every tool these tests need), where a missing tool fails the test."""
  def check(ok, what):
    if not ok:
      (pytest.fail if os.environ.get('CI') else pytest.skip)(f'needs {what}')
  return check
