"""Prints what a config costs: parameters, FLOPs per token, INT4 bytes, KV-cache bytes.

  python -m mobilemoe_jax.info --config=configs/mobilemoe_s.py --context=2048
  python -m mobilemoe_jax.info          # every preset side by side
"""
from absl import app, flags
from ml_collections import config_flags

from mobilemoe_jax import config as config_lib
from mobilemoe_jax.scaling import accounting


def _define_flags():
  """Only when run as a program, so importing `describe`/`presets` defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'A config file in configs/.', lock_config=True)
  flags.DEFINE_integer('context', 2048, 'Context length for attention FLOPs and KV cache.')
  flags.DEFINE_integer('kv_bytes', 2, 'Bytes per cached K/V value (2: fp16, 1: int8).')


def describe(model, context: int, kv_bytes: int = 2) -> dict:
  """The numbers `info` prints, as a dict (also used by the scaling tools and tests)."""
  config_lib.validate(model)
  c = accounting.count(model)
  return {
      'total params': c.total_params,
      'active params': c.active_params,
      'active non-embedding params': c.active_params - c.embedding_params,
      f'forward FLOPs/token @ctx {context}': accounting.forward_flops_per_token(model, context),
      f'train FLOPs/token @seq {context}': accounting.train_flops_per_token(model, context),
      'INT4 weight bytes (g32, scales incl.)': accounting.int4_weight_bytes(model),
      'INT4 bytes read per decoded token': accounting.active_int4_bytes_per_token(model),
      f'KV-cache bytes @ctx {context}': accounting.kv_cache_bytes(model, context, kv_bytes),
  }


PRESET_FILES = {'mobilellm_pro': 'configs/mobilellm_pro.py', 'mobilemoe_s': 'configs/mobilemoe_s.py',
                'mobilemoe_m': 'configs/mobilemoe_m.py', 'mobilemoe_l': 'configs/mobilemoe_l.py',
                'tiny:dense': 'configs/tiny.py:dense', 'tiny': 'configs/tiny.py:moe'}


def presets():
  """name -> config of every preset in configs/ (tiny in both variants), read by path."""
  return {name: config_lib.load_file(spec) for name, spec in PRESET_FILES.items()}


def main(argv):
  del argv
  f = flags.FLAGS
  configs = {'config': f.config} if f.config is not None else presets()
  table = {name: describe(cfg.model, f.context, f.kv_bytes) for name, cfg in configs.items()}
  names = list(table)
  rows = list(next(iter(table.values())))
  width = max(map(len, rows))
  # Exact integers with thousands separators: the counts are compared digit for digit with
  # the released checkpoints' (configs/mobilemoe_s.py).
  cells = {n: {r: f'{table[n][r]:,}' for r in rows} for n in names}
  col = max(len(x) for n in names for x in [n, *cells[n].values()]) + 2
  print(' ' * width + ''.join(f'{n:>{col}}' for n in names))
  for r in rows:
    print(f'{r:<{width}}' + ''.join(f'{cells[n][r]:>{col}}' for n in names))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
