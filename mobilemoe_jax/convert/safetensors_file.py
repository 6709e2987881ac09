"""A safetensors file read defensively and written deterministically.

Reading parses the header ourselves (8-byte little-endian length, JSON, data), so every
problem of a damaged or hostile file is an error naming the file and the tensor: a header
longer than the file, bad JSON, an unknown dtype, offsets that do not match the shape,
overlap or run past the end (a truncated file). Arrays are read lazily, one at a time.

Writing goes through the `safetensors` library (its canonical header: `__metadata__` first,
tensors ordered by dtype size then name, compact JSON padded to 8 bytes), so the same
tensors and metadata always give the same bytes, as the files the release was written with.
"""
import json
import math
import mmap
import os

import ml_dtypes
import numpy as np

DTYPES = {'U8': np.dtype(np.uint8), 'I8': np.dtype(np.int8), 'F16': np.dtype(np.float16),
          'BF16': np.dtype(ml_dtypes.bfloat16), 'F32': np.dtype(np.float32),
          'I32': np.dtype(np.int32), 'I64': np.dtype(np.int64), 'F64': np.dtype(np.float64)}
MAX_HEADER = 100 * 2 ** 20     # the safetensors library's own limit


class FormatError(ValueError):
  """A file or tensor that does not follow the expected format; the message names it."""


def dtype_name(dtype) -> str:
  for name, d in DTYPES.items():
    if d == np.dtype(dtype):
      return name
  raise FormatError(f'no safetensors dtype for {np.dtype(dtype)}')


class File:
  """An open safetensors file: `.entries` {name: (dtype name, shape)} in file order,
  `.metadata` (the `__metadata__` dict or None), `.read(name)` -> np.ndarray."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise FormatError(f'{path}: no such file')
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      head = f.read(8)
      if len(head) < 8:
        raise FormatError(f'{path}: {size} bytes, too short for a safetensors header')
      n = int.from_bytes(head, 'little')
      if n > min(MAX_HEADER, size - 8):
        raise FormatError(f'{path}: header length {n} runs past the end of the file ({size} bytes)')
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f'{path}: the header is not valid JSON ({e})') from None
    if not isinstance(header, dict):
      raise FormatError(f'{path}: the header is not a JSON object')
    self.metadata = header.pop('__metadata__', None)
    if self.metadata is not None and not (isinstance(self.metadata, dict) and all(
        isinstance(v, str) for v in self.metadata.values())):
      raise FormatError(f'{path}: __metadata__ must map strings to strings')
    self._start, data_len = 8 + n, size - 8 - n
    self.entries, self._offsets = {}, {}
    spans = []
    for name, e in header.items():
      where = f'{path}: tensor {name}'
      if not (isinstance(e, dict) and set(e) >= {'dtype', 'shape', 'data_offsets'}):
        raise FormatError(f'{where}: entry must have dtype, shape and data_offsets, got {e!r}')
      if not isinstance(e['dtype'], str) or e['dtype'] not in DTYPES:
        raise FormatError(f'{where}: unknown dtype {e["dtype"]!r}')
      shape, offs = e['shape'], e['data_offsets']
      if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise FormatError(f'{where}: bad shape {shape!r}')
      if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
              and 0 <= offs[0] <= offs[1]):
        raise FormatError(f'{where}: bad data_offsets {offs!r}')
      nbytes = math.prod(shape) * DTYPES[e['dtype']].itemsize     # Python ints: no overflow
      if offs[1] - offs[0] != nbytes:
        raise FormatError(f'{where}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, '
                          f'{e["dtype"]} {shape} needs {nbytes}')
      if offs[1] > data_len:
        raise FormatError(f'{where}: data ends at byte {offs[1]} but the file holds only '
                          f'{data_len} data bytes (truncated?)')
      self.entries[name] = (e['dtype'], tuple(shape))
      self._offsets[name] = tuple(offs)
      spans.append((offs[0], offs[1], name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
      if start < end:
        raise FormatError(f'{path}: tensors {a} and {b} overlap')

  def read(self, name: str) -> np.ndarray:
    dtype, shape = self.entries[name]
    start, end = self._offsets[name]
    with open(self.path, 'rb') as f:
      if end == start:
        return np.zeros(shape, DTYPES[dtype])
      with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        raw = m[self._start + start:self._start + end]
    return np.frombuffer(raw, DTYPES[dtype]).reshape(shape).copy()


def write(path: str, tensors: dict, metadata: dict | None = None):
  """{name: np.ndarray} (+ string metadata) -> path, in the library's canonical layout."""
  from safetensors.numpy import save_file
  save_file({n: np.ascontiguousarray(a) for n, a in tensors.items()}, path, metadata=metadata)
