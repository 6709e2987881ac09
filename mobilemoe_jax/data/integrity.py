"""Data integrity: the error every bad data file raises, and the build's checksums.

The build writes a `SHA256SUMS` file (the `sha256sum` format, so `sha256sum -c SHA256SUMS`
checks it too) into each directory it fills. Whenever the pipeline opens a data file, it
checks the file against the SHA256SUMS beside it, if that lists it: a damaged or truncated
shard fails when the run starts, naming the file, instead of hours later at the bad record.
Files with no SHA256SUMS entry (data not made by the build) are not checked.
"""
import hashlib
import os

SUMS = "SHA256SUMS"


class DataError(ValueError):
  """A data file or record that cannot be used; the message names the file and record/line."""


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      h.update(block)
  return h.hexdigest()


def write_sums(directory: str, names: list[str] | None = None):
  """Writes `<directory>/SHA256SUMS` for `names` (default: every file in it)."""
  if names is None:
    names = sorted(n for n in os.listdir(directory)
                   if n != SUMS and os.path.isfile(os.path.join(directory, n)))
  lines = [f"{sha256(os.path.join(directory, n))}  {n}\n" for n in names]
  tmp = os.path.join(directory, SUMS + ".tmp")
  with open(tmp, "w") as f:
    f.writelines(lines)
  os.replace(tmp, os.path.join(directory, SUMS))


def read_sums(directory: str) -> dict[str, str]:
  """{file name: sha256} from `<directory>/SHA256SUMS`; {} when there is none."""
  path = os.path.join(directory, SUMS)
  if not os.path.exists(path):
    return {}
  sums = {}
  with open(path) as f:
    for line in f:
      digest, _, name = line.rstrip("\n").partition("  ")
      sums[name] = digest
  return sums


_checked = {}  # (path, size, mtime) -> True: one hash per file and process


def check_file(path: str):
  """Raises DataError if `path` differs from its SHA256SUMS entry (no entry: no check)."""
  path = os.fspath(path)
  stat = os.stat(path)
  key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
  if key in _checked:
    return
  directory, name = os.path.split(path)
  want = read_sums(directory or ".").get(name)
  if want is not None and sha256(path) != want:
    raise DataError(
        f"{path}: sha256 differs from {os.path.join(directory, SUMS)} (damaged or changed "
        f"since the build); `python -m mobilemoe_jax.data.verify {directory}` lists the bad "
        "records, or rebuild the data")
  _checked[key] = True
