"""Data: the bundled corpus, tokenizers and the Grain input pipeline.

  python -m mobilemoe_jax.data.build --out data/      # corpus, ArrayRecord, TFDS, tokenizer, chat

  from mobilemoe_jax.data import pipeline
  cfg = pipeline.bundled_data_config("data", "pretrain")   # or midtrain / sft / eval / sft_eval
  ds = pipeline.make_dataset(cfg, seq_len=256, batch_size=8, seed=0)
  it = iter(ds); batch = next(it)                          # {inputs, targets, segment_ids,
  state = it.get_state(); it.set_state(state)              #  positions, loss_mask}: [B, T]

Modules: `corpus` (documents from the Python standard library, the train / validation split,
chat records), `tokenizer` (SentencePiece or HF tokenizer.json, chat template), `tfds_builder`
(the corpus as TFDS `mobilemoe_corpus`), `pipeline` (Grain), `build` (the command above),
`integrity` (DataError, the build's SHA256SUMS), `verify` (`python -m mobilemoe_jax.data.verify
data/`: every bad file and record of a data directory).
Nothing is imported here, so `python -m ...build` does not pay for Grain or JAX.
"""
