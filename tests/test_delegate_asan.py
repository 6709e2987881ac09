"""Runs the delegate tests again against the ASan + UBSan build of the .so.

Python itself is not instrumented, so the sanitizer runtime is preloaded into
a child pytest process; any sanitizer report aborts it and fails this test.
"""

import os
import subprocess
import sys

import pytest

from export import delegate as dl

pytestmark = pytest.mark.slow   # a sanitizer build and the delegate tests again under it

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gcc_lib(name):
  try:
    path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return path if os.path.isabs(path) and os.path.exists(path) else None


def _libasan():
  return _gcc_lib("libasan.so")


@pytest.mark.skipif(_libasan() is None, reason="libasan not available")
def test_delegate_under_asan_ubsan():
  dl.library_path("asan")  # build in this process, so a build error shows plainly
  # libstdc++ is preloaded too: otherwise ASan cannot find the real
  # __cxa_throw when the runtime's pybind11 layer throws (refusal tests).
  preload = " ".join(p for p in (_libasan(), _gcc_lib("libstdc++.so")) if p)
  env = dict(os.environ, LD_PRELOAD=preload, MOBILEMOE_DELEGATE_VARIANT="asan",
             MOBILEMOE_FUZZ_CASES="10",
             ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
             UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
  tests = ["tests/test_delegate_fuzz.py", "tests/test_delegate.py", "tests/test_delegate_attention.py",
           "tests/test_delegate_fc.py", "tests/test_delegate_tiles.py"]
  select = ("fuzz or matches_reference or matches_xnnpack or claimed or refused or garbage or "
            "resize or sanitized")
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p",
                      "no:cacheprovider", *tests, "-k", select],
                     cwd=_REPO, env=env, capture_output=True, text=True, timeout=600)
  out = r.stdout + r.stderr
  assert r.returncode == 0, out[-4000:]
  assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-4000:]
