"""Every Python file of the project resolves its names: pyflakes' undefined-name check over
the library, configs, export, bench and tests. Bench scripts and CLIs have main
paths that the unit tests do not run end to end (a missing import there fails only when a
user runs the script)."""
import pathlib

import pytest
from pyflakes import api, messages, reporter

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = ('mobilemoe_jax', 'configs', 'export', 'bench', 'tests')
BROKEN = (messages.UndefinedName, messages.UndefinedExport, messages.UndefinedLocal)


class _Collect(reporter.Reporter):
  def __init__(self):
    super().__init__(None, None)
    self.found = []

  def flake(self, message):
    if isinstance(message, BROKEN):
      self.found.append(str(message))

  def syntaxError(self, filename, msg, lineno, offset, text):
    self.found.append(f'{filename}:{lineno}: syntax error: {msg}')

  def unexpectedError(self, filename, msg):
    self.found.append(f'{filename}: {msg}')


def _files():
  return sorted(p for f in FOLDERS for p in (ROOT / f).rglob('*.py')
                if '.venv' not in p.parts and 'node_modules' not in p.parts)


def test_the_check_sees_a_missing_import(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('import jax.numpy as jnp\n\ndef f(x):\n  return jax.device_get(jnp.asarray(x))\n')
  out = _Collect()
  api.checkPath(str(bad), out)
  assert any("undefined name 'jax'" in m for m in out.found), out.found


@pytest.mark.parametrize('folder', FOLDERS)
def test_no_undefined_names(folder):
  out = _Collect()
  files = [p for p in _files() if p.relative_to(ROOT).parts[0] == folder]
  assert files, folder
  for path in files:
    api.checkPath(str(path), out)
  assert not out.found, '\n'.join(out.found)
