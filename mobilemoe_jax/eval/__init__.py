"""Evaluation through lm-evaluation-harness, for JAX checkpoints and exported `.tflite` models."""
