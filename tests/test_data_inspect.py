"""The data-inspection command, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import numpy as np

from mbert_jax.data import build_pipeline, default_data_config
from mbert_jax.data.preview import batch_statistics, inspect_pipeline

datasets.disable_progress_bars()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [
    "The interpreter reads a line of input.", "It parses the line into tokens.",
    "Each statement is executed in turn.", "Errors are reported with a traceback.",
    "Names are bound in the local namespace.", "Functions create a new scope when called.",
    "Modules are loaded once and then cached.", "Classes bundle data and behaviour together.",
]


def write_corpus(path) -> str:
  docs = ["\n".join(SENTENCES[(i + j) % 8] for j in range(7)) for i in range(40)]
  path.write_text("\n\n".join(docs) + "\n")
  return str(path)


def write_config(path, source: str) -> str:
  path.write_text(
      "import ml_collections\n"
      "from mbert_jax.data.config import default_data_config\n\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.data = default_data_config()\n"
      f"  c.data.source = {source!r}\n"
      "  c.data.vocab = 'train:120'\n"
      "  c.data.num_proc = 1\n"
      "  c.data.max_seq_length = 48\n"
      "  c.data.max_predictions_per_seq = 8\n"
      "  return c\n")
  return str(path)


def test_inspect_command_prints_one_json_object(tmp_path):
  cfg = write_config(tmp_path / "cfg.py", write_corpus(tmp_path / "c.txt"))
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  result = subprocess.run(
      [sys.executable, "-m", "mbert_jax.data.inspect", f"--config={cfg}",
       "--config.data.batch_size=8", f"--workdir={tmp_path / 'w'}", "--show=2", "--batches=5"],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout)
  for key in ("documents", "skipped_documents", "examples", "mask_rate", "mask_token_rate",
              "random_token_rate", "kept_token_rate", "nsp_random_rate", "mean_real_tokens",
              "examples_per_second"):
    assert key in report, key
  assert report["batch_size"] == 8 and report["examples_measured"] == 40
  assert report["documents"] >= 30 and report["examples_per_second"] > 0
  assert abs(report["mask_token_rate"] + report["random_token_rate"]
             + report["kept_token_rate"] - 1) < 1e-9
  shown = report["shown"]
  assert len(shown) == 2 and shown[0]["segment_a"] and shown[0]["segment_b"]
  assert "[MASK]" in " ".join(s["masked_input"] for s in shown)


def test_batch_statistics_on_a_known_batch():
  batch = {
      "input_ids": np.array([[2, 4, 9, 7, 3, 0], [2, 8, 4, 3, 5, 3]], np.int32),
      "attention_mask": np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], np.int32),
      "masked_lm_positions": np.array([[1, 2, 0], [1, 2, 4]], np.int32),
      "masked_lm_ids": np.array([[6, 9, 0], [11, 12, 5]], np.int32),
      "masked_lm_weights": np.array([[1, 1, 0], [1, 1, 1]], np.float32),
      "next_sentence_labels": np.array([1, 0], np.int32),
  }
  s = batch_statistics([batch], mask_id=4)
  assert s["mask_rate"] == 5 / 11
  assert s["mask_token_rate"] == 2 / 5  # positions (0,1) and (1,2)
  assert s["kept_token_rate"] == 2 / 5  # (0,2) kept 9, (1,4) kept 5
  assert s["random_token_rate"] == 1 / 5  # (1,1): 8 instead of 11
  assert s["nsp_random_rate"] == 0.5 and s["mean_real_tokens"] == 5.5


def test_inspect_pipeline_eval_split(tmp_path):
  c = default_data_config()
  c.source, c.vocab, c.num_proc = write_corpus(tmp_path / "c.txt"), "train:120", 1
  c.max_seq_length, c.max_predictions_per_seq, c.batch_size = 48, 8, 4
  c.eval_fraction = 0.2
  report = inspect_pipeline(build_pipeline(c, str(tmp_path), split="eval"), batches=3)
  assert report["split"] == "eval" and report["static_masking"] is True
  assert 0 < report["mask_rate"] < 0.3


def run_inspect(tmp_path, source: str) -> subprocess.CompletedProcess:
  cfg = write_config(tmp_path / "cfg.py", source)
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run(
      [sys.executable, "-m", "mbert_jax.data.inspect", f"--config={cfg}",
       f"--workdir={tmp_path / 'w'}", "--batches=2"],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)


def test_inspect_reports_where_the_tokens_went(tmp_path):
  result = run_inspect(tmp_path, write_corpus(tmp_path / "c.txt"))
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout)
  acc = report["token_accounting"]
  assert acc["tokens_read"] == report["tokens"] > 0
  assert acc["tokens_used"] + sum(acc["tokens_dropped"].values()) == acc["tokens_read"]
  assert acc["examples"] == report["examples"]
  (choice,) = report["sentence_splitters"]
  assert choice["setting"] == "auto" and choice["splitter"] == "lines"


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stdout == ""
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last, result.stderr[-2000:]


def test_inspect_on_an_empty_corpus_is_one_line_and_exit_2(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  assert_one_line_error(run_inspect(tmp_path, str(tmp_path / "empty.txt")), "empty corpus")
  (tmp_path / "blank.txt").write_text("\n\n   \n")
  assert_one_line_error(run_inspect(tmp_path, str(tmp_path / "blank.txt")), "empty corpus")


def test_inspect_on_a_binary_file_is_one_line_and_exit_2(tmp_path):
  (tmp_path / "data.bin").write_bytes(np.random.default_rng(0).bytes(100_000))
  assert_one_line_error(run_inspect(tmp_path, str(tmp_path / "data.bin")), "is not text")
