"""python -m mobilemoe_jax.convert import SNAPSHOT_DIR OUT_DIR
   python -m mobilemoe_jax.convert export CHECKPOINT OUT_DIR [--format qat|bf16]

import: a released MobileMoE snapshot (config.json, model.safetensors, tokenizer files) ->
  OUT_DIR/checkpoints/0 (train.init_from, python -m mobilemoe_jax.eval, python -m export read
  it) and OUT_DIR/release/ (the snapshot's config.json and side files).
export: a checkpoint (`<workdir>/checkpoints[/<step>]`) -> a `mobilemoe` snapshot dir. The
  format defaults to qat for a QAT checkpoint (its exact integers), else bf16; --format qat
  on a float checkpoint quantizes it post-training on the release grid.
"""
import argparse
import sys

from mobilemoe_jax.convert import snapshot
from mobilemoe_jax.convert.safetensors_file import FormatError


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m mobilemoe_jax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='released snapshot -> our checkpoint')
  imp.add_argument('snapshot')
  imp.add_argument('out')
  exp = sub.add_parser('export', help='our checkpoint -> released snapshot layout')
  exp.add_argument('checkpoint')
  exp.add_argument('out')
  exp.add_argument('--format', choices=('qat', 'bf16'), default=None)
  args = p.parse_args(argv)
  try:
    if args.command == 'import':
      snapshot.import_snapshot(args.snapshot, args.out)
    else:
      snapshot.export_checkpoint(args.checkpoint, args.out, args.format)
  except (FormatError, ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
