"""The whole recipe in one command: build data -> pretrain -> midtrain -> SFT -> QAT ->
INT4 .tflite export -> generation through the MobileMoE delegate and through Google's
LiteRT-LM runtime (a .litertlm bundle) -> local eval -> summary.

  python -m mobilemoe_jax.pipeline                          # tiny, CPU, a few minutes
  python -m mobilemoe_jax.pipeline --workdir=runs/demo --config=configs/stages/pretrain.py:tiny
  python -m mobilemoe_jax.pipeline --workdir=runs/s --config=configs/stages/pretrain.py:mobilemoe_s \
      --config.train.batch_size=512 --config.mesh.fsdp=8

--config names the stage to start from and, after the colon, the arg every stage gets
(`PRESET[,data_dir=DIR]`, see configs/stages/common.py). `--config.a.b=value` overrides
apply to every stage (they share one schema); each stage's own fields (steps, lr, data)
come from its file. Stage k writes <workdir>/<stage> and starts from stage k-1's final
checkpoint. Rerunning resumes: finished stages are restored and not retrained.

Prints a summary table (train loss at the first and last step, held-out perplexity before
and after, wall time) and writes it to <workdir>/summary.json.
"""
import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from configs.stages import common, midtrain, pretrain, qat, sft

# The recipe, in order. Appending a stage (QAT, export, eval) is one line here.
STAGES = [
    ('pretrain', pretrain.get_config),
    ('midtrain', midtrain.get_config),
    ('sft', sft.get_config),
    ('qat', qat.get_config),
]


def _define_flags():
  """Only when run as a program, so importing `run` defines no flags."""
  flags.DEFINE_string('workdir', 'runs/demo', 'One subdirectory per stage, plus summary.json.')
  config_flags.DEFINE_config_file(
      'config', 'configs/stages/pretrain.py:tiny',
      'The stage to start from, with the arg given to every stage; --config.x=y overrides all.',
      lock_config=True)


def stage_configs(first: str, arg: str, overrides: dict, workdir: str) -> list:
  """[(name, config)] from stage `first` on, overrides applied, each initialised from the
  previous stage's checkpoints unless its config says otherwise."""
  names = [name for name, _ in STAGES]
  if first not in names:
    raise ValueError(f'--config must name one of the stage files {names}, got {first!r}')
  out = []
  for i, (name, get_config) in enumerate(STAGES):
    if i < names.index(first):
      continue
    config = get_config(arg)
    config.update_from_flattened_dict(overrides)
    if i > 0 and not config.train.init_from:
      config.train.init_from = os.path.join(workdir, names[i - 1], 'checkpoints')
    config.lock()
    out.append((name, config))
  return out


def format_table(rows: list[dict]) -> str:
  fmt = lambda v, spec: '-' if v is None else format(v, spec)
  lines = [f"{'stage':<10} {'steps':>6} {'loss start':>10} {'loss end':>9} "
           f"{'ppl start':>10} {'ppl end':>9} {'time (s)':>9}"]
  for r in rows:
    lines.append(f"{r['stage']:<10} {r['steps']:>6} {fmt(r['loss_start'], '.3f'):>10} "
                 f"{fmt(r['loss_end'], '.3f'):>9} {fmt(r['ppl_start'], '.1f'):>10} "
                 f"{fmt(r['ppl_end'], '.1f'):>9} {r['seconds']:>9.1f}")
  return '\n'.join(lines)


def ship(workdir: str, checkpoint: str, tokenizer_path: str) -> dict:
  """The on-device end of the recipe: exports `checkpoint` to an INT4 `.tflite` whose MoE
  blocks are MobileMoeBlock ops and whose attention is MobileKvAttention ops,
  generates a few tokens with LiteRT + our delegate, and scores the JAX model on the
  bundled local eval task."""
  from export import delegate, litertlm
  from export.__main__ import main as export_main
  from export.runner import LiteRTLM
  from mobilemoe_jax.train.loading import load_checkpoint
  from mobilemoe_jax.eval.run import run_local_eval

  path = os.path.join(workdir, 'model.tflite')
  report = os.path.join(workdir, 'export_report.json')
  # --litertlm: also a bundle for Google's LiteRT-LM runtime (stock builtins: it cannot load
  # our delegate), checked against the runner on 8 prompts by the export's verify.
  export_main(['--checkpoint', checkpoint, '--out', path, '--moe', 'delegate',
               '--attention', 'delegate', '--prefill', '32', '--kv-len', '128',
               '--litertlm', workdir, '--tokenizer', tokenizer_path, '--report', report])
  with open(report) as f:
    export_report = json.load(f)
  model, _, tok = load_checkpoint(checkpoint, tokenizer_path)
  dlg = delegate.load()
  lm = LiteRTLM(path, delegate=dlg)
  prompt = 'Return the number of'
  ids = lm.generate([tok.bos_id] + tok.encode(prompt), 24, temperature=0.7, top_k=40, seed=0,
                    eos_id=tok.eos_id)
  claimed = delegate.stats(dlg)['claimed']
  print(f'\n[.tflite + MobileMoE delegate, {claimed} MobileMoeBlock / MobileKvAttention nodes '
        f'claimed] {prompt}{tok.decode(ids)}')
  bundle = os.path.join(workdir, 'model.litertlm')
  engine = litertlm.Engine(bundle)
  lm.reset()
  ours = tok.decode(lm.generate([tok.bos_id] + tok.encode(prompt), 24, eos_id=tok.eos_id))
  theirs, speed = engine.generate(prompt, 24)
  engine.close()
  print(f'[LiteRT-LM runtime, {os.path.basename(bundle)}, greedy] {prompt}{theirs}\n'
        f'  same text as our runner\'s greedy tokens: {theirs == ours}')
  local_eval = run_local_eval(model, tok, out_dir=os.path.join(workdir, 'eval'))
  print(f"[local eval] {local_eval['task']}: acc {local_eval['acc']:.3f}, "
        f"acc_norm {local_eval['acc_norm']:.3f} (chance {local_eval['chance']:.3f}, "
        f"n={local_eval['n']})")
  return {'tflite': path, 'tflite_bytes': os.path.getsize(path), 'delegate_claimed': claimed,
          'export': export_report,
          'prompt': prompt, 'generated': tok.decode(ids),
          'litertlm': {'bundle': bundle, 'greedy': theirs, 'same_as_runner': theirs == ours,
                       'decode_tokens_per_s': speed['decode_tokens_per_s']},
          'local_eval': {k: local_eval[k] for k in ('task', 'acc', 'acc_norm', 'n', 'chance')}}


def run(workdir: str, first: str, arg: str, overrides: dict | None = None,
        build_data: bool = True, export: bool = False) -> dict:
  """Runs the pipeline; returns the summary also written to <workdir>/summary.json.
  build_data=False uses the data already at data_dir (tests build a smaller one);
  export=True ends with `ship` (the main job does)."""
  from mobilemoe_jax.data import build
  from mobilemoe_jax.train import train_and_evaluate

  start = time.time()
  _, opts = common.parse_arg(arg)
  os.makedirs(workdir, exist_ok=True)
  if build_data:
    build.build(opts['data_dir'])        # idempotent: returns at once when up to date
  summary = {'workdir': os.path.abspath(workdir), 'arg': arg, 'stages': [],
             'data_seconds': round(time.time() - start, 1)}
  preempted = False
  for name, config in stage_configs(first, arg, overrides or {}, workdir):
    t0 = time.time()
    result = train_and_evaluate(config, os.path.join(workdir, name))
    result['seconds'] = round(time.time() - t0, 1)
    summary['stages'].append(result)
    if result['preempted']:
      preempted = True
      print(f'pipeline: {name} was preempted; rerun the same command to resume.')
      break
  print('\n' + format_table(summary['stages']))
  if export and not preempted:
    t0 = time.time()
    summary['ship'] = ship(workdir, os.path.join(workdir, name, 'checkpoints'),
                           config.data.train.tokenizer)
    summary['ship']['seconds'] = round(time.time() - t0, 1)
  summary['total_seconds'] = round(time.time() - start, 1)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print(f"data {summary['data_seconds']} s, total {summary['total_seconds']} s; "
        f"summary in {os.path.join(workdir, 'summary.json')}")
  return summary


def main(argv):
  del argv
  from mobilemoe_jax.train import NonFiniteError
  # Orbax logs every file it writes at INFO; keep the console for progress and results.
  logging.set_verbosity(logging.WARNING)

  stage_file, _, arg = config_flags.get_config_filename(flags.FLAGS['config']).partition(':')
  first = os.path.splitext(os.path.basename(stage_file))[0]
  # The `--config.a.b=v` flags given, applied to every stage, not only the first.
  overrides = dict(config_flags.get_override_values(flags.FLAGS['config']))
  # Stages share shapes, so XLA's disk cache skips recompiling what an earlier stage or an
  # earlier run of this command already compiled (the eval step; everything on a rerun).
  import jax
  jax.config.update('jax_compilation_cache_dir', os.path.join(flags.FLAGS.workdir, 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  try:
    run(flags.FLAGS.workdir, first, arg or 'tiny', overrides, export=True)
  except NonFiniteError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
