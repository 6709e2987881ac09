"""Which lm_eval tasks to run, and where their data comes from (never the network).

Two places hold benchmark data; each dataset repo named in configs/eval/suite.py must be in one:

1. A local mirror, `DATA_DIR/<hf repo id>/`, one snapshot of the dataset repo per directory:

     DATA_DIR/allenai/ai2_arc/          README.md, ARC-Easy/*.parquet, ARC-Challenge/...
     DATA_DIR/cais/mmlu/                README.md, abstract_algebra/*.parquet, ...

   DATA_DIR is --data_dir, else $MOBILEMOE_EVAL_DATA. Fill it on a machine with internet with
   `python -m mobilemoe_jax.eval.fetch --out DATA_DIR` (a `snapshot_download` of each repo),
   then copy the directory over. The task then reads `DATA_DIR/<repo>` instead of the hub.

2. The Hugging Face cache ($HF_HOME, default ~/.cache/huggingface), pre-populated by running
   the suite's task loading once with network: `python -m mobilemoe_jax.eval.fetch --hf_cache`
   on a machine with internet, then copy $HF_HOME (the `hub/datasets--ORG--NAME` and
   `datasets/ORG___NAME` directories) to the same place here.

Evaluation always runs with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, so a missing dataset
fails fast with `DatasetMissingError` saying where to put it, rather than trying to download.

Local tasks (a YAML next to its JSONL, e.g. tasks/pydoc_cloze.yaml) need neither: their
`data_files` are resolved relative to the YAML.
"""
import os
import pathlib

import yaml

TASKS_DIR = pathlib.Path(__file__).parent / 'tasks'
LOCAL_TASK = TASKS_DIR / 'pydoc_cloze.yaml'   # what the one-command pipeline runs


class DatasetMissingError(FileNotFoundError):
  """A task's data is neither in the local mirror nor in the HF cache."""


def go_offline():
  """Makes datasets / huggingface_hub fail instead of downloading (also if already imported)."""
  os.environ['HF_HUB_OFFLINE'] = '1'
  os.environ['HF_DATASETS_OFFLINE'] = '1'
  import huggingface_hub.constants
  huggingface_hub.constants.HF_HUB_OFFLINE = True
  import datasets.config
  datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def resolve_data_dir(data_dir: str | None) -> pathlib.Path | None:
  data_dir = data_dir or os.environ.get('MOBILEMOE_EVAL_DATA')
  return pathlib.Path(data_dir).expanduser().resolve() if data_dir else None


def hf_cache_dirs(repo: str) -> list[pathlib.Path]:
  """Where a pre-populated HF cache keeps `repo`: the hub snapshot and the datasets' Arrow files."""
  from huggingface_hub import constants
  hub = pathlib.Path(constants.HF_HUB_CACHE) / ('datasets--' + repo.replace('/', '--'))
  home = pathlib.Path(constants.HF_HOME)
  arrow = pathlib.Path(os.environ.get('HF_DATASETS_CACHE', home / 'datasets'))
  return [hub, arrow / repo.replace('/', '___')]


def locate(repo: str, data_dir: pathlib.Path | None) -> str | None:
  """'local' (use data_dir/repo), 'hf_cache', or None when the data is nowhere."""
  if data_dir is not None and (data_dir / repo).is_dir():
    return 'local'
  if any(d.is_dir() for d in hf_cache_dirs(repo)):
    return 'hf_cache'
  return None


def missing_message(task: str, repos: list[str], data_dir: pathlib.Path | None) -> str:
  where = data_dir if data_dir is not None else 'DATA_DIR'
  lines = [f"No data for task {task!r}: dataset repo(s) {', '.join(repos)} not found.",
           'Put each one in ONE of:']
  for repo in repos:
    lines.append(f'  - {where}/{repo}/   (a snapshot of the HF dataset repo {repo})')
  if data_dir is None:
    lines.append('    where DATA_DIR is --data_dir or $MOBILEMOE_EVAL_DATA (neither is set)')
  lines.append(f'  - the HF cache: {" or ".join(str(d) for d in hf_cache_dirs(repos[0]))}')
  lines.append('To fill either on a machine with internet: `python -m mobilemoe_jax.eval.fetch '
               '--out DIR` (local mirror) or `... --hf_cache` (HF cache), then copy it here. '
               'Nothing downloads during evaluation.')
  return '\n'.join(lines)


def suite_specs(suite_tasks, names, data_dir: pathlib.Path | None):
  """lm_eval task specs for the chosen suite entries; raises DatasetMissingError first.

  suite_tasks: the `tasks` list of configs/eval/suite.py; names: the subset to run.
  Each spec is {'task': name, overrides}: lm_eval merges it over the registered YAML (prompt,
  metrics), so only `num_fewshot` and, for a local mirror, `dataset_path` change.
  """
  by_name = {t['name']: t for t in suite_tasks}
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise KeyError(f'tasks {unknown} are not in the suite; known: {sorted(by_name)}')
  specs, problems = [], []
  for name in names:
    t = by_name[name]
    found = {repo: locate(repo, data_dir) for repo in t['repos']}
    missing = [r for r, where in found.items() if where is None]
    if missing:
      problems.append(missing_message(name, missing, data_dir))
      continue
    spec = {'task': name, 'num_fewshot': t['shots']}
    if found[t['repos'][0]] == 'local':
      spec['dataset_path'] = str(data_dir / t['repos'][0])
    specs.append(spec)
  if problems:
    raise DatasetMissingError('\n\n'.join(problems))
  return specs


def local_task(yaml_path=LOCAL_TASK) -> tuple[dict, str]:
  """A self-contained task (YAML + JSONL beside it) -> (lm_eval spec, directory to index).

  The spec overrides `data_files` with absolute paths, so the YAML stays relative and the
  task runs from any working directory; pass the directory to `run.evaluate(include=...)`.
  """
  yaml_path = pathlib.Path(yaml_path).resolve()
  with open(yaml_path) as f:
    cfg = yaml.safe_load(f)
  kwargs = dict(cfg.get('dataset_kwargs') or {})
  files = dict(kwargs.get('data_files') or {})
  for split, name in files.items():
    path = yaml_path.parent / name
    if not path.is_file():
      raise DatasetMissingError(f'task {cfg["task"]!r}: data file {path} not found '
                                f'(data_files.{split} in {yaml_path} is relative to the YAML)')
    files[split] = str(path)
  spec = {'task': cfg['task'], 'dataset_kwargs': dict(kwargs, data_files=files)}
  return spec, str(yaml_path.parent)
