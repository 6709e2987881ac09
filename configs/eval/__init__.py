"""Evaluation suites: `--suite=configs/eval/suite.py[:ARG]` for `python -m mobilemoe_jax.eval`."""
