"""The paper-style evaluation suite: 14 lm-evaluation-harness tasks, shots and reported metrics.

  python -m mobilemoe_jax.eval --checkpoint=runs/demo/ckpt --tasks=suite
  python -m mobilemoe_jax.eval --checkpoint=... --suite=configs/eval/suite.py:quick --tasks=suite

Each entry names the lm_eval task, the few-shot count, the metric reported in the table
(`metric,filter` as lm_eval keys its results) and the Hugging Face dataset repos the task
reads. Nothing downloads at run time: each repo must be in `data_dir/<repo>` or in the
pre-populated HF cache (see mobilemoe_jax/eval/tasks.py for the layout and
`python -m mobilemoe_jax.eval.fetch` to fill it on a machine with internet).

Shot counts follow the common small-LM practice (MobileLLM, Llama reports): zero-shot
commonsense tasks scored by length-normalised log-likelihood where lm_eval defines acc_norm,
5-shot MMLU / GSM8K / TriviaQA / NQ, zero-shot MATH-500 (its lm_eval task has no few-shot split).
"""
import ml_collections


def _task(name, shots, metric, repos, kind):
  return ml_collections.ConfigDict(dict(
      name=name,        # lm_eval task or group name
      shots=shots,      # few-shot examples in the prompt
      metric=metric,    # the results key reported in the table
      repos=repos,      # HF dataset repos the task loads (the data to pre-populate)
      kind=kind,        # 'loglikelihood' (multiple choice) or 'generate' (free-form answer)
  ))


TASKS = [
    # Commonsense and knowledge: multiple choice, scored by log-likelihood of each choice.
    _task('arc_easy', 0, 'acc_norm,none', ['allenai/ai2_arc'], 'loglikelihood'),
    _task('arc_challenge', 0, 'acc_norm,none', ['allenai/ai2_arc'], 'loglikelihood'),
    _task('boolq', 0, 'acc,none', ['aps/super_glue'], 'loglikelihood'),
    _task('piqa', 0, 'acc_norm,none', ['baber/piqa'], 'loglikelihood'),
    _task('social_iqa', 0, 'acc,none', ['allenai/social_i_qa'], 'loglikelihood'),
    _task('hellaswag', 0, 'acc_norm,none', ['Rowan/hellaswag'], 'loglikelihood'),
    _task('openbookqa', 0, 'acc_norm,none', ['allenai/openbookqa'], 'loglikelihood'),
    _task('winogrande', 0, 'acc,none', ['allenai/winogrande'], 'loglikelihood'),
    _task('commonsense_qa', 0, 'acc,none', ['tau/commonsense_qa'], 'loglikelihood'),
    _task('mmlu', 5, 'acc,none', ['cais/mmlu'], 'loglikelihood'),
    # Reasoning / math: greedy generation, answer extracted and matched exactly.
    _task('gsm8k', 5, 'exact_match,strict-match', ['openai/gsm8k'], 'generate'),
    # hendrycks_math500 needs no extra packages; minerva_math500 (4-shot, math_verify) needs
    # `pip install lm-eval[math]`.
    _task('hendrycks_math500', 0, 'exact_match,none', ['HuggingFaceH4/MATH-500'], 'generate'),
    # Closed-book knowledge: short greedy answers, exact match against the aliases.
    _task('triviaqa', 5, 'exact_match,remove_whitespace', ['mandarjoshi/trivia_qa'], 'generate'),
    _task('nq_open', 5, 'exact_match,remove_whitespace',
          ['google-research-datasets/nq_open'], 'generate'),
]


def get_config(arg: str = 'full'):
  """'full': every example; 'quick': the first 100 per task (smoke runs, not for reporting)."""
  if arg not in ('full', 'quick'):
    raise ValueError(f"configs/eval/suite.py takes 'full' or 'quick', got {arg!r}")
  c = ml_collections.ConfigDict()
  c.tasks = [t.to_dict() for t in TASKS]
  c.limit = 0 if arg == 'full' else 100   # examples per task; 0 = all
  c.batch_size = 16                        # rows per forward pass (JAX backend)
  c.max_gen_toks = 256                     # cap on generated tokens per answer
  c.data_dir = ''                          # local dataset mirror; '' = $MOBILEMOE_EVAL_DATA
  return c
