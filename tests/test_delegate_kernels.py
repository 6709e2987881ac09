"""The SIMD INT4 kernels against the scalar ones, outside LiteRT: natively
(AVX-512 VNNI here) and, when a cross compiler and qemu are installed, the
arm64 NEON (sdot) build run under qemu-aarch64."""

import os
import shutil
import subprocess

import pytest

from export import delegate as dl
from tests.support.delegate import copy_sources

pytestmark = pytest.mark.slow   # separate native and arm64 builds of the kernels

SRC = os.path.dirname(dl.__file__)


def _build_check(cxx, simd, defines, out, extra=()):
  """simd: {source file: its flags}; defines: the MM_HAVE_* macros."""
  objs = []
  for src, flags in simd.items():
    objs.append(f"{out}.{src}.o")
    subprocess.run([cxx, "-std=c++17", "-O2", "-I", SRC, *flags, "-c",
                    os.path.join(SRC, "kernels", src), "-o", objs[-1]], check=True,
                   capture_output=True)
  subprocess.run([cxx, "-std=c++17", "-O2", "-I", SRC, *defines,
                  os.path.join(SRC, "tools", "kernel_check.cc"),
                  os.path.join(SRC, "kernels", "kernels.cc"), *objs, "-o", out, *extra],
                 check=True, capture_output=True)


def test_native_simd_matches_scalar(tmp_path):
  if os.uname().machine != "x86_64":
    pytest.skip("native check is written for the x86-64 build")
  exe = str(tmp_path / "kcheck")
  _build_check("g++", {
      "kernels_avx512.cc": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
      "kernels_avx2.cc": ["-mavx2", "-mfma"],
      "kernels_amx.cc": ["-mavx512f", "-mavx512bw", "-mamx-tile", "-mamx-int8"]},
      ["-DMM_HAVE_AVX512", "-DMM_HAVE_AVX2", "-DMM_HAVE_AMX"], exe)
  r = subprocess.run([exe], capture_output=True, text=True)
  if r.returncode == 2:
    pytest.skip("CPU without AVX2")
  assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
  # each x86 family checked where the CPU has it (AVX2 also forced on AVX-512 CPUs; the
  # AMX run also compares its bits with the AVX-512 kernels')
  flags = open("/proc/cpuinfo").read()
  if "avx512_vnni" in flags:
    assert "ok avx512-vnni" in r.stdout and "ok avx2" in r.stdout, r.stdout
  if "amx_int8" in flags:
    assert "ok avx512-amx" in r.stdout, r.stdout


def _require_arm(require):
  require(shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64"),
          "g++-aarch64-linux-gnu and qemu-user")


def test_arm64_neon_matches_scalar_under_qemu(tmp_path, require):
  _require_arm(require)
  exe = str(tmp_path / "kcheck_arm")
  _build_check("aarch64-linux-gnu-g++", {"kernels_neon.cc": ["-march=armv8.2-a+dotprod"]},
               ["-DMM_HAVE_NEON_DOT"], exe, extra=["-static"])
  r = subprocess.run(["qemu-aarch64", "-cpu", "max", exe], capture_output=True, text=True)
  assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
  # a core without the dot-product extension must not take the NEON path
  r = subprocess.run(["qemu-aarch64", "-cpu", "cortex-a53", exe], capture_output=True, text=True)
  assert r.returncode == 2, r.stdout + r.stderr


def test_arm64_delegate_cross_builds(tmp_path, require):
  _require_arm(require)
  copy_sources(tmp_path)
  subprocess.run(["make", "-C", str(tmp_path), "CXX=aarch64-linux-gnu-g++"], check=True,
                 capture_output=True)
  out = subprocess.run(["file", str(tmp_path / "libmobilemoe_delegate.so")],
                       capture_output=True, text=True).stdout
  assert "aarch64" in out
