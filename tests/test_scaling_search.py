"""Architecture search: budgets are respected, budgets move the optimum the right way, the
presets are recovered from their stated budgets, written configs load and train-ready."""
import dataclasses
import importlib.util

import pytest

from configs import tiny
from configs.prerelease import mobilemoe_s   # the family docs/scaling.md searches
from mobilemoe_jax.scaling import accounting, law, search

DEV = accounting.ASSUMED_DEVICE
# S's budgets as documented in docs/scaling.md (rounded up from S's own accounting).
S_BUDGETS = search.Budgets(memory_bytes=0.76e9, flops=6e8, tokens=1e12)
# A small space on the tiny family for the budget-moving tests: fast and still 2-D.
TINY_SPACE = search.Space(d_model=(64, 96, 128, 160, 192), n_layers=(2, 3, 4, 5, 6),
                          aspect=(16, 64), d_ff_ratio=(3.0,), n_experts=(0, 4, 8, 16),
                          top_k=(1, 2, 4), d_expert=(32, 64, 128),
                          shared=((0, 0), (1, 1)))


def tiny_search(**budget):
  b = search.Budgets(**{'tokens': 1e8, 'context': 256, **budget})
  return search.search(b, tiny.get_config('moe').model, TINY_SPACE, device=DEV)


@pytest.fixture(scope='module')
def s_result():
  return search.search(S_BUDGETS, mobilemoe_s.get_config().model, device=DEV)


def test_every_candidate_is_within_every_budget(s_result):
  assert len(s_result.candidates) > 100
  for c in s_result.candidates:
    assert c['int4_bytes'] <= S_BUDGETS.memory_bytes and c['forward_flops'] <= S_BUDGETS.flops
  # ... and the accounting the search used is the real one for the config it writes.
  m = search.model_config_of(mobilemoe_s.get_config().model, s_result.optimum['shape'])
  c = accounting.costs(m, S_BUDGETS.context, DEV)
  assert (c.int4_bytes, c.forward_flops) == (s_result.optimum['int4_bytes'],
                                             s_result.optimum['forward_flops'])


def test_s_budgets_recover_s(s_result):
  """"Close to S", defined before looking: the optimum's total and active parameters are
  within 10% of S's, and S itself is within the budgets with a predicted loss within 2% of
  the optimum's (the law sees N, S, G, D only, so shapes with the same counts tie)."""
  opt = s_result.optimum
  s = search.evaluate(mobilemoe_s.get_config().model, S_BUDGETS, device=DEV)
  assert s['within_budgets']
  assert opt['total_params'] == pytest.approx(s['total_params'], rel=0.10)
  assert opt['active_params'] == pytest.approx(s['active_params'], rel=0.10)
  assert s['loss'] <= opt['loss'] * 1.02
  assert any(c['shape'] == s['shape'] for c in s_result.candidates)   # S is in the space


def test_frontiers_are_pareto(s_result):
  for key, front in (('decode_s', s_result.frontier_latency),
                     ('int4_bytes', s_result.frontier_memory)):
    assert [c[key] for c in front] == sorted(c[key] for c in front)
    assert all(a['loss'] > b['loss'] for a, b in zip(front, front[1:]))
    assert front[-1]['loss'] == s_result.optimum['loss']


def test_more_memory_allows_more_total_params():
  small, big = tiny_search(memory_bytes=0.6e6, flops=4e6), tiny_search(memory_bytes=1.5e6, flops=4e6)
  assert big.optimum['total_params'] > small.optimum['total_params']
  assert big.optimum['loss'] < small.optimum['loss']
  assert big.optimum['int4_bytes'] <= 1.5e6 and small.optimum['int4_bytes'] <= 0.6e6


def test_less_compute_means_fewer_active_params():
  fast, slow = tiny_search(memory_bytes=2e6, flops=2.5e6), tiny_search(memory_bytes=2e6, flops=5e6)
  assert fast.optimum['active_params'] < slow.optimum['active_params']
  assert fast.optimum['forward_flops'] <= 2.5e6


def test_decode_latency_budget():
  base = tiny_search(memory_bytes=2e6, flops=5e6)
  limit = base.optimum['decode_s'] * 0.8
  tight = tiny_search(memory_bytes=2e6, decode_s=limit)
  assert all(c['decode_s'] <= limit for c in tight.candidates)
  assert tight.optimum['active_params'] < base.optimum['active_params']


@pytest.mark.parametrize('budget, message', [
    (dict(memory_bytes=1e3, flops=5e6), 'no shape of the family within the budgets'),
    (dict(memory_bytes=2e6, flops=1e3), 'no shape of the family within the budgets'),
    (dict(memory_bytes=2e6), 'give a compute budget'),
    (dict(memory_bytes=-1, flops=5e6), 'memory_bytes must be > 0'),
])
def test_impossible_or_bad_budgets_are_refused(budget, message):
  with pytest.raises(search.BudgetError, match=message):
    tiny_search(**budget)


def test_written_config_loads_and_matches(tmp_path):
  r = tiny_search(memory_bytes=1.5e6, flops=4e6)
  family = tiny.get_config('moe').model
  path = search.write_config(str(tmp_path / 'found.py'), 'tiny', family, r.optimum,
                             'python -m mobilemoe_jax.scaling.search ...', r)
  spec = importlib.util.spec_from_file_location('found', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  assert search.shape_of(cfg.model) == r.optimum['shape']
  assert accounting.int4_weight_bytes(cfg.model) == r.optimum['int4_bytes']
  assert '--config.model.d_model=' in open(path).read() or cfg.model.d_model == family.d_model


def test_cli_writes_config_and_plot(tmp_path):
  search.main(['--memory_gb=0.0015', '--flops=4e6', '--tokens=1e8', '--context=256',
               '--family=tiny', '--d_model=64,128', '--n_layers=2,4', f'--write={tmp_path}',
               '--name=t.py', f'--plot={tmp_path}/f.png', '--mark=tiny'])
  from ml_collections import config_flags  # noqa: F401  (the loader the trainer uses)
  from absl import flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', str(tmp_path / 't.py'), flag_values=fv,
                                  lock_config=True)
  fv(['prog'])
  assert fv.config.model.d_model in (64, 128)
  assert (tmp_path / 'f.png').stat().st_size > 1000
