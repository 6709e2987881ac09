"""Training stages: `--config=configs/stages/STAGE.py:PRESET[,data_dir=DIR]`."""
