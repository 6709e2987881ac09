"""Evaluation through lm-evaluation-harness, for JAX checkpoints and exported `.tflite` models.

  python -m mobilemoe_jax.eval --checkpoint=runs/sft/checkpoints --tasks=suite --out=runs/eval
  python -m mobilemoe_jax.eval --checkpoint=model.tflite --backend=tflite --tokenizer=T --tasks=local

  from mobilemoe_jax.eval.run import run_local_eval
  run_local_eval(model, tokenizer)      # the pipeline's closing step -> {'acc', 'acc_norm', ...}

Modules: `base` (lm_eval request plumbing shared by both backends), `jax_lm` (JaxLM, registered
as 'mobilemoe-jax'), `tasks` (suite specs, local tasks, where benchmark data must be: no
downloads), `run` (evaluate, JSON + markdown reports), `fetch` (fill the data on a machine with
internet). The `.tflite` backend (TFLiteLM, 'mobilemoe-tflite') sits above, in export/tflite_lm.py,
beside the runner it drives; checkpoints load through mobilemoe_jax/train/loading.py. The suite itself is configs/eval/suite.py.
Nothing is imported here, so `python -m mobilemoe_jax.eval` pays for JAX only when needed.
"""
