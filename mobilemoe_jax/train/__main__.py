"""Trains one stage: parses flags and calls `train_and_evaluate(config, workdir)`.

  python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:tiny --workdir=runs/pretrain \
      [--config.train.steps=100 ...]

Exit codes: 0 finished or preempted (SIGTERM: saved, resumable by rerunning the command),
1 stopped on a non-finite loss or gradient.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mobilemoe_jax import distributed  # defines --coordinator_address/--num_processes/--process_id

flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard logs.', required=True)
config_flags.DEFINE_config_file('config', None, 'A stage config file[:arg].', lock_config=True)


def main(argv):
  del argv
  distributed.initialize()  # multi-host: before anything touches a JAX backend
  # Orbax logs every file it writes at INFO; keep the console for progress and results.
  logging.set_verbosity(logging.WARNING)
  from mobilemoe_jax.train import NonFiniteError, train_and_evaluate
  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except NonFiniteError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
