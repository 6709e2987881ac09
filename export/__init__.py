"""Export: Flax -> PyTorch / Hugging Face / LiteRT, and the MobileMoeBlock delegate."""
import contextlib
import functools


@contextlib.contextmanager
def keep_jax_x64(inside=None):
  """Restores JAX's `jax_enable_x64` on exit (and sets it to `inside` meanwhile, if given).

  litert_torch turns it on for the whole process when its lowerings are imported, and its
  conversion needs it on (its JAX bridge lowers some ops with 64-bit indices). A process that
  also trains or evaluates with JAX (the pipeline, the test suite) would otherwise silently
  switch to 64-bit and stop reproducing its own losses, so every litert_torch import and
  conversion here runs inside this. (That makes it the place to drop the known-harmless
  messages of litert_torch's imports too: quiet_known_noise.)
  """
  quiet_known_noise()
  import jax
  previous = jax.config.jax_enable_x64
  if inside is not None:
    jax.config.update('jax_enable_x64', inside)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', previous)


def import_litert_torch():
  """`import litert_torch` without its side effect on JAX (see keep_jax_x64)."""
  with keep_jax_x64():
    import litert_torch
  return litert_torch


# (logger, text in the message) of known-harmless log lines litert_torch's imports print.
_HARMLESS_LOGS = (
    ('torchao', '/_C_mxfp8.'),                    # 'Failed to load' CUDA-only kernels: this
    ('torchao', '/_C_cutlass_'),                  # torch is a CPU build
    ('torchao.kernel.intmm', 'Detected no triton'),  # Triton (GPU) kernels: unused here
    ('torch.utils._pytree', 'is an Enum subclass'),  # torchao registers an enum the old way
)


@functools.cache
def quiet_known_noise():
  """Drops litert_torch's step-by-step progress and the known-harmless warnings of its
  dependencies, each matched by its logger or category and its text, so that any other
  warning still shows. Runs before litert_torch is first imported (the logged ones are
  printed at import)."""
  import logging
  import os
  import warnings
  # litert_torch's own progress: ~20 lines per signature, under the export's one-line log of
  # the same step. LITERT_TORCH_SHOW_PROGRESS=y brings it back.
  os.environ.setdefault('LITERT_TORCH_SHOW_PROGRESS', 'n')
  for logger, text in _HARMLESS_LOGS:
    logging.getLogger(logger).addFilter(lambda record, text=text: text not in record.getMessage())
  # torch.export deep-copies tree specs the deprecated way inside litert_torch's conversion.
  warnings.filterwarnings('ignore', message=r'`isinstance\(treespec, LeafSpec\)` is deprecated',
                          category=FutureWarning)
