"""experiments/teacher_cache_k.py without training: its arguments, the fork of the prefix run,
the table and the plot from synthetic results, and the refusal of a demo without a teacher."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def exp():
  spec = importlib.util.spec_from_file_location(
      "teacher_cache_k", os.path.join(ROOT, "experiments", "teacher_cache_k.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_ks_parse_with_vocab_and_refuse_what_cannot_be_cached(exp):
  assert exp.parse_ks("64,8,vocab,8", 2048) == [8, 64, 2048]
  with pytest.raises(SystemExit, match="k must be in 1..2048"):
    exp.parse_ks("4096", 2048)
  with pytest.raises(SystemExit, match="names no k"):
    exp.parse_ks(",", 2048)


def test_fork_copies_the_prefix_without_its_finished_marker(exp, tmp_path):
  prefix, arm = tmp_path / "prefix", tmp_path / "arm"
  (prefix / "checkpoints" / "200").mkdir(parents=True)
  (prefix / "checkpoints" / "200" / "state").write_text("weights")
  (prefix / "final.json").write_text("{}")
  (prefix / "metrics.jsonl").write_text('{"step": 200}\n')
  exp.fork(str(prefix), str(arm))
  assert (arm / "checkpoints" / "200" / "state").read_text() == "weights"
  assert (arm / "metrics.jsonl").exists() and not (arm / "final.json").exists()
  (arm / "metrics.jsonl").write_text("trained on")
  exp.fork(str(prefix), str(arm))  # an existing arm is resumed, never overwritten
  assert (arm / "metrics.jsonl").read_text() == "trained on"


def test_table_and_plot_from_results(exp, tmp_path):
  def report(acc):
    return {"eval": {"eval/mlm_accuracy": acc, "eval/mlm_loss": 5.1}, "teacher_loaded": False}
  rows = [exp.row("online", None, report(0.14), 40.0, None, 2048)]
  rows += [exp.row(f"k{k}", k, report(0.14 + 0.001 * i), 30.0,
                   {"bytes_per_sequence": 30.0 * k, "seconds": 5.0}, 2048)
           for i, k in enumerate((8, 64, 2048))]
  md = exp.markdown(rows, 2048, 28, 32)
  lines = [line for line in md.splitlines() if line.startswith("| ")]
  assert len(lines) == 1 + len(rows)
  assert "| k64 | 64 | 0.1410 | +0.10 |" in md and "| k2048 | V |" in md
  path = tmp_path / "k.png"
  exp.plot(rows, 2048, str(path))
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 10_000
  json.dumps(rows)  # results.json takes them as they are


def test_a_demo_without_a_finished_teacher_is_refused(exp, tmp_path):
  with pytest.raises(SystemExit, match="not a finished teacher run; run the demo first"):
    exp.demo_student(str(tmp_path / "no_demo"))
