"""Model presets as ml_collections configs: `--config=configs/NAME.py[:ARG]`."""
