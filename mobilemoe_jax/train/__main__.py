"""Trains one stage: parses flags and calls `train_and_evaluate(config, workdir)`.

  python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:tiny --workdir=runs/pretrain \
      [--config.train.steps=100 ...]

Exit codes: 0 finished or preempted (SIGTERM: saved, resumable by rerunning the command),
1 stopped on a non-finite loss or gradient, 2 a bad config field, data file or checkpoint
(one `error:` line naming it).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mobilemoe_jax import config as config_lib
from mobilemoe_jax import distributed  # defines --coordinator_address/--num_processes/--process_id

flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard logs.', required=True)
config_flags.DEFINE_config_file('config', None, 'A stage config file[:arg].', lock_config=True)


def _fail(code: int, msg: str):
  print(f'error: {msg}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv):
  """absl's parsing, with an unknown `--config.a.b` override named in one line with the
  nearest field names (ml_collections raises an AttributeError deep in its parser)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    files = [a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')]
    if overrides and files:
      try:   # ml_collections applies overrides while it parses --config: load the file alone
        config = flags.FLAGS['config'].parser.parse(files[-1])
      except Exception:  # the file itself is bad: its own error below says so
        config = None
      for field in overrides if config is not None else ():
        if msg := config_lib.unknown_field(config, field):
          _fail(2, msg)
    _fail(2, str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)


def main(argv):
  del argv
  distributed.initialize()  # multi-host: before anything touches a JAX backend
  # Orbax logs every file it writes at INFO; keep the console for progress and results.
  logging.set_verbosity(logging.WARNING)
  from mobilemoe_jax.data.pipeline import DataError
  from mobilemoe_jax.train import CheckpointError, NonFiniteError, train_and_evaluate
  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except NonFiniteError as e:
    _fail(1, str(e))
  except (config_lib.ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
    _fail(2, str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
