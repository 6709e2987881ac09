"""Run lm_eval on a backend, and write the results as JSON and a markdown table.

  from mobilemoe_jax.eval.run import run_local_eval
  summary = run_local_eval(model, tokenizer)     # the pipeline's last step: the local cloze task
"""
import copy
import json
import logging
import pathlib

from mobilemoe_jax.eval import tasks as tasks_lib


def evaluate(lm, specs, *, include=(), limit: int | None = None,
             log_samples: bool = False) -> dict:
  """lm_eval's simple_evaluate, offline, with fixed seeds.
  specs: task names or {'task': name, overrides}; include: directories of extra task YAMLs.
  lm_eval's own task index (seconds to build) is read only when a spec is not from `include`."""
  tasks_lib.go_offline()
  from lm_eval import evaluator
  from lm_eval.tasks import TaskManager

  specs = copy.deepcopy(list(specs))   # lm_eval pops keys out of config dicts
  local = {p.stem for d in include for p in pathlib.Path(d).glob('*.yaml')}
  builtin = any((s['task'] if isinstance(s, dict) else s) not in local for s in specs)
  manager = TaskManager(include_path=list(include) or None, include_defaults=builtin)
  try:
    return evaluator.simple_evaluate(
        model=lm, tasks=specs, limit=limit or None, log_samples=log_samples,
        task_manager=manager, bootstrap_iters=1000,
        torch_random_seed=None)  # None: lm_eval would import torch only to seed it
  except (ConnectionError, FileNotFoundError, ValueError) as e:
    # Offline, `datasets` fails this way when a mirror or cache entry exists but lacks a
    # config or split the task reads (e.g. a partial copy).
    if isinstance(e, ValueError) and not any(k in str(e) for k in ('BuilderConfig', 'split')):
      raise
    raise tasks_lib.DatasetMissingError(
        f'a task could not read its data offline ({type(e).__name__}: {e}). The local mirror '
        'or HF cache entry is incomplete; see mobilemoe_jax/eval/tasks.py for the layout.') from e


def summarize(results: dict, metrics: dict[str, str] | None = None) -> list[dict]:
  """One row per task and metric: {task, shots, metric, value, stderr, n}.
  metrics: task -> 'metric,filter' to report only that one (the suite's choice)."""
  rows = []
  n_samples = results.get('n-samples', {})
  for task, res in results['results'].items():
    for key, value in res.items():
      if ',' not in key or key.split(',')[0].endswith('_stderr') or not isinstance(value, float):
        continue
      if metrics and task in metrics and key != metrics[task]:
        continue
      name, flt = key.split(',', 1)
      stderr = res.get(f'{name}_stderr,{flt}')
      rows.append(dict(task=task, shots=results.get('n-shot', {}).get(task),
                       metric=key, value=value,
                       stderr=stderr if isinstance(stderr, float) else None,
                       n=n_samples.get(task, {}).get('effective')))
  return rows


def markdown_table(rows: list[dict]) -> str:
  lines = ['| Task | Shots | Metric | Value | ± | N |', '|---|---:|---|---:|---:|---:|']
  for r in rows:
    stderr = '' if r['stderr'] is None else f"{r['stderr']:.4f}"
    shots = '' if r['shots'] is None else r['shots']
    n = '' if r['n'] is None else r['n']
    lines.append(f"| {r['task']} | {shots} | {r['metric']} | {r['value']:.4f} | {stderr} | {n} |")
  return '\n'.join(lines) + '\n'


def write_reports(results: dict, out_dir, metrics=None, info: dict | None = None) -> dict:
  """Writes results.json (lm_eval's results + our rows) and results.md; returns the paths."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rows = summarize(results, metrics)
  keep = {k: results[k] for k in ('results', 'groups', 'n-shot', 'n-samples', 'versions',
                                  'higher_is_better') if k in results}
  payload = dict(info or {}, summary=rows, lm_eval=keep)
  json_path, md_path = out / 'results.json', out / 'results.md'
  json_path.write_text(json.dumps(payload, indent=2, default=str) + '\n')
  header = ''.join(f'- {k}: {v}\n' for k, v in (info or {}).items())
  md_path.write_text(header + ('\n' if header else '') + markdown_table(rows))
  return {'json': str(json_path), 'markdown': str(md_path)}


def run_local_eval(model, tokenizer, out_dir=None, batch_size: int = 8) -> dict:
  """The pipeline's closing step: the bundled `pydoc_cloze` task on an in-memory model.

  Returns {'task', 'acc', 'acc_norm', 'n', 'chance'} (and writes results.json/.md to
  out_dir when given). 24 examples, three endings each: a trained demo model should beat 1/3.
  With several devices the model's parameters are placed on a data-parallel mesh (replicated).
  """
  from mobilemoe_jax.eval.jax_lm import JaxLM

  lm = JaxLM(model, tokenizer, batch_size=batch_size)
  spec, include = tasks_lib.local_task()
  results = evaluate(lm, [spec], include=[include])
  res = results['results']['pydoc_cloze']
  summary = dict(task='pydoc_cloze', acc=res['acc,none'], acc_norm=res['acc_norm,none'],
                 n=results['n-samples']['pydoc_cloze']['effective'], chance=1 / 3)
  if out_dir is not None:
    summary['files'] = write_reports(results, out_dir, info={'model': 'in-memory (pipeline)'})
  logging.info('local eval: %s', summary)
  return summary
