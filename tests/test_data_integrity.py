"""Damaged data is named: the build's checksums fail a changed file at start-up, a bad
ArrayRecord / TFDS record names its file and index, a bad JSONL line its file and line, and
`python -m mobilemoe_jax.data.verify` lists every bad record of a data directory."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from mobilemoe_jax.data import build, integrity, pipeline, verify

T, B = 32, 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("data"))
  build.build(out, max_bytes=200_000, vocab_size=512, progress=False)
  return out


@pytest.fixture
def data(built, tmp_path):
  """A private copy of the built data, free to damage."""
  out = str(tmp_path / "data")
  shutil.copytree(built, out)
  return out


def _flip(path, offset=5000):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))


def _shard(data):
  return build.paths(data)["train"][0]


def _read_all(data, stage="pretrain"):
  cfg = pipeline.bundled_data_config(data, stage)
  cfg.shuffle, cfg.num_epochs = False, 1   # one pass over every record
  return list(pipeline.make_dataset(cfg, seq_len=T, batch_size=B, seed=0,
                                    process_index=0, process_count=1))


def test_build_writes_checksums_of_every_file(built):
  p = build.paths(built)
  for directory in (p["corpus_dir"], os.path.dirname(p["chat_train"]), os.path.dirname(p["tokenizer"])):
    sums = integrity.read_sums(directory)
    assert set(sums) == {n for n in os.listdir(directory) if n != integrity.SUMS}
    for name, digest in sums.items():
      assert integrity.sha256(os.path.join(directory, name)) == digest
  records, problems = verify.verify(built)
  assert problems == [] and records > 1000


def test_changed_shard_fails_at_start_up_naming_it(data):
  _flip(_shard(data))
  cfg = pipeline.bundled_data_config(data, "pretrain")
  with pytest.raises(integrity.DataError, match=rf"{_shard(data)}: sha256 differs"):
    pipeline.make_dataset(cfg, seq_len=T, batch_size=B, seed=0, process_index=0, process_count=1)


def test_bit_flipped_shard_names_file_and_record(data):
  """Without checksums (data not from the build) the damage shows when the record is read."""
  os.remove(os.path.join(build.paths(data)["corpus_dir"], integrity.SUMS))
  _flip(_shard(data))
  with pytest.raises(integrity.DataError, match=rf"{_shard(data)} record \d+: unreadable record "
                                                 r"\(RuntimeError: Corrupted Riegeli"):
    _read_all(data)


def test_truncated_shard_names_the_file(data):
  os.remove(os.path.join(build.paths(data)["corpus_dir"], integrity.SUMS))
  os.truncate(_shard(data), os.path.getsize(_shard(data)) // 2)
  with pytest.raises(integrity.DataError, match=rf"{_shard(data)}: unreadable ArrayRecord file"):
    _read_all(data)


def test_bad_tfds_record_names_dataset_and_record(data):
  version_dir = os.path.join(build.paths(data)["tfds_dir"], "mobilemoe_corpus", "1.0.0")
  os.remove(os.path.join(version_dir, integrity.SUMS))
  _flip(os.path.join(version_dir, "mobilemoe_corpus-train.array_record-00000-of-00001"))
  source = pipeline.TfdsTextSource("mobilemoe_corpus", build.paths(data)["tfds_dir"])
  with pytest.raises(integrity.DataError, match=r"tfds 'mobilemoe_corpus' split 'train' .* record \d+: "
                                                 r"unreadable record"):
    for i in range(len(source)):
      source[i]


def test_non_utf8_jsonl_names_file_and_line(tmp_path, built):
  path = tmp_path / "chat.jsonl"
  ok = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
  path.write_bytes(ok + b"\n" + ok[:30] + b"\xff\xfe" + ok[30:] + b"\n")
  with pytest.raises(integrity.DataError, match=r"chat\.jsonl line 2 .*not UTF-8"):
    pipeline.load_chat_jsonl(str(path))


def test_verify_lists_every_bad_record(data):
  p = build.paths(data)
  _flip(_shard(data), 5000)
  _flip(_shard(data), 60000)
  with open(p["chat_validation"], "rb") as f:
    lines = f.read().split(b"\n")
  lines[2] = b"{not json"
  with open(p["chat_validation"], "wb") as f:
    f.write(b"\n".join(lines))
  _, problems = verify.verify(data)
  assert sum(f"{_shard(data)} record" in x for x in problems) == 2, problems
  assert any(f"{p['chat_validation']} line 3" in x for x in problems), problems
  assert sum("sha256 differs" in x for x in problems) == 2, problems
  run = subprocess.run([sys.executable, "-m", "mobilemoe_jax.data.verify", data], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 1 and run.stdout.splitlines() == problems, run.stdout + run.stderr


def test_cli_train_on_damaged_data_exits_with_one_line(data, tmp_path):
  _flip(_shard(data))
  run = subprocess.run(
      [sys.executable, "-m", "mobilemoe_jax.train", f"--config=configs/stages/pretrain.py:tiny,data_dir={data}",
       f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
  assert run.stderr.strip().splitlines()[-1].startswith(f"error: {_shard(data)}: sha256 differs")
