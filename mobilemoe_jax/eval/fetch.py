"""Fill the benchmark data on a machine WITH internet, to copy to machines without it.

  python -m mobilemoe_jax.eval.fetch --out /data/eval      # local mirror: DIR/<repo>/...
  python -m mobilemoe_jax.eval.fetch --hf_cache            # the HF cache ($HF_HOME)

Then on the evaluation machine: `--data_dir=/data/eval` (or MOBILEMOE_EVAL_DATA=/data/eval),
or copy $HF_HOME to the same path. Layouts: mobilemoe_jax/eval/tasks.py. This is the only
module of the package that touches the network, and nothing imports it.
"""
import argparse
import pathlib


def suite_repos(suite) -> list[str]:
  """The dataset repos of a suite config, each once, in suite order."""
  return list(dict.fromkeys(r for t in suite.tasks for r in t['repos']))


def fetch_mirror(suite, out: str):
  from huggingface_hub import snapshot_download
  for repo in suite_repos(suite):
    dest = pathlib.Path(out) / repo
    print(f'{repo} -> {dest}', flush=True)
    snapshot_download(repo_id=repo, repo_type='dataset', local_dir=str(dest))


def fetch_hf_cache(suite):
  """Builds each task once with network on: lm_eval downloads exactly the files it reads."""
  from lm_eval.tasks import TaskManager, get_task_dict
  manager = TaskManager()
  for t in suite.tasks:
    print(f"{t['name']}: loading", flush=True)
    get_task_dict([t['name']], manager)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--out', help='directory for the local mirror')
  ap.add_argument('--hf_cache', action='store_true', help='fill the HF cache instead')
  ap.add_argument('--suite', default='full', help="argument of configs/eval/suite.py")
  a = ap.parse_args(argv)
  from configs.eval import suite as suite_lib
  suite = suite_lib.get_config(a.suite)
  if a.hf_cache:
    fetch_hf_cache(suite)
  elif a.out:
    fetch_mirror(suite, a.out)
  else:
    ap.error('give --out DIR or --hf_cache')


if __name__ == '__main__':
  main()
