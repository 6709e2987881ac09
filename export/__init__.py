"""Export: Flax -> PyTorch / Hugging Face / LiteRT, and the MobileMoeBlock delegate."""
import contextlib


@contextlib.contextmanager
def keep_jax_x64(inside=None):
  """Restores JAX's `jax_enable_x64` on exit (and sets it to `inside` meanwhile, if given).

  litert_torch turns it on for the whole process when its lowerings are imported, and its
  conversion needs it on (its JAX bridge lowers some ops with 64-bit indices). A process that
  also trains or evaluates with JAX (the pipeline, the test suite) would otherwise silently
  switch to 64-bit and stop reproducing its own losses, so every litert_torch import and
  conversion here runs inside this.
  """
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
