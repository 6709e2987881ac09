"""The sweep driver: commands, records and resuming, without training anything."""
import json

from mobilemoe_jax.scaling import law, sweep


def test_dry_run_prints_one_train_command_per_run(tmp_path):
  lines = []
  runs = sweep.GRIDS['tiny']()
  sweep.run_grid(runs, 'tiny', str(tmp_path / 'r.jsonl'), str(tmp_path), dry_run=True,
                 log=lines.append)
  assert len(lines) == len(runs) == 16
  assert all(l.split()[1:3] == ['-m', 'mobilemoe_jax.train'] for l in lines)
  assert '--config.model.moe.n_experts=0' in lines[0] and '--config.train.steps=300' in lines[0]
  assert not (tmp_path / 'r.jsonl').exists()


def test_record_accounting_matches_the_overrides():
  name, over = sweep.GRIDS['tiny']()[1]              # d64, 8 experts top-2
  rec = sweep.record_of(name, 'tiny', over)
  cfg = sweep.build_config('tiny', over)
  assert cfg.model.moe.n_experts == 8 and cfg.model.d_model == 64
  n, s, g = law.law_inputs(cfg.model)
  assert (rec['active_params'], rec['granularity']) == (n, g)
  assert rec['tokens'] == 300 * cfg.train.batch_size * cfg.train.seq_len
  # Equal active FFN by construction: the dense and MoE runs differ by the router only.
  d_name, d_over = sweep.GRIDS['tiny']()[0]
  dense = sweep.record_of(d_name, 'tiny', d_over)
  assert abs(rec['active_params'] - dense['active_params']) < 0.01 * dense['active_params']


def test_finished_runs_are_skipped_and_losses_read(tmp_path):
  out = tmp_path / 'r.jsonl'
  name, over = sweep.GRIDS['tiny']()[0]
  out.write_text(json.dumps({'name': name}) + '\n')
  lines = []
  sweep.run_grid([(name, over)], 'tiny', str(out), str(tmp_path), log=lines.append)
  assert lines == [f'skip {name}: already in {out}']
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 0, "eval/loss": 7.0}\n{"step": 5, "train/loss": 6.0}\n{"step": 9, "eval/loss": 5.5}\n')
  assert sweep.final_eval_loss(str(tmp_path)) == (5.5, 9)


def test_report_compares_each_shape_with_dense():
  rec = lambda name, loss: {'name': name, 'loss': loss, 'tokens': 614400}
  table = sweep.report([rec('d64_dense_s300', 5.0), rec('d64_e8k2_s300', 4.9)])
  assert '| d64, s300 | 614400 | 5.0000 | 4.9000 (-0.1000) | not run | not run |' in table
