"""What every benchmark records beside its numbers: the command, date, commit and machine."""
import datetime
import os
import platform
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def gpu_models() -> list:
  """nvidia-smi's name, memory and driver per GPU; [] where there is none."""
  try:
    r = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                        '--format=csv,noheader'], capture_output=True, text=True, timeout=30)
    return [l.strip() for l in r.stdout.splitlines() if l.strip()]
  except Exception:  # noqa: BLE001  no driver, no binary
    return []


def commit():
  """MOBILEMOE_COMMIT where set (a copy of the tree: a device machine, or a folder inside
  another checkout), else the checkout's commit (+ '-dirty' with uncommitted changes to
  tracked files)."""
  if os.environ.get('MOBILEMOE_COMMIT'):
    return os.environ['MOBILEMOE_COMMIT']
  try:
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                           capture_output=True, text=True, timeout=30).stdout.strip()
    return head + ('-dirty' if dirty else '')
  except Exception:  # noqa: BLE001
    return None


def versions(packages=('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'transformers',
                       'ai-edge-litert')) -> dict:
  import importlib.metadata as md
  out = {'python': platform.python_version()}
  for k in packages:
    try:
      out[k] = md.version(k)
    except md.PackageNotFoundError:
      pass
  return out


def run_record(script: str, gpu: bool) -> dict:
  """The record of this invocation of `script` (a path under bench/)."""
  machine = {'cpu': cpu_model(), 'cpu_count': os.cpu_count(), 'loadavg_start': os.getloadavg()}
  if gpu:
    machine['gpus'] = gpu_models()
  return {'command': ' '.join(['python', script] + sys.argv[1:]),
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'commit': commit(), 'machine': machine, 'versions': versions()}


def read_results(path: str) -> dict:
  """A results file (bench/results/<name>.json), as `--table` prints it; a file that is not
  JSON is an error naming it (a missing one raises FileNotFoundError, which names it too)."""
  import json
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not a JSON results file ({e})') from None


def write_results(path: str, res: dict):
  """Stamps the run's end load on `res` (from run_record) and writes it as JSON to `path`."""
  import json
  res['machine']['loadavg_end'] = os.getloadavg()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(res, f, indent=2)
    f.write('\n')
