"""Seed-averaged study tables and the law's grouped held-out error."""
import numpy as np
import pytest

from mobilemoe_jax.scaling import law, study


def _rec(run, seed, loss, n=2e5, s=1.0, g=1.0, steps=800, **kw):
  return {'name': f'{run}_seed{seed}', 'run': run, 'seed': seed, 'loss': loss, 'steps': steps,
          'tokens': steps * 2048, 'active_params': n, 'total_params': n * s, 'granularity': g, **kw}


def test_paired_difference_removes_what_seeds_share():
  shared = {0: 0.0, 1: 0.2, 2: -0.1, 3: 0.05}          # e.g. an easy or hard data order
  dense = [_rec('d64_dense_s800', k, 4.0 + v) for k, v in shared.items()]
  moe = [_rec('d64_e8k2_s800', k, 3.95 + v + 0.001 * k, s=2.5, g=2.67) for k, v in shared.items()]
  summary = study.summarize(dense + moe)
  v = study.versus(summary['d64_e8k2_s800'], summary['d64_dense_s800'])
  assert v['diff'] == pytest.approx(-0.0485) and v['paired_mean'] == pytest.approx(-0.0485)
  assert v['paired_se'] < 0.001 < 0.05 < v['se']        # unpaired se carries the shared spread
  assert (v['wins'], v['pairs']) == (4, 4)
  table = study.table(summary)
  assert '| d64 | 800 (1.64M) | e8k2 | 2.50 | 2.67 | 4 |' in table and '4/4 |' in table


def test_study_refuses_diverged_runs_and_odd_names():
  with pytest.raises(ValueError, match='non-finite at step 7'):
    study.summarize([_rec('d64_dense_s800', 0, 4.0, bad_step=7)])
  with pytest.raises(ValueError, match='is not d'):
    study.parse_run('dense_800')
  assert study.parse_run('d256_e8k2_s800_lr0.001') == (256, 'e8k2', 800, 'lr0.001')


def test_heldout_groups_keep_the_seeds_of_a_run_together():
  truth = law.LawParams(E=1.5, A=40.0, C=0.0, eta=0.5, alpha=0.3, gamma=0.4, B=300.0, beta=0.35)
  rng = np.random.default_rng(0)
  recs = []
  for i, (n, s, d) in enumerate([(2e5, 1, 4e5), (8e5, 1, 4e5), (2e5, 3, 1.6e6), (8e5, 3, 1.6e6),
                                 (3e6, 1, 1.6e6), (3e6, 3, 4e5), (5e5, 2, 8e5), (1e6, 5, 8e5)]):
    loss = float(law.predict(truth, n, s, 1.0, d))
    recs += [_rec(f'run{i}', k, loss * (1 + 0.01 * rng.normal()), n=n, s=s, steps=int(d / 2048))
             for k in range(3)]
  # Only E, A and alpha free (4 starts): the grouping, not the fit, is under test.
  kw = dict(fixed={'C': 0.0, 'eta': 0.5, 'gamma': 0.4, 'B': 300.0, 'beta': 0.35}, grid={'E': [0.0]})
  grouped = law.heldout_error(recs, n_folds=100, group='run', **kw)
  assert grouped['n_folds'] == 8                        # one fold per run
  pred = np.array(grouped['predicted']).reshape(8, 3)
  assert np.allclose(pred, pred[:, :1])                 # a run's seeds: one fit, one prediction
  with pytest.raises(law.RecordError, match="group 'width'"):
    law.heldout_error(recs, group='width', **kw)
