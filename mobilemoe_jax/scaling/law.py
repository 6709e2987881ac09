"""A parametric loss law for dense and MoE LMs, and its robust fit from run records.

The form (natural-log loss in nats per token):

    L(N, S, G, D) = E + (A + C * G^-eta) / (N * S^gamma)^alpha + B / D^beta

  N      active non-embedding parameters (what one token multiplies by, minus the embedding)
  S      sparsity = total / active non-embedding parameters (1 for a dense model)
  G      granularity = 4 * d_model / d_expert (1 for a dense model): how many experts the
         FFN of a standard 4x transformer has been cut into
  D      training tokens

Where the pieces come from:
- `E + A/N^alpha + B/D^beta` is the Chinchilla form (Hoffmann et al. 2022): an irreducible
  loss plus power laws in model size and data.
- `N * S^gamma` is an *effective* parameter count: total parameters a token does not touch
  still help, but less than active ones (gamma in [0, 1]; 0: experts are useless, 1: a
  parameter is a parameter). Routed-model laws (Clark et al. 2022; Abnar et al. 2025; the
  memory-aware joint law of Ludziejewski et al. 2025) all describe the gain from more experts
  at fixed active size; a power of S is the simplest version with one parameter.
- `(A + C * G^-eta)` is the granularity term of fine-grained MoE scaling (Krajewski et al.
  2024): cutting experts finer lowers the model-size coefficient towards A.
Embeddings are left out of N and S (as in Kaplan et al. 2020): with a 202k vocabulary the
embedding is half of a 0.3B model's active parameters and would otherwise dominate N.
Shared experts enter only through N and S; the law has no term of its own for them.

Fitting (the Chinchilla recipe): Huber loss (delta 1e-3) on log(predicted) - log(actual),
L-BFGS-B from a grid of initial points, keep the best. Positive coefficients are fitted as
logs. Parameters the records cannot identify (gamma, C, eta from dense-only records, say)
can be held fixed with `fixed=`.

Records are dicts with the fields
  active_params  active non-embedding parameters (N)
  total_params   total non-embedding parameters (so S = total / active)
  granularity    G (1 for dense)
  tokens         training tokens (D)
  loss           final held-out loss in nats/token
and anything else (name, config, wall_s, ...) is carried along. `load_records` reads a JSON
list, a JSONL file (what `sweep.py` appends) or a CSV with these column names.
"""
import csv
import dataclasses
import itertools
import json
import math
import os

import numpy as np
from scipy import optimize

from mobilemoe_jax.scaling import accounting

FIELDS = ('active_params', 'total_params', 'granularity', 'tokens', 'loss')
NAMES = ('E', 'A', 'C', 'eta', 'alpha', 'gamma', 'B', 'beta')
_LOG_FITTED = ('E', 'A', 'C', 'B')          # positive: fitted as their logs
HUBER_DELTA = 1e-3


@dataclasses.dataclass(frozen=True)
class LawParams:
  E: float
  A: float
  C: float
  eta: float
  alpha: float
  gamma: float
  B: float
  beta: float

  def as_dict(self):
    return dataclasses.asdict(self)


# A reference parameter set for configs far beyond anything fitted here. The dense part is
# Chinchilla's published fit (Hoffmann et al. 2022, eq. 10; MassiveText tokens, N including
# embeddings there). gamma = 0.5 and C = 0 are ASSUMPTIONS, not measurements: sqrt(S) is a
# middle-of-the-road guess at what an inactive parameter is worth, and C = 0 expresses no
# preference for granularity until a fit at a relevant scale says otherwise.
REFERENCE = LawParams(E=1.69, A=406.4, C=0.0, eta=0.5, alpha=0.34, gamma=0.5, B=410.7, beta=0.28)


def predict(p: LawParams, N, S, G, D):
  """Predicted loss; arrays broadcast."""
  N, S, G, D = (np.asarray(x, dtype=np.float64) for x in (N, S, G, D))
  return p.E + (p.A + p.C * G ** -p.eta) / (N * S ** p.gamma) ** p.alpha + p.B / D ** p.beta


def law_inputs(model, counts=None) -> tuple[int, float, float]:
  """(N, S, G) of a model config, by the conventions above. `counts` (an accounting.Counts
  or Costs of this model) skips recounting."""
  c = counts if counts is not None else accounting.count(model)
  active = c.active_params - c.embedding_params
  total = c.total_params - c.embedding_params
  g = 4 * model.d_model / model.moe.d_expert if model.moe.n_experts else 1.0
  return active, total / active, g


# ---------------------------------------------------------------------------------------
# Records.

class RecordError(ValueError):
  """Run records that cannot be fitted; the message says which record and field."""


def check_records(records) -> list[dict]:
  if not records:
    raise RecordError('no run records: need at least one record with fields ' + ', '.join(FIELDS))
  out = []
  for i, r in enumerate(records):
    if not isinstance(r, dict):
      raise RecordError(f'record {i}: expected an object with fields {FIELDS}, got {type(r).__name__}')
    missing = [f for f in FIELDS if f not in r or r[f] in (None, '')]
    if missing:
      raise RecordError(f'record {i} ({r.get("name", "unnamed")}): missing field(s) {missing}')
    try:
      vals = {f: float(r[f]) for f in FIELDS}
    except (TypeError, ValueError) as e:
      raise RecordError(f'record {i}: a field is not a number: {e}') from None
    bad = [f for f, v in vals.items() if not (math.isfinite(v) and v > 0)]
    if bad:
      raise RecordError(f'record {i}: field(s) {bad} must be finite and > 0, got '
                        f'{ {f: r[f] for f in bad} }')
    if vals['total_params'] < vals['active_params']:
      raise RecordError(f'record {i}: total_params {r["total_params"]} < active_params '
                        f'{r["active_params"]}')
    out.append({**r, **vals})
  return out


def load_records(path: str) -> list[dict]:
  """Run records from .json (a list), .jsonl (one object per line) or .csv (a header row)."""
  if not os.path.exists(path):
    raise RecordError(f'{path}: no such file')
  with open(path) as f:
    text = f.read()
  if path.endswith('.csv'):
    records = list(csv.DictReader(text.splitlines()))
  elif path.endswith('.jsonl'):
    records = []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise RecordError(f'{path}:{n}: not JSON: {e}') from None
  else:
    try:
      records = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
      raise RecordError(f'{path}: not JSON: {e}') from None
    if not isinstance(records, list):
      raise RecordError(f'{path}: expected a JSON list of records')
  try:
    return check_records(records)
  except RecordError as e:
    raise RecordError(f'{path}: {e}') from None


def _arrays(records):
  r = check_records(records)
  col = lambda f: np.array([x[f] for x in r], dtype=np.float64)
  N, T = col('active_params'), col('total_params')
  return N, T / N, col('granularity'), col('tokens'), col('loss')


# ---------------------------------------------------------------------------------------
# Fitting.

def _huber(r, delta=HUBER_DELTA):
  a = np.abs(r)
  value = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
  grad = np.clip(r, -delta, delta)
  return value, grad


def _objective(theta, free, fixed, logN, logS, logG, logD, logL):
  """Huber loss of log-residuals and its exact gradient with respect to the free entries."""
  p = dict(fixed)
  p.update(zip(free, theta))
  E, A, C, B = (math.exp(p[k]) for k in _LOG_FITTED)
  eta, alpha, gamma, beta = p['eta'], p['alpha'], p['gamma'], p['beta']
  u = logN + gamma * logS                       # log effective parameters
  n_term = np.exp(-alpha * u)
  g_term = C * np.exp(-eta * logG)
  model_t = (A + g_term) * n_term
  data_t = B * np.exp(-beta * logD)
  pred = E + model_t + data_t
  value, h = _huber(np.log(pred) - logL)
  w = h / pred                                  # d huber / d pred
  d = {'E': E * np.ones_like(pred), 'A': A * n_term, 'C': g_term * n_term,
       'eta': -logG * g_term * n_term, 'alpha': -u * model_t, 'gamma': -alpha * logS * model_t,
       'B': data_t, 'beta': -logD * data_t}
  return value.sum(), np.array([np.sum(w * d[k]) for k in free])


def _to_internal(p: dict) -> dict:
  # A coefficient fixed at 0 (no granularity term) becomes a log small enough to vanish.
  return {k: (math.log(v) if v > 0 else -50.0) if k in _LOG_FITTED else v for k, v in p.items()}


def _from_internal(p: dict) -> LawParams:
  return LawParams(**{k: (math.exp(v) if k in _LOG_FITTED else v) for k, v in p.items()})


# Initial points (internal units: logs for E, A, C, B): 2^6 = 64 starts. Single starts do
# land in poor local minima (a flat data term against a steep model term, or the reverse),
# which is why there are many; `grid=` overrides entries.
DEFAULT_GRID = {
    'E': [-0.5, 0.5], 'A': [2.0, 6.0], 'alpha': [0.2, 0.5],
    'B': [2.0, 6.0], 'beta': [0.2, 0.5], 'gamma': [0.2, 0.6],
    'C': [0.0], 'eta': [0.5],
}
# Exponents are kept in a plausible box so a degenerate direction cannot run off to +-inf.
BOUNDS = {'E': (-5, 3), 'A': (-10, 25), 'C': (-50, 25), 'B': (-10, 25),
          'alpha': (0.0, 2.0), 'beta': (0.0, 2.0), 'gamma': (0.0, 1.5), 'eta': (0.0, 3.0)}


@dataclasses.dataclass
class Fit:
  params: LawParams
  objective: float        # Huber loss at the optimum
  rmse_log: float         # root-mean-square of log(pred) - log(actual) on the fitted records
  max_abs_rel: float      # largest |pred / actual - 1| on the fitted records
  n_records: int
  fixed: dict


def fit(records, fixed: dict | None = None, grid: dict | None = None) -> Fit:
  """Fits the law to `records`. `fixed` holds parameters at given values (natural units)."""
  N, S, G, D, L = _arrays(records)
  fixed = dict(fixed or {})
  unknown = set(fixed) - set(NAMES)
  if unknown:
    raise ValueError(f'fixed: unknown law parameter(s) {sorted(unknown)}; known: {NAMES}')
  free = [k for k in NAMES if k not in fixed]
  if len(L) < len(free):
    # Fewer points than parameters still "fits", but the numbers would mean nothing.
    raise RecordError(f'{len(L)} record(s) cannot determine {len(free)} free parameters '
                      f'{free}; add runs or hold some fixed')
  logs = (np.log(N), np.log(S), np.log(G), np.log(D), np.log(L))
  fixed_i = _to_internal(fixed)
  grid = {**DEFAULT_GRID, **(grid or {})}
  best = None
  for start in itertools.product(*(grid[k] for k in free)):
    res = optimize.minimize(_objective, np.array(start, dtype=np.float64), jac=True,
                            args=(free, fixed_i, *logs), method='L-BFGS-B',
                            bounds=[BOUNDS[k] for k in free], options={'maxiter': 1000})
    if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
      best = res
  # Fixed entries are taken as given (a log/exp round trip would perturb them).
  params = dataclasses.replace(_from_internal({**fixed_i, **dict(zip(free, best.x))}), **fixed)
  pred = predict(params, N, S, G, D)
  return Fit(params=params, objective=float(best.fun),
             rmse_log=float(np.sqrt(np.mean((np.log(pred) - np.log(L)) ** 2))),
             max_abs_rel=float(np.max(np.abs(pred / L - 1))), n_records=len(L), fixed=fixed)


def heldout_error(records, n_folds: int = 5, seed: int = 0, group: str | None = None,
                  **fit_kw) -> dict:
  """Leave-some-out: fits on all folds but one and predicts the one left out, for each fold.
  With `group` (a record field, e.g. 'run'), records sharing its value are held out together:
  the seeds of one configuration must not predict each other.
  Returns the held-out RMSE of log-loss, the largest relative error, and each prediction."""
  records = check_records(records)
  keys = [r.get(group, i) if group else i for i, r in enumerate(records)]
  if group and any(group not in r for r in records):
    raise RecordError(f'group {group!r}: not a field of every record')
  units = list(dict.fromkeys(keys))                  # distinct groups, in record order
  n_folds = min(n_folds, len(units))
  if n_folds < 2:
    raise RecordError('held-out error needs at least 2 records (or groups)')
  unit_order = np.random.default_rng(seed).permutation(len(units))
  fold_of = {units[u]: k % n_folds for k, u in enumerate(unit_order)}
  preds = np.zeros(len(records))
  for k in range(n_folds):
    test = np.array([i for i, key in enumerate(keys) if fold_of[key] == k])
    train = [records[i] for i, key in enumerate(keys) if fold_of[key] != k]
    p = fit(train, **fit_kw).params
    N, S, G, D, _ = _arrays([records[i] for i in test])
    preds[test] = predict(p, N, S, G, D)
  actual = np.array([r['loss'] for r in records])
  return {'rmse_log': float(np.sqrt(np.mean((np.log(preds) - np.log(actual)) ** 2))),
          'max_abs_rel': float(np.max(np.abs(preds / actual - 1))),
          'predicted': preds.tolist(), 'n_folds': n_folds}


def plot_fit(records, params: LawParams, path: str, heldout: list | None = None, title=''):
  """Predicted vs actual loss (and held-out predictions when given), saved as a small PNG."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  N, S, G, D, L = _arrays(records)
  moe = S > 1
  fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=110)
  pred = predict(params, N, S, G, D)
  ax.scatter(L[~moe], pred[~moe], s=18, label='dense, fitted', color='tab:blue')
  ax.scatter(L[moe], pred[moe], s=18, label='MoE, fitted', color='tab:orange')
  if heldout is not None:
    ax.scatter(L, heldout, s=30, facecolors='none', edgecolors='k', label='held-out prediction')
  lo, hi = min(L.min(), pred.min()), max(L.max(), pred.max())
  ax.plot([lo, hi], [lo, hi], 'k--', lw=0.8)
  ax.set_xlabel('actual loss (nats/token)')
  ax.set_ylabel('predicted loss')
  ax.set_title(title or 'loss law fit', fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def markdown_table(records) -> str:
  rows = ['| run | N (active non-emb.) | S | G | tokens | held-out loss | wall s |',
          '|---|---:|---:|---:|---:|---:|---:|']
  for r in check_records(records):
    rows.append(f"| {r.get('name', '')} | {r['active_params']:.0f} | "
                f"{r['total_params'] / r['active_params']:.2f} | {r['granularity']:.2f} | "
                f"{r['tokens']:.0f} | {r['loss']:.4f} | {r.get('wall_s', '')} |")
  return '\n'.join(rows)


def main(argv=None):
  import argparse
  ap = argparse.ArgumentParser(description='Fit the MoE loss law to run records.')
  ap.add_argument('records', help='.json / .jsonl / .csv of run records')
  ap.add_argument('--fix', action='append', default=[], metavar='NAME=VALUE',
                  help='hold a law parameter fixed, e.g. --fix C=0 --fix eta=0.5')
  ap.add_argument('--folds', type=int, default=5)
  ap.add_argument('--plot', default='', help='PNG path for predicted vs actual')
  ap.add_argument('--out', default='', help='JSON path for the fitted parameters and errors')
  ap.add_argument('--table', action='store_true', help='also print the records as Markdown')
  ap.add_argument('--exclude', action='append', default=[], metavar='SUBSTRING',
                  help='leave out records whose name contains SUBSTRING (say why in the write-up)')
  ap.add_argument('--group', default=None, metavar='FIELD',
                  help='hold out records sharing this field together (e.g. run: all its seeds)')
  ap.add_argument('--predict', action='append', default=[], metavar='SUBSTRING',
                  help='also fit without the records whose name contains SUBSTRING and report '
                  'how well that fit predicts them (extrapolation, e.g. to the widest runs)')
  ap.add_argument('--starts', type=int, choices=(16, 64), default=64,
                  help='initial points: 64 (DEFAULT_GRID) or 16 (2 per A, B, alpha, beta)')
  a = ap.parse_args(argv)
  fixed = {k: float(v) for k, v in (s.split('=', 1) for s in a.fix)}
  try:
    records = [r for r in load_records(a.records)
               if not any(x in r.get('name', '') for x in a.exclude)]
    if a.table:
      print(markdown_table(records))
    grid = None if a.starts == 64 else {'E': [0.0], 'gamma': [0.5]}
    f = fit(records, fixed=fixed, grid=grid)
    held = heldout_error(records, n_folds=a.folds, group=a.group, fixed=fixed, grid=grid)
    extrapolation = None
    if a.predict:
      hit = lambda r: any(x in r.get('name', '') for x in a.predict)
      target = [r for r in records if hit(r)]
      if not target:
        raise RecordError(f'--predict {a.predict}: no record name contains it')
      p = fit([r for r in records if not hit(r)], fixed=fixed, grid=grid).params
      pred = predict(p, *_arrays(target)[:4])
      actual = np.array([r['loss'] for r in target])
      extrapolation = {'predict': a.predict, 'n_records': len(target), 'params': p.as_dict(),
                       'rmse_log': float(np.sqrt(np.mean((np.log(pred) - np.log(actual)) ** 2))),
                       'mean_rel': float(np.mean(pred / actual - 1)),
                       'max_abs_rel': float(np.max(np.abs(pred / actual - 1)))}
  except (RecordError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  result = {'params': f.params.as_dict(), 'fixed': fixed, 'excluded': a.exclude,
            'starts': a.starts, 'n_records': f.n_records,
            'fit_rmse_log': f.rmse_log, 'fit_max_abs_rel': f.max_abs_rel,
            'heldout_rmse_log': held['rmse_log'], 'heldout_max_abs_rel': held['max_abs_rel'],
            'heldout_folds': held['n_folds'], 'heldout_group': a.group,
            'extrapolation': extrapolation}
  print(json.dumps(result, indent=1))
  if a.out:
    with open(a.out, 'w') as fh:
      json.dump(result, fh, indent=1)
  if a.plot:
    plot_fit(records, f.params, a.plot, heldout=held['predicted'])


if __name__ == '__main__':
  main()
