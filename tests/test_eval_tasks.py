"""Where evaluation data comes from: the suite config, the local mirror, the HF cache, and the
clear error when a dataset is in neither. Runs lm_eval's own arc_easy task over a hand-written
mirror, so the documented layout is exercised for real (offline)."""
import json
import os
import subprocess
import sys

import pytest

from configs.eval import suite as suite_lib
from mobilemoe_jax.eval import fetch, run, tasks
from mobilemoe_jax.eval.base import TokenLM
from tests.support.eval import EVAL_DATA

MIRROR = EVAL_DATA / 'mirror'


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
  """Points every HF cache location at an empty directory."""
  import huggingface_hub.constants as c
  monkeypatch.setattr(c, 'HF_HUB_CACHE', str(tmp_path / 'hf' / 'hub'))
  monkeypatch.setattr(c, 'HF_HOME', str(tmp_path / 'hf'))
  monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'hf' / 'datasets'))
  monkeypatch.delenv('MOBILEMOE_EVAL_DATA', raising=False)
  return tmp_path / 'hf'


@pytest.fixture(scope='module')
def task_manager():
  from lm_eval.tasks import TaskManager
  return TaskManager()   # indexes the installed lm_eval's task YAMLs (a few seconds)


def _dataset_paths(manager, name: str) -> set[str]:
  """The HF dataset repos lm_eval's task (or group / tag, through its members) reads,
  from the installed YAMLs with their `include`s resolved."""
  from lm_eval import utils
  entry = manager.task_index[name]
  if entry['type'] == 'tag':
    members = entry['task']
  else:
    config = utils.load_yaml_config(entry['yaml_path'], mode='simple')
    if entry['type'] == 'task':
      return {config['dataset_path']}
    members = config['task']
  return set().union(*(_dataset_paths(manager, m) for m in members))


def test_suite_repos_are_what_lm_eval_reads(task_manager):
  """The repos pre-populated for each task are exactly the dataset_path(s) of its YAML(s)."""
  read = {t['name']: _dataset_paths(task_manager, t['name']) for t in suite_lib.get_config().tasks}
  assert read['mmlu'] == {'cais/mmlu'} and read['social_iqa'] == {'allenai/social_i_qa'}
  for t in suite_lib.get_config().tasks:
    assert set(t['repos']) == read[t['name']], t['name']


def test_suite_has_14_tasks_known_to_lm_eval(task_manager):
  cfg = suite_lib.get_config()
  names = [t['name'] for t in cfg.tasks]
  assert len(names) == 14 == len(set(names))
  for required in ('arc_easy', 'arc_challenge', 'boolq', 'piqa', 'social_iqa', 'hellaswag',
                   'openbookqa', 'winogrande', 'mmlu', 'gsm8k', 'hendrycks_math500'):
    assert required in names
  known = set(task_manager.all_tasks)
  assert not [n for n in names if n not in known]
  for t in cfg.tasks:
    assert t['shots'] >= 0 and ',' in t['metric'] and t['repos']
  assert fetch.suite_repos(cfg).count('allenai/ai2_arc') == 1   # ARC-e and ARC-c share it


def test_missing_dataset_says_where_to_put_it(tmp_path, empty_hf_cache):
  data_dir = tmp_path / 'eval_data'
  with pytest.raises(tasks.DatasetMissingError) as e:
    tasks.suite_specs(suite_lib.get_config().tasks, ['arc_easy', 'mmlu'], data_dir)
  msg = str(e.value)
  assert f'{data_dir}/allenai/ai2_arc/' in msg and f'{data_dir}/cais/mmlu/' in msg
  assert 'datasets--allenai--ai2_arc' in msg                  # the HF cache alternative
  assert 'python -m mobilemoe_jax.eval.fetch' in msg
  with pytest.raises(tasks.DatasetMissingError, match=r'\$MOBILEMOE_EVAL_DATA'):
    tasks.suite_specs(suite_lib.get_config().tasks, ['gsm8k'], None)


def test_data_is_found_in_mirror_or_hf_cache(tmp_path, empty_hf_cache):
  specs = tasks.suite_specs(suite_lib.get_config().tasks, ['arc_easy'], MIRROR)
  assert specs == [{'task': 'arc_easy', 'num_fewshot': 0,
                    'dataset_path': str(MIRROR / 'allenai' / 'ai2_arc')}]
  (empty_hf_cache / 'hub' / 'datasets--openai--gsm8k').mkdir(parents=True)
  specs = tasks.suite_specs(suite_lib.get_config().tasks, ['gsm8k'], None)
  assert specs == [{'task': 'gsm8k', 'num_fewshot': 5}]     # read by datasets, offline


def test_local_task_with_missing_file_names_it(tmp_path):
  yaml_path = tmp_path / 'mine.yaml'
  yaml_path.write_text((EVAL_DATA / 'tiny_mc.yaml').read_text().replace('tiny_mc.jsonl', 'gone.jsonl'))
  with pytest.raises(tasks.DatasetMissingError, match=str(tmp_path / 'gone.jsonl')):
    tasks.local_task(yaml_path)


@pytest.mark.slow
def test_cli_missing_dataset_exits_with_the_message(tmp_path, empty_hf_cache):
  env = dict(os.environ, HF_HOME=str(empty_hf_cache), MOBILEMOE_EVAL_DATA=str(tmp_path / 'none'))
  env.pop('HF_HUB_CACHE', None)
  p = subprocess.run([sys.executable, '-m', 'mobilemoe_jax.eval', '--checkpoint=random',
                      '--tasks=piqa'], capture_output=True, text=True, env=env, timeout=120,
                     cwd=str(EVAL_DATA.parents[2]))
  assert p.returncode != 0
  assert f"{tmp_path / 'none'}/baber/piqa/" in p.stderr and 'fetch' in p.stderr, p.stderr


class ShortestAnswerLM(TokenLM):
  """Prefers the shortest choice: log p = -len(text). Enough to check which docs were read."""

  def _loglikelihood_tokens(self, requests, **kwargs):
    return [(-float(len(cont.strip())), False) for (_, cont), _, _ in requests]

  def _score_pairs(self, pairs):
    raise AssertionError('unused')

  def _generate_ids(self, *args):
    raise AssertionError('unused')


def test_lm_eval_arc_easy_runs_from_the_local_mirror(tmp_path, empty_hf_cache, spm_tokenizer):
  specs = tasks.suite_specs(suite_lib.get_config().tasks, ['arc_easy'], MIRROR)
  lm = ShortestAnswerLM(spm_tokenizer, 64)
  results = run.evaluate(lm, specs)
  res = results['results']['arc_easy']
  # acc: the shortest answers "a rock", "sand", "gas" are all wrong -> 0. acc_norm divides by
  # the length: every choice scores -1 per character, a tie that argmax breaks to the first
  # choice: "the Sun" (right), "darkness", "gas" (wrong) -> 1/3.
  assert results['n-samples']['arc_easy']['effective'] == 3
  assert res['acc,none'] == 0.0 and res['acc_norm,none'] == pytest.approx(1 / 3)
  paths = run.write_reports(results, tmp_path / 'out', {'arc_easy': 'acc_norm,none'},
                            {'checkpoint': 'stub'})
  table = (tmp_path / 'out' / 'results.md').read_text()
  assert '| arc_easy | 0 | acc_norm,none | 0.3333 |' in table and 'acc,none' not in table
  payload = json.loads(open(paths['json']).read())
  assert payload['checkpoint'] == 'stub' and payload['summary'][0]['n'] == 3


def test_suite_shot_count_reaches_the_prompt(tmp_path, empty_hf_cache, spm_tokenizer):
  (spec,) = tasks.suite_specs(suite_lib.get_config().tasks, ['arc_easy'], MIRROR)
  spec['num_fewshot'] = 1          # the mirror's train split has the one example to show
  results = run.evaluate(ShortestAnswerLM(spm_tokenizer, 64), [spec], log_samples=True)
  assert results['n-shot']['arc_easy'] == 1
  context = results['samples']['arc_easy'][0]['arguments'][0][0]
  assert context.startswith('Question: Which organ pumps blood through the body?\nAnswer: the heart\n\n')


def test_incomplete_mirror_is_a_missing_dataset(tmp_path, empty_hf_cache, spm_tokenizer):
  # The mirror's ai2_arc holds ARC-Easy only, so arc_challenge finds the repo but not its config.
  specs = tasks.suite_specs(suite_lib.get_config().tasks, ['arc_challenge'], MIRROR)
  with pytest.raises(tasks.DatasetMissingError, match='ARC-Challenge.*incomplete'):
    run.evaluate(ShortestAnswerLM(spm_tokenizer, 64), specs)


class ParisLM(TokenLM):
  """Always 'generates' " Paris\nQuestion: ...": the task's stop string must cut it."""

  def _generate_ids(self, prompts, max_new, should_stop, temperature):
    ids = self.tok.encode(' Paris\nQuestion: what next?')
    assert max_new == 16 and should_stop(ids) and not should_stop(ids[:1])
    return [ids for _ in prompts]

  def _score_pairs(self, pairs):
    raise AssertionError('unused')


def test_generate_until_task_cuts_at_the_yaml_stop_and_scores(tmp_path, spm_tokenizer):
  spec, include = tasks.local_task(EVAL_DATA / 'tiny_gen.yaml')
  results = run.evaluate(ParisLM(spm_tokenizer, 64), [spec], include=[include],
                         log_samples=True)
  outputs = [s['filtered_resps'][0] for s in results['samples']['tiny_gen']]
  assert outputs == ['Paris', 'Paris']                 # cut at "\n", whitespace stripped
  assert results['results']['tiny_gen']['exact_match,strip'] == 0.5   # France yes, Japan no
