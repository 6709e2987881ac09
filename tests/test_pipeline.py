"""The one-command pipeline: pretrain -> midtrain -> SFT -> QAT, chained by checkpoints, with
a summary table and the full lineage in the last checkpoint."""
import json
import os

import pytest

from mobilemoe_jax import pipeline
from tests.support.train import SMALL


@pytest.mark.slow
def test_pipeline_chains_stages(data_dir, tmp_path, capsys):
  workdir = str(tmp_path / 'demo')
  # Every stage gets pre-training's optimizer settings here, so all three compile to the
  # step test_train.py already compiled (XLA disk cache); the stage files' own values are
  # what the demo exercises.
  overrides = dict(SMALL, **{'train.checkpoint_every': 3, 'train.schedule': 'wsd',
                             'train.lr': 3e-3, 'train.decay_fraction': 0.2, 'train.min_lr_ratio': 0.1,
                             'train.weight_decay': 0.1, 'train.steps': 6})
  summary = pipeline.run(workdir, 'pretrain', f'tiny,data_dir={data_dir}', overrides,
                         build_data=False)

  stages = summary['stages']
  assert [s['stage'] for s in stages] == ['pretrain', 'midtrain', 'sft', 'qat']
  assert all(s['steps'] == 6 and s['loss_end'] is not None for s in stages)
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['stages'] == stages
  table = capsys.readouterr().out
  assert 'loss start' in table and 'midtrain' in table

  # Each stage starts from the previous one's params: same held-out set, same perplexity.
  assert stages[1]['ppl_start'] == stages[0]['ppl_end']
  with open(os.path.join(stages[3]['checkpoint'], 'meta', 'metadata')) as f:
    meta = json.load(f)
  lineage = meta['lineage']
  assert [(e['stage'], e['step']) for e in lineage] == [('pretrain', 6), ('midtrain', 6), ('sft', 6),
                                                         ('qat', 6)]
  assert meta['config']['model']['quant']['weights'] == 'int4_g32'   # QAT trained fake-quantized
  assert [e['checkpoint'] for e in lineage] == [s['checkpoint'] for s in stages]


def test_appending_a_stage_is_one_line(data_dir, tmp_path, monkeypatch):
  """A new stage only needs an entry in STAGES: it gets its predecessor's checkpoint."""
  monkeypatch.setattr(pipeline, 'STAGES', pipeline.STAGES + [('extra', pipeline.sft.get_config)])
  configs = pipeline.stage_configs('qat', f'tiny,data_dir={data_dir}', {'train.steps': 5}, 'w')
  assert [name for name, _ in configs] == ['qat', 'extra']
  assert configs[1][1].train.init_from == os.path.join('w', 'qat', 'checkpoints')
  assert all(c.train.steps == 5 for _, c in configs)
