"""Where training metrics go: TensorBoard event files, a JSONL log, and MFU.

TensorBoard events are written with the `tensorboard` package's own event writer and
protos, so logging needs neither TensorFlow nor tensorboardX. Only process 0 writes.
The workdir may be local or `gs://` (paths.as_path); the event writer reaches buckets
through fsspec (gcsfs).
"""
import json
import time

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from mobilemoe_jax.train import paths

# Dense bf16 peak FLOP/s per chip (vendor datasheets). Unknown kinds (CPU) get no MFU.
PEAK_FLOPS = {
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'TPU v5 lite': 197e12,     # v5e
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,     # v6e (Trillium)
    'TPU v6e': 918e12,
}


def peak_flops(device=None) -> float | None:
  """Peak FLOP/s of one device, or None when unknown (then MFU is reported as n/a)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops
  return None


class Writer:
  """Scalars and histograms to TensorBoard events in `<workdir>/tensorboard/`, scalars also to
  `<workdir>/metrics.jsonl` (one line per log step, {"step": s, name: value, ...}; a resumed
  run adds lines, later lines win)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    workdir = paths.as_path(workdir)
    (workdir / 'tensorboard').mkdir(parents=True, exist_ok=True)
    self._events = EventFileWriter(str(workdir / 'tensorboard'))
    # Buckets cannot append to an object, so the log is kept here and rewritten whole (it is
    # one short line per log step); write-then-rename keeps a local file whole on a crash.
    self._jsonl = workdir / 'metrics.jsonl'
    self._lines = self._jsonl.read_text().splitlines(keepends=True) if self._jsonl.exists() else []

  def write(self, step: int, scalars: dict, histograms: dict | None = None):
    if not self.enabled:
      return
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    for tag, data in (histograms or {}).items():
      values.append(summary_pb2.Summary.Value(tag=tag, histo=_histogram(np.asarray(data))))
    self._events.add_event(event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))
    self._lines.append(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
    tmp = self._jsonl.parent / (self._jsonl.name + '.tmp')
    tmp.write_text(''.join(self._lines))
    tmp.replace(self._jsonl)

  def close(self):
    if self.enabled:
      self._events.close()


def _histogram(x: np.ndarray, bins: int = 30) -> summary_pb2.HistogramProto:
  x = x.astype(np.float64).ravel()
  counts, edges = np.histogram(x, bins=bins)
  return summary_pb2.HistogramProto(
      min=float(x.min()), max=float(x.max()), num=x.size, sum=float(x.sum()),
      sum_squares=float((x * x).sum()), bucket_limit=edges[1:].tolist(), bucket=counts.tolist())


def read_jsonl(path: str) -> dict[int, dict]:
  """metrics.jsonl -> {step: {name: value}}; a value logged twice (a resumed run) keeps the last."""
  out = {}
  for line in paths.as_path(path).read_text().splitlines():
    row = json.loads(line)
    out.setdefault(row.pop('step'), {}).update(row)
  return out
