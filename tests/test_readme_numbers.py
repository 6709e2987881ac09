"""README numbers checked against the committed command that produces them: the Models table of
README.md is what `python -m mobilemoe_jax.info` prints for the four presets, and the benchmark
tables are what the bench scripts' --table print from bench/results/."""
import pathlib
import subprocess
import sys

import pytest

from mobilemoe_jax.info import describe, presets

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_models_table_is_what_info_prints():
  lines = (ROOT / 'README.md').read_text().splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith('| | mobilellm_pro |'))
  names = [c.strip() for c in lines[start].strip('|').split('|')][1:]
  configs = presets()
  want = {n: describe(configs[n].model, 2048) for n in names}
  rows = 0
  for line in lines[start + 2:]:
    if not line.startswith('|'):
      break
    label, *cells = [c.strip() for c in line.strip('|').split('|')]
    label = label.removesuffix(' (fp16)')           # info's KV bytes are fp16 by default
    assert [int(c.replace(',', '')) for c in cells] == [want[n][label] for n in names], label
    rows += 1
  assert rows == 7


# Scripts whose --table the READMEs copy whole (bench/README.md says "printed by --table").
# bench/ondevice.py is left out: its table labels the stored pre-release run's FFN stacks with
# the current preset's layer count.
TABLE_SCRIPTS = ('train_throughput', 'moe_dispatch', 'delegate_block', 'block_residency', 'kv_cache',
                 'delegate_fuzz', 'release_agreement', 'qat', 'regrid', 'attention_check', 'ondevice',
                 'fresh_clone')


@pytest.mark.parametrize('script', TABLE_SCRIPTS)
def test_bench_tables_are_what_the_scripts_print(script):
  """Every table row `python bench/<script>.py --table` prints from its committed results file
  stands in a README as printed: no number typed in by hand."""
  out = subprocess.run([sys.executable, str(ROOT / 'bench' / f'{script}.py'), '--table'], cwd=ROOT,
                       capture_output=True, text=True, check=True).stdout
  rows = [l for l in out.splitlines() if l.startswith('|')]
  readmes = '\n'.join(p.read_text() for p in (ROOT / 'README.md', ROOT / 'bench' / 'README.md',
                                                ROOT / 'export' / 'README.md',
                                                ROOT / 'export' / 'delegate' / 'README.md'))
  assert rows and not [r for r in rows if r not in readmes]


def test_scaling_study_table_is_what_the_study_prints():
  """docs/scaling.md's results table: `python -m mobilemoe_jax.scaling.study` over the stored
  H200 records."""
  out = subprocess.run([sys.executable, '-m', 'mobilemoe_jax.scaling.study',
                        'bench/results/scaling_h200.jsonl'], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  rows = [l for l in out.splitlines() if l.startswith('|')]
  doc = (ROOT / 'docs' / 'scaling.md').read_text()
  assert rows and not [r for r in rows if r not in doc]
