"""What every stage config shares: the preset table, the `train` section and its defaults,
the `data` section, and the parsing of the `:arg` string.

The arg is `PRESET[,key=value...]`: `tiny`, `mobilemoe_s`, `tiny,data_dir=/tmp/data`.
Known keys: data_dir (where `python -m mobilemoe_jax.data.build` wrote the bundled data).
"""
import ml_collections

from configs import mobilellm_pro, mobilemoe_l, mobilemoe_m, mobilemoe_s, tiny
from configs.prerelease import mobilemoe_l as prerelease_l
from configs.prerelease import mobilemoe_m as prerelease_m
from configs.prerelease import mobilemoe_s as prerelease_s
from mobilemoe_jax.config import experiment, mesh_config
from mobilemoe_jax.data import pipeline

# An explicit table, not an import by name: a typo is a KeyError listing the choices.
PRESETS = {
    'tiny': lambda: tiny.get_config('moe'),
    'tiny_dense': lambda: tiny.get_config('dense'),
    'mobilemoe_s': mobilemoe_s.get_config,
    'mobilemoe_m': mobilemoe_m.get_config,
    'mobilemoe_l': mobilemoe_l.get_config,
    'mobilellm_pro': mobilellm_pro.get_config,
    # The shapes designed before the release (configs/prerelease/__init__.py says why kept).
    'prerelease_s': prerelease_s.get_config,
    'prerelease_m': prerelease_m.get_config,
    'prerelease_l': prerelease_l.get_config,
}


def parse_arg(arg: str) -> tuple[str, dict]:
  preset, *pairs = arg.split(',')
  if preset not in PRESETS:
    raise KeyError(f'unknown model preset {preset!r}; choose from {sorted(PRESETS)}')
  opts = {'data_dir': 'data'}
  for pair in pairs:
    key, _, value = pair.partition('=')
    if key not in opts:
      raise KeyError(f'unknown stage option {key!r} in {arg!r}; known: {sorted(opts)}')
    opts[key] = value
  return preset, opts


def is_small(preset: str) -> bool:
  """The CPU demo presets: short stages sized for 2 cores."""
  return preset.startswith('tiny')


def train_config(stage: str, small: bool, **overrides) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.stage = stage                 # name recorded in the checkpoint lineage
  t.seed = 0                      # model init, data order and the state's RNG key
  t.steps = 300 if small else 100_000
  t.batch_size = 16 if small else 256   # global rows per step (split over processes)
  t.seq_len = 128 if small else 2048
  t.grad_accum = 1                # micro-batches per step (batch_size % grad_accum == 0)
  t.lr = 3e-3 if small else 3e-4
  t.schedule = 'wsd'              # 'wsd' | 'cosine' | 'constant'
  t.warmup_steps = 30 if small else 2000
  t.decay_fraction = 0.2          # wsd: share of post-warmup steps spent decaying
  t.min_lr_ratio = 0.1            # final lr = lr * min_lr_ratio
  t.weight_decay = 0.1            # AdamW, decoupled; never applied to 1-D params
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.clip_norm = 1.0               # global-norm clipping; 0 = off
  t.adam_mu_dtype = ''            # AdamW first-moment dtype; '' = fp32 like the params (optim.py)
  t.on_nonfinite = 'stop'         # 'stop': fail with the last good checkpoint | 'skip'
  t.log_every = 25 if small else 100
  t.eval_every = 100 if small else 2000
  t.eval_batches = 8 if small else 64   # held-out batches per evaluation; 0 = none
  t.checkpoint_every = 100 if small else 1000
  t.keep_checkpoints = 2          # keep-last-K
  t.async_checkpoints = True      # save in the background while training continues
  t.init_from = ''                # previous stage's checkpoints dir (or a step dir); '' = scratch
  t.restore_optimizer = False     # with init_from: also take its optimizer state
  t.progress = True               # tqdm progress bar
  # Cross-entropy over this many positions (of every row) at a time, never all [B, T, V]
  # logits (train/loss.py); 0 = off. On by default for the full-size presets: on an H200,
  # MobileMoE-S at 8 x 2048 took 97.2 ms per step instead of 99.4 and 31.8 instead of 46.6 GiB
  # (bench/README.md). The CPU demo presets keep the full-logits loss. Ignored (unchunked)
  # with distill_weight: the KL needs the student's full logits.
  t.loss_chunk_len = 0 if small else 512
  # With loss_chunk_len: each chunk's exponentials in one pass (the gradient from the softmax
  # numerators and their sum, train/loss.py); False: logsumexp, then the softmax again. Same
  # math; on an H200, MobileMoE-S at 256 x 2048 (8 x 32 accumulated) took 2260.5 ms per step
  # instead of 2340.6 (bench/README.md, call 13).
  t.loss_exp_once = True
  t.distill_weight = 0.0          # QAT: weight of KL(float teacher || fake-quant model); 0 = off
  t.distill_temperature = 1.0
  t.update(overrides)
  return t


def data_config(stage: str, data_dir: str) -> ml_collections.ConfigDict:
  """`train` and `eval` inputs in the data package's schema (mobilemoe_jax/data/pipeline.py)."""
  stage = {'qat': 'sft'}.get(stage, stage)     # QAT trains on the SFT chats
  eval_stage = 'sft_eval' if stage == 'sft' else 'eval'
  return ml_collections.ConfigDict({
      'train': pipeline.bundled_data_config(data_dir, stage),    # sources, weights, tokenizer
      'eval': pipeline.bundled_data_config(data_dir, eval_stage),  # one unshuffled pass
  })


def stage_config(stage: str, arg: str, **train_overrides) -> ml_collections.ConfigDict:
  preset, opts = parse_arg(arg)
  base = PRESETS[preset]()
  return experiment(
      base.model,
      mesh=mesh_config(),
      train=train_config(stage, is_small(preset), **train_overrides),
      data=data_config(stage, opts['data_dir']),
  )
