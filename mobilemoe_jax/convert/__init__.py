"""Conversion between our checkpoints and the released MobileMoE (`model_type: mobilemoe`)."""
