"""Architecture search under on-device budgets: memory, compute per token, training tokens.

Enumerates shapes (d_model, layers, heads, d_ff, experts, top-k, expert hidden, shared
experts) around a *family* preset that fixes everything else (vocabulary, head size, KV
heads, attention window, first dense layer, ...); keeps the shapes within every budget;
ranks them by the loss law's prediction; returns the optimum and the Pareto frontiers
(loss vs modelled decode latency, loss vs INT4 weight bytes), plots them, and writes chosen
shapes as configs. Reproducing MobileMoE-S from its budgets (docs/scaling.md):

  python -m mobilemoe_jax.scaling.search --memory_gb=0.76 --flops=6e8 --tokens=1e12 \\
      --write=configs/searched --plot=docs/figures/scaling_search_s.png

What the law cannot see, the space decides: the law knows N, S, G and D only, not how
parameters are arranged. So the aspect ratio d_model / n_layers is kept in [32, 64] (every
preset and MobileLLM-Pro lie in it; MobileLLM found deep-and-thin best at this size, and
Kaplan et al. found loss flat over a wide band of aspect ratios), and heads = d_model /
head_dim (the family's unless `--head_dim` lists others).
"""
import dataclasses
import itertools
import os
import types

import numpy as np

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.scaling import accounting, law

SHAPE_FIELDS = ('d_model', 'n_layers', 'n_heads', 'head_dim', 'd_ff')
MOE_SHAPE_FIELDS = ('n_experts', 'top_k', 'd_expert', 'n_shared', 'd_shared')


class BudgetError(ValueError):
  """Budgets no shape in the space can meet, or budgets that are not budgets."""


@dataclasses.dataclass(frozen=True)
class Space:
  d_model: tuple = (384, 512, 640, 768, 896, 1024, 1152, 1280, 1408, 1536)
  n_layers: tuple = tuple(range(8, 41, 2))
  aspect: tuple = (32, 64)               # allowed d_model / n_layers, inclusive
  head_dim: tuple = ()                   # () = the family's; heads = d_model / head_dim
  d_ff_ratio: tuple = (8 / 3, 4.0, 4.8)  # dense FFN hidden / d_model (rounded to 128)
  n_experts: tuple = (0, 8, 16, 32, 64, 72, 96, 128)   # 0: a dense model
  top_k: tuple = (1, 2, 4, 6, 8)
  d_expert: tuple = (256, 384, 512, 640, 768, 1024)
  shared: tuple = ((0, 0), (1, 1), (1, 2))  # (n_shared, d_shared / d_expert)


@dataclasses.dataclass(frozen=True)
class Budgets:
  memory_bytes: float                  # INT4 weight bytes on device (scales included)
  tokens: float                        # training tokens (enters the predicted loss)
  flops: float | None = None           # forward FLOPs per token at `context`
  decode_s: float | None = None        # modelled decode seconds per token at `context`
  context: int = 2048

  def check(self):
    if self.flops is None and self.decode_s is None:
      raise BudgetError('give a compute budget: --flops (forward FLOPs/token) and/or '
                        '--decode_ms (modelled decode latency)')
    for name in ('memory_bytes', 'tokens', 'flops', 'decode_s'):
      v = getattr(self, name)
      if v is not None and not v > 0:
        raise BudgetError(f'budget {name} must be > 0, got {v}')
    if self.context <= 0:
      raise BudgetError(f'context must be > 0, got {self.context}')


def _namespace(model) -> types.SimpleNamespace:
  """A plain copy of a model config: attribute reads on a ConfigDict are ~50x slower, and
  the search reads them ~10^7 times."""
  d = model.to_dict()
  moe = types.SimpleNamespace(**d.pop('moe'))
  return types.SimpleNamespace(**d, moe=moe)


def _shapes(base, space: Space):
  """Every shape in the space the family allows, grouped so the layer count comes last
  (costs grow with layers, which lets the caller stop early)."""
  experts = [(0, 0, 0, 0, 0)]
  for e, k, de, (ns, r) in itertools.product(space.n_experts, space.top_k, space.d_expert,
                                             space.shared):
    if e and k <= e:
      experts.append((e, k, de, ns, r * de))
  for d, hd in itertools.product(space.d_model, space.head_dim or (base.head_dim,)):
    if d % hd or (d // hd) % base.n_kv_heads:
      continue           # heads must be a whole number and a multiple of the KV heads
    heads = d // hd
    layers = [n for n in space.n_layers if space.aspect[0] <= d / n <= space.aspect[1]]
    layers = [n for n in layers if n > base.moe.first_dense]
    d_ffs = sorted({int(round(r * d / 128)) * 128 for r in space.d_ff_ratio})
    for d_ff, ex in itertools.product(d_ffs, experts):
      yield (d, heads, hd, d_ff, ex), layers


def _make(base, d, heads, hd, d_ff, ex, n_layers):
  m = types.SimpleNamespace(**vars(base))
  m.moe = types.SimpleNamespace(**vars(base.moe))
  m.d_model, m.n_heads, m.head_dim, m.d_ff, m.n_layers = d, heads, hd, d_ff, n_layers
  (m.moe.n_experts, m.moe.top_k, m.moe.d_expert, m.moe.n_shared, m.moe.d_shared) = ex
  m.moe.norm_topk_prob = base.moe.norm_topk_prob and m.moe.top_k > 1   # top-1: see config.validate
  if not ex[0]:          # a dense model: keep the family's (unused) expert fields valid
    m.moe.top_k, m.moe.d_expert, m.moe.n_shared, m.moe.d_shared = (
        base.moe.top_k, base.moe.d_expert, 0, base.moe.d_shared)
  return m


def _within(c: accounting.Costs, b: Budgets) -> bool:
  return (c.int4_bytes <= b.memory_bytes and (b.flops is None or c.forward_flops <= b.flops)
          and (b.decode_s is None or c.decode_s <= b.decode_s))


@dataclasses.dataclass
class Result:
  candidates: list          # every shape within budgets, best predicted loss first
  optimum: dict
  frontier_latency: list    # Pareto-optimal in (decode latency, loss), by latency
  frontier_memory: list     # Pareto-optimal in (INT4 bytes, loss), by bytes
  n_evaluated: int
  budgets: Budgets
  params: law.LawParams
  device: accounting.DeviceModel


def shape_of(m) -> dict:
  out = {k: getattr(m, k) for k in SHAPE_FIELDS}
  out.update({k: getattr(m.moe, k) for k in MOE_SHAPE_FIELDS} if m.moe.n_experts else
             {'n_experts': 0})
  return out


def _record(m, c: accounting.Costs) -> dict:
  n, s, g = law.law_inputs(m, c)
  return {'shape': shape_of(m), 'total_params': c.total_params,
          'active_params': c.active_params, 'N': n, 'S': s, 'G': g,
          'forward_flops': c.forward_flops, 'int4_bytes': c.int4_bytes,
          'active_int4_bytes': c.active_int4_bytes, 'decode_s': c.decode_s}


def _pareto(cands, key):
  out, best = [], float('inf')
  for c in sorted(cands, key=lambda c: (c[key], c['loss'])):
    if c['loss'] < best:
      out.append(c)
      best = c['loss']
  return out


def search(budgets: Budgets, family, space: Space = Space(),
           params: law.LawParams = law.REFERENCE,
           device: accounting.DeviceModel | None = None) -> Result:
  """All shapes of `family` (a model config, e.g. the pre-release MobileMoE-S design,
  configs/prerelease/mobilemoe_s.py, whose search docs/scaling.md records) in `space` within
  `budgets`, ranked by the law with `params`. Ties in predicted loss go to the shape with
  the lower decode latency, then the smaller model. device: latency constants
  (accounting.load_device), default the placeholders accounting.ASSUMED_DEVICE."""
  budgets.check()
  device = device or accounting.ASSUMED_DEVICE
  base = _namespace(config_lib.validate(family))
  found, n_eval = [], 0
  for (d, heads, hd, d_ff, ex), layers in _shapes(base, space):
    for n in layers:            # ascending: once over a budget, deeper is over it too
      m = _make(base, d, heads, hd, d_ff, ex, n)
      c = accounting.costs(m, budgets.context, device, check=False)
      n_eval += 1
      if not _within(c, budgets):
        break
      found.append(_record(m, c))
  if not found:
    raise BudgetError(
        f'no shape of the family within the budgets (memory {budgets.memory_bytes / 1e9:.3g} GB, '
        f'flops {budgets.flops}, decode {budgets.decode_s}); {n_eval} shapes tried. The '
        'smallest shapes in the space need more: raise a budget or widen the space '
        '(smaller d_model / fewer layers).')
  loss = law.predict(params, *(np.array([f[k] for f in found]) for k in ('N', 'S', 'G')),
                     budgets.tokens)
  for f, l in zip(found, loss):
    f['loss'] = float(l)
  found.sort(key=lambda f: (round(f['loss'], 6), f['decode_s'], f['int4_bytes']))
  return Result(candidates=found, optimum=found[0],
                frontier_latency=_pareto(found, 'decode_s'),
                frontier_memory=_pareto(found, 'int4_bytes'), n_evaluated=n_eval,
                budgets=budgets, params=params, device=device)


# ---------------------------------------------------------------------------------------
# Configs out.

def model_config_of(family, shape: dict):
  """A real (validated) model config: a copy of the family with `shape` applied."""
  m = family.copy_and_resolve_references()
  m.update({k: shape[k] for k in SHAPE_FIELDS})
  if shape['n_experts']:
    m.moe.update({k: shape[k] for k in MOE_SHAPE_FIELDS})
  else:
    m.moe.n_experts = 0
  return config_lib.validate(m)


def override_flags(family, model) -> list[str]:
  """`--config.model.X=V` flags that turn the family's config into `model` (for
  `python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:FAMILY ...`)."""
  out = []
  for k in model.keys():
    if k == 'moe':
      out += [f'--config.model.moe.{j}={model.moe[j]}' for j in model.moe.keys()
              if model.moe[j] != family.moe[j]]
    elif model[k] != family[k]:
      out.append(f'--config.model.{k}={model[k]}')
  return out


def _describe(r: dict) -> str:
  s = r['shape']
  moe = (f"{s['n_experts']}x{s['d_expert']} top-{s['top_k']}"
         + (f" + {s['n_shared']} shared {s['d_shared']}" if s['n_shared'] else '')
         + f" (dense layer d_ff {s['d_ff']})" if s['n_experts'] else f"dense d_ff {s['d_ff']}")
  return (f"d_model {s['d_model']}, {s['n_layers']} layers, {s['n_heads']} heads of "
          f"{s['head_dim']}, {moe}: "
          f"{r['active_params'] / 1e6:.0f}M active / {r['total_params'] / 1e6:.0f}M total, "
          f"{r['int4_bytes'] / 1e9:.3f} GB INT4, {r['forward_flops'] / 1e6:.0f} MFLOPs/token, "
          f"decode {r['decode_s'] * 1e3:.2f} ms, predicted loss {r['loss']:.4f}")


def _budget_text(b: Budgets) -> str:
  out = [f'INT4 weights <= {b.memory_bytes / 1e9:.4g} GB']
  if b.flops is not None:
    out.append(f'forward FLOPs/token <= {b.flops:.4g}')
  if b.decode_s is not None:
    out.append(f'modelled decode <= {b.decode_s * 1e3:.4g} ms/token')
  return ', '.join(out) + f' (context {b.context}); {b.tokens:.3g} training tokens'


def write_config(path: str, family_name: str, family, r: dict, command: str,
                 result: Result) -> str:
  """Writes `r` as a config file whose get_config() returns experiment(model_config(...))."""
  model = model_config_of(family, r['shape'])
  # Flat fields go to model_config(); sections (moe, ...) are updated whole, so every value
  # of the family is stated in the file.
  fields = {k: model[k] for k in model.keys() if not hasattr(model[k], 'to_dict')}
  sections = ''.join(f'\n  m.{k}.update({model[k].to_dict()!r})' for k in model.keys()
                     if hasattr(model[k], 'to_dict'))
  b = result.budgets
  flags_ = ' \\\n      '.join(override_flags(family, model))
  args = ''.join(f'\n      {k}={v!r},' for k, v in fields.items())
  text = f'''"""Searched config (generated by mobilemoe_jax.scaling.search; re-run, do not edit).

{_describe(r)}.

Budgets: {_budget_text(b)}; device model: {result.device.source}.
Predicted loss from the law with {result.params.as_dict()}
(a prediction, not a measurement).

  {command}
  python -m mobilemoe_jax.info --config=configs/searched/{os.path.basename(path)}
  python -m mobilemoe_jax.train --config=configs/stages/pretrain.py:{family_name} --workdir=runs/X \\
      {flags_}
"""
from mobilemoe_jax.config import experiment, model_config


def get_config():
  m = model_config({args}
  ){sections}
  return experiment(m)
'''
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
  return path


def plot(result: Result, path: str, marks: dict | None = None, title: str = ''):
  """Loss vs decode latency and vs INT4 bytes: all feasible shapes, the frontiers, the
  optimum, and `marks` (name -> record, e.g. a preset) for comparison."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  cands = result.candidates
  fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), dpi=80)
  for ax, key, front, unit, label in (
      (axes[0], 'decode_s', result.frontier_latency, 1e3, 'modelled decode ms/token'),
      (axes[1], 'int4_bytes', result.frontier_memory, 1e-9, 'INT4 weight GB')):
    dense = [c for c in cands if not c['shape']['n_experts']]
    moe = [c for c in cands if c['shape']['n_experts']]
    for group, color, name in ((moe, 'tab:orange', 'MoE'), (dense, 'tab:blue', 'dense')):
      if group:
        ax.scatter([c[key] * unit for c in group], [c['loss'] for c in group], s=3,
                   alpha=0.3, color=color, label=name)
    ax.plot([c[key] * unit for c in front], [c['loss'] for c in front], 'k-', lw=1,
            label='Pareto frontier')
    ax.scatter([result.optimum[key] * unit], [result.optimum['loss']], marker='*', s=120,
               color='red', label='optimum', zorder=5)
    for name, r in (marks or {}).items():
      ax.scatter([r[key] * unit], [r['loss']], marker='x', s=60, color='k', zorder=5)
      ax.annotate(name, (r[key] * unit, r['loss']), fontsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel('predicted loss')
  axes[0].legend(fontsize=7)
  fig.suptitle(title or _budget_text(result.budgets), fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def evaluate(model, budgets: Budgets, params: law.LawParams = law.REFERENCE,
             device: accounting.DeviceModel | None = None) -> dict:
  """The search's record for one given config (to place a preset on the plot)."""
  device = device or accounting.ASSUMED_DEVICE
  r = _record(model, accounting.costs(model, budgets.context, device))
  r['loss'] = float(law.predict(params, r['N'], r['S'], r['G'], budgets.tokens))
  r['within_budgets'] = _within(accounting.costs(model, budgets.context, device), budgets)
  return r


def main(argv=None):
  import argparse
  import json
  import shlex
  import sys
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--memory_gb', type=float, required=True, help='INT4 weight bytes / 1e9')
  ap.add_argument('--flops', type=float, default=None, help='forward FLOPs per token')
  ap.add_argument('--decode_ms', type=float, default=None, help='modelled decode ms per token')
  ap.add_argument('--tokens', type=float, required=True, help='training tokens')
  ap.add_argument('--context', type=int, default=2048)
  ap.add_argument('--family', default='prerelease_s',
                  help='preset whose non-shape fields are kept (configs/stages/common.py names)')
  ap.add_argument('--law', default='', help='JSON of fitted law parameters (law.py --out); '
                  'default: law.REFERENCE')
  for field in ('d_model', 'n_layers', 'head_dim', 'n_experts', 'top_k', 'd_expert'):
    ap.add_argument(f'--{field}', default='', help=f'comma-separated {field} values to search '
                    f'(default: {getattr(Space(), field)})')
  ap.add_argument('--device_json', default='',
                  help='latency constants (accounting.load_device), e.g. the on-device '
                  'benchmark\'s bench/results/ondevice.json; none: the assumed placeholders')
  ap.add_argument('--top', type=int, default=5, help='how many of the best shapes to print')
  ap.add_argument('--write', default='', help='directory for the optimum config file')
  ap.add_argument('--name', default='', help='file name for --write (default from budgets)')
  ap.add_argument('--plot', default='', help='PNG path for the frontiers')
  ap.add_argument('--mark', action='append', default=[], help='preset to show on the plot')
  ap.add_argument('--json', default='', help='write optimum and frontiers here')
  a = ap.parse_args(argv)
  from configs.stages.common import PRESETS
  if a.family not in PRESETS:
    sys.exit(f'unknown --family {a.family!r}; choose from {sorted(PRESETS)}')
  family = PRESETS[a.family]().model
  params = law.REFERENCE
  if a.law:
    with open(a.law) as f:
      params = law.LawParams(**json.load(f)['params'])
  b = Budgets(memory_bytes=a.memory_gb * 1e9, tokens=a.tokens, flops=a.flops,
              decode_s=None if a.decode_ms is None else a.decode_ms / 1e3, context=a.context)
  space = Space(**{f: tuple(int(x) for x in getattr(a, f).split(','))
                   for f in ('d_model', 'n_layers', 'head_dim', 'n_experts', 'top_k', 'd_expert')
                   if getattr(a, f)})
  try:
    res = search(b, family, space=space, params=params,
                 device=accounting.load_device(a.device_json))
  except BudgetError as e:
    sys.exit(f'error: {e}')
  print(f'{res.n_evaluated} shapes evaluated, {len(res.candidates)} within budgets; device '
        f'model: {res.device.source}')
  for i, r in enumerate(res.candidates[:a.top]):
    print(f'{i + 1}. {_describe(r)}')
  print('latency frontier:')
  for r in res.frontier_latency:
    print('  ' + _describe(r))
  command = 'python -m mobilemoe_jax.scaling.search ' + ' '.join(
      shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
  if a.write:
    name = a.name or f'searched_{a.memory_gb:g}gb'.replace('.', 'p') + '.py'
    print('wrote', write_config(os.path.join(a.write, name), a.family, family, res.optimum,
                                command, res))
  marks = {m: evaluate(PRESETS[m]().model, b, params, res.device) for m in a.mark}
  for m, r in marks.items():
    same = [i for i, c in enumerate(res.candidates) if c['shape'] == r['shape']]
    where = f'rank {same[0] + 1} of {len(res.candidates)}' if same else 'not in the space'
    print(f"{m}: {_describe(r)}; within budgets: {r['within_budgets']}; {where}; predicted "
          f"loss {100 * (r['loss'] / res.optimum['loss'] - 1):+.2f}% vs the optimum; "
          f"active {100 * (r['active_params'] / res.optimum['active_params'] - 1):+.1f}%, "
          f"total {100 * (r['total_params'] / res.optimum['total_params'] - 1):+.1f}%")
  if a.plot:
    print('wrote', plot(res, a.plot, marks))
  if a.json:
    # Compact: the optimum and the frontiers, one shape per line.
    rows = lambda rs: [{k: r[k] for k in ('shape', 'total_params', 'active_params',
                                          'int4_bytes', 'forward_flops', 'decode_s', 'loss')}
                       for r in rs]
    with open(a.json, 'w') as f:
      f.write(json.dumps({'command': command, 'device': res.device.source,
                          'law': params.as_dict()}) + '\n')
      for tag, rs in (('optimum', [res.optimum]), ('frontier_latency', res.frontier_latency),
                      ('frontier_memory', res.frontier_memory)):
        for r in rows(rs):
          f.write(json.dumps({'set': tag, **r}) + '\n')


if __name__ == '__main__':
  main()
