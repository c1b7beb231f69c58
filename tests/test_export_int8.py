"""int8 keeps quality: a student fine-tuned on a small GLUE-style task, exported with
`--format=onnx --quantize=int8`, scores within one point of its fp32 ONNX export's accuracy on
the task's dev set through ONNX Runtime, and the fp32 export reproduces the accuracy the run
measured in Flax. The dev set is scored through `mbert_jax.interop.predict`, i.e. tokenized from the
export's own files as a user's inputs are.

Needs the `onnx` extra (CI installs it)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from conftest import INT8_DEV_ROWS
from export_util import run_module
from mbert_jax.interop import export
from mbert_jax.interop import predict
from mbert_jax.interop import onnx_export as ox

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op"),
              pytest.mark.filterwarnings("ignore:# The axis name"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

N_DEV = INT8_DEV_ROWS


@pytest.fixture(scope="module")
def run(sst2_run):
  return sst2_run


def _dev(data_dir: str) -> tuple[list[predict.Example], np.ndarray]:
  with open(os.path.join(data_dir, "dev.tsv"), newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  return [predict.Example(r["sentence"]) for r in rows], np.array([int(r["label"]) for r in rows])


def _accuracy(model_dir: str, data_dir: str) -> tuple[float, np.ndarray]:
  examples, labels = _dev(data_dir)
  model = predict.load(model_dir, backend="onnx")
  ids = np.array([r["label_id"] for r in predict.predict(model, examples, batch_size=64)])
  return float(np.mean(ids == labels)), ids


def test_int8_scores_within_one_point_of_fp32(run):
  root = run["root"]
  fp32_dir, int8_dir = str(root / "fp32"), str(root / "int8")
  export.export(run["workdir"], "onnx", fp32_dir)
  proc = run_module("mbert_jax.export", f"--workdir={run['workdir']}", "--format=onnx",
                    "--quantize=int8", f"--out={int8_dir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["quantize"] == "int8"

  # The int8 file really computes its dense layers with integer matmuls.
  q_path = os.path.join(int8_dir, ox.ONNX_FILE)
  ops = ox.op_inventory(q_path)
  assert ops["MatMulInteger"] >= len(ox.float_dense_layers(os.path.join(fp32_dir, ox.ONNX_FILE)))
  assert ox.float_dense_layers(q_path) == []
  io = json.load(open(os.path.join(int8_dir, ox.IO_FILE)))
  assert io["quantization"] == "int8" and io["bytes"] == os.path.getsize(q_path)
  assert io["bytes"] < 0.7 * os.path.getsize(os.path.join(fp32_dir, ox.ONNX_FILE))

  flax_acc = run["report"]["eval"]["eval/validation/accuracy"]
  fp32_acc, fp32_ids = _accuracy(fp32_dir, run["data"])
  int8_acc, int8_ids = _accuracy(int8_dir, run["data"])
  print(f"dev accuracy: flax {flax_acc:.4f}, onnx fp32 {fp32_acc:.4f}, onnx int8 {int8_acc:.4f}, "
        f"int8 agrees with fp32 on {np.mean(int8_ids == fp32_ids):.4f}")
  assert 0.6 < flax_acc < 1.0, "the toy task should be learnt, not saturated"
  assert abs(fp32_acc - flax_acc) <= 1.0 / N_DEV + 1e-9  # at most one near-tie flips
  assert abs(int8_acc - fp32_acc) <= 0.01 + 1e-9
  card = open(os.path.join(int8_dir, "README.md")).read()
  assert "int8, dynamic quantization" in card and f"{flax_acc:.4f}" in card
