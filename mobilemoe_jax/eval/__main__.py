"""Evaluate a checkpoint or an exported `.tflite` with lm-evaluation-harness.

  python -m mobilemoe_jax.eval --checkpoint=runs/sft/checkpoints --tasks=suite --out=runs/eval
  python -m mobilemoe_jax.eval --checkpoint=model.tflite --backend=tflite \
      --tokenizer=data/tokenizer/spm.model --tasks=local
  python -m mobilemoe_jax.eval --checkpoint=random --model_config=configs/tiny.py --tasks=local \
      --tokenizer=data/tokenizer/spm.model             # smoke test: chance-level by construction

--tasks: 'suite' (the 14 of configs/eval/suite.py), 'local' (the bundled pydoc_cloze task),
suite task names (arc_easy,mmlu,...) or paths to local task YAMLs, comma-separated.
Writes <out>/results.json and <out>/results.md. Benchmark data: see mobilemoe_jax/eval/tasks.py.
"""
import logging
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'Orbax checkpoint dir (jax), a .tflite (tflite), or "random" with '
    '--model_config.', required=True)
_TASKS = flags.DEFINE_list('tasks', ['local'], "'suite', 'local', suite task names, task YAMLs.")
_BACKEND = flags.DEFINE_enum('backend', 'jax', ['jax', 'tflite'], 'Which forward pass.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Tokenizer path (default: the checkpoint\'s).')
_OUT = flags.DEFINE_string('out', 'runs/eval', 'Directory for results.json and results.md.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Local dataset mirror (else suite.data_dir, '
                                '$MOBILEMOE_EVAL_DATA, then the HF cache).')
_LIMIT = flags.DEFINE_integer('limit', None, 'Examples per task (default: suite.limit; 0 = all).')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Rows per forward pass (jax backend).')
_SUITE = config_flags.DEFINE_config_file('suite', 'configs/eval/suite.py', 'The suite config.',
                                         lock_config=True)
_MODEL_CONFIG = config_flags.DEFINE_config_file('model_config', None,
                                                'Model config for --checkpoint=random.')


def make_lm(suite):
  """The backend named by the flags, ready for lm_eval."""
  batch = _BATCH.value or suite.batch_size
  if _BACKEND.value == 'tflite':
    from export.tflite_lm import TFLiteLM
    if not _TOKENIZER.value:
      raise app.UsageError('--backend=tflite needs --tokenizer (a .tflite has no tokenizer)')
    return TFLiteLM(_CHECKPOINT.value, _TOKENIZER.value, max_gen_toks=suite.max_gen_toks)
  from flax import nnx

  from mobilemoe_jax.eval.jax_lm import JaxLM
  from mobilemoe_jax.model import Transformer
  from mobilemoe_jax.train.loading import load_checkpoint
  if _CHECKPOINT.value == 'random':
    if _MODEL_CONFIG.value is None or not _TOKENIZER.value:
      raise app.UsageError('--checkpoint=random needs --model_config and --tokenizer')
    model, tok = Transformer(_MODEL_CONFIG.value.model, rngs=nnx.Rngs(0)), _TOKENIZER.value
  else:
    model, _, tok = load_checkpoint(_CHECKPOINT.value, _TOKENIZER.value)
  return JaxLM(model, tok, batch_size=batch, max_gen_toks=suite.max_gen_toks)


def task_specs(names, suite):
  """-> (lm_eval specs, extra task directories, {task: reported metric})."""
  from mobilemoe_jax.eval import tasks as tasks_lib
  specs, include, metrics, suite_names = [], [], {}, []
  for name in names:
    if name == 'suite':
      suite_names += [t['name'] for t in suite.tasks]
    elif name == 'local' or name.endswith(('.yaml', '.yml')):
      spec, where = tasks_lib.local_task(tasks_lib.LOCAL_TASK if name == 'local' else name)
      specs.append(spec)
      include.append(where)
    else:
      suite_names.append(name)
  if suite_names:
    data_dir = tasks_lib.resolve_data_dir(_DATA_DIR.value or suite.data_dir)
    specs += tasks_lib.suite_specs(suite.tasks, suite_names, data_dir)
    metrics = {t['name']: t['metric'] for t in suite.tasks}
  return specs, include, metrics


def main(argv):
  del argv
  from mobilemoe_jax.eval import run, tasks as tasks_lib
  suite = _SUITE.value
  try:
    specs, include, metrics = task_specs(_TASKS.value, suite)
  except tasks_lib.DatasetMissingError as e:
    sys.exit(f'error: {e}')   # before loading any model: the fix is to put data in place
  lm = make_lm(suite)
  limit = suite.limit if _LIMIT.value is None else _LIMIT.value
  results = run.evaluate(lm, specs, include=include, limit=limit)
  info = {'checkpoint': _CHECKPOINT.value, 'backend': _BACKEND.value,
          'tasks': ','.join(_TASKS.value), 'limit': limit or 'all'}
  if _CHECKPOINT.value == 'random':
    info['note'] = 'random init: scores are chance level by construction'
  paths = run.write_reports(results, _OUT.value, metrics, info)
  print(pathlib.Path(paths['markdown']).read_text())
  print(f"wrote {paths['json']} and {paths['markdown']}")


if __name__ == '__main__':
  logging.getLogger('lm-eval').setLevel(logging.WARNING)
  app.run(main)
