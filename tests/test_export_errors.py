"""`python -m mbert_jax.export` refuses what it cannot do with one `error: ...` line and exit
status 2, before writing anything: unknown formats and quantization modes, quantization for a
format that has none, a run that has saved no checkpoint yet, a directory that is no run, a
task file of an unknown kind. (The IB-BERT teacher's refusal is in test_export.py, on a real
teacher run.)"""

from __future__ import annotations

import json
import os

import pytest

from export_util import error_line, run_module
from mbert_jax.models import preset


@pytest.fixture()
def started_run(tmp_path):
  """A workdir as a run leaves it before its first checkpoint."""
  d = tmp_path / "run"
  d.mkdir()
  (d / "model_config.json").write_text(json.dumps(preset("mobilebert_micro").to_dict()))
  (d / "config.json").write_text("{}")
  (d / "checkpoints").mkdir()
  return d


def _refused(tmp_path, *args: str) -> str:
  out = tmp_path / "out"
  proc = run_module("mbert_jax.interop.export", *args, f"--out={out}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stdout == ""
  assert not out.exists() or not os.listdir(out), os.listdir(out)
  return error_line(proc)


def test_unknown_format_and_quantization(started_run, tmp_path):
  w = f"--workdir={started_run}"
  assert "--format='tflite': choose one of hf, flax, onnx" in _refused(tmp_path, w,
                                                                       "--format=tflite")
  assert "--quantize='int4': choose one of none, int8" in _refused(
      tmp_path, w, "--format=onnx", "--quantize=int4")
  assert "--quantize=int8 applies to --format=onnx only" in _refused(
      tmp_path, w, "--format=hf", "--quantize=int8")


def test_run_without_checkpoint(started_run, tmp_path):
  msg = _refused(tmp_path, f"--workdir={started_run}", "--format=flax")
  assert "has no checkpoint to export" in msg and "holds no saved step" in msg
  os.rmdir(started_run / "checkpoints")
  assert "does not exist" in _refused(tmp_path, f"--workdir={started_run}", "--format=hf")


def test_not_a_run_and_unknown_task_kind(started_run, tmp_path):
  assert "not an mbert-jax run directory" in _refused(tmp_path, f"--workdir={tmp_path}",
                                                      "--format=flax")
  (started_run / "task.json").write_text(json.dumps({"kind": "ner"}))
  assert "task.json has kind='ner'" in _refused(tmp_path, f"--workdir={started_run}",
                                                "--format=flax")
