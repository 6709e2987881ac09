"""Workdir paths: a local directory or a cloud bucket (`gs://BUCKET/RUN`), through etils.epath.

etils comes with orbax-checkpoint. Writing to `gs://` also needs gcsfs (or TensorFlow)
installed; the launch scripts install it on TPU VMs.
"""
import os

from etils import epath

# URI schemes a workdir may use; everything else with '://' is refused up front, so a typo
# ('gcs://...') fails with the path named instead of a KeyError deep inside a write.
SCHEMES = ('gs', 's3')


def as_path(path) -> epath.Path:
  """`path` as an epath.Path: local paths made absolute, `gs://` and `s3://` URIs kept."""
  text = os.fspath(path)
  if '://' in text:
    scheme = text.split('://', 1)[0]
    if scheme not in SCHEMES:
      raise ValueError(f'workdir/checkpoint path {text!r}: unsupported scheme {scheme + "://"!r} '
                       f'(use a local path or one of {", ".join(s + "://" for s in SCHEMES)})')
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))
