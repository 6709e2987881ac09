"""The bundled corpus as a TFDS dataset, `mobilemoe_corpus`, built from our local ArrayRecord files.

Importing this module registers the builder. It never downloads: the source files come in
through TFDS's manual_dir, and the prepared dataset is written in the array_record format so
`tfds.data_source("mobilemoe_corpus", data_dir=..., split="train")` gives random access
(which is what Grain needs). Examples are {"title": bytes, "text": bytes}.
"""

import glob
import os

import tensorflow_datasets as tfds

from mobilemoe_jax.data import corpus

NAME = "mobilemoe_corpus"


class MobilemoeCorpus(tfds.core.GeneratorBasedBuilder):
  """Python standard library prose; see `mobilemoe_jax.data.corpus`."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Run `python -m mobilemoe_jax.data.build --out data/`; manual_dir is <out>/corpus."
  )
  # No URLs to checksum. Without this TFDS looks for a checksums file beside the code, through
  # `importlib_resources`, which not every environment installs.
  url_infos = None

  def _log_download_done(self):
    pass   # TFDS's "downloaded and prepared to ..." line: the build prints its own summary

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs() wants metadata files beside the module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {"title": tfds.features.Text(), "text": tfds.features.Text()}
        ),
    )

  def _split_generators(self, dl_manager):
    src = os.fspath(dl_manager.manual_dir)
    return {
        split: self._generate_examples(sorted(glob.glob(os.path.join(src, f"{split}-*.array_record"))))
        for split in ("train", "validation")
    }

  def _generate_examples(self, paths):
    from array_record.python.array_record_module import ArrayRecordReader

    if not paths:
      raise FileNotFoundError("no corpus ArrayRecord files in the manual_dir; run the build first")
    for path in paths:
      reader = ArrayRecordReader(path)
      try:
        for i in range(reader.num_records()):
          doc = corpus.decode_record(reader.read([i])[0], f"{path} record {i}")
          # Keys must be unique and stable; TFDS orders examples by a hash of the key.
          yield f"{os.path.basename(path)}:{i}", {"title": doc.get("title", ""), "text": doc["text"]}
      finally:
        reader.close()


def prepare(corpus_dir: str, data_dir: str) -> str:
  """Builds (or finds up to date) the TFDS dataset; returns its directory."""
  # The build shows one progress bar and a summary; TFDS's nested bars would break it up.
  tfds.disable_progress_bar()
  builder = MobilemoeCorpus(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=corpus_dir),
  )
  return os.fspath(builder.data_path)
