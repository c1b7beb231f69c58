"""benchmarks/inference_latency.py on a fine-tuned run (`--run`): every contender timed on the
run's own weights and scored on its dev set, the accuracy printed next to the latency; a workdir
it cannot score is refused in one line before anything is exported. Timings here are not
results (tiny model, busy CI machine): the test pins what the report holds, not the figures."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import INT8_DEV_ROWS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "inference_latency.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import inference_latency  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:# The axis name"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def result(sst2_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("latency"))
  return inference_latency.main([f"--run={sst2_run['workdir']}", "--shapes=2x32",
                                 "--threads=1", "--rounds=2", "--calls=1", "--allow_busy",
                                 f"--out={out}"])


def test_every_contender_is_scored_on_the_run_s_dev_set(result, sst2_run):
  dev = result["dev"]
  assert dev["task"] == "sst2" and dev["rows"] == INT8_DEV_ROWS and result["run"]
  acc = dev["accuracy"]
  assert set(acc) == set(result["runs"][0]["stats"])  # the contenders that were timed
  reported = sst2_run["report"]["eval"]["eval/validation/accuracy"]
  assert dev["run_reported"] == reported
  # fp32 paths reproduce what the run measured in Flax (a near-tie may flip one row).
  for name in ("onnxruntime_fp32", "torch_eager", "flax_jit"):
    assert abs(acc[name] - reported) <= 1.0 / INT8_DEV_ROWS + 1e-9, (name, acc)
  assert 0.6 < reported < 1.0, "the toy task should be learnt, not saturated"
  for name in ("onnxruntime_int8", "onnxruntime_int8_dynamic", "torch_dynamic_int8"):
    assert abs(acc[name] - acc["onnxruntime_fp32"]) <= 0.02 + 1e-9, (name, acc)


def test_the_timed_model_is_the_run_s(result):
  run = result["runs"][0]
  assert (run["batch"], run["seq"], run["threads"]) == (2, 32, 1)
  assert all(s["median_ms"] > 0 for s in run["stats"].values())
  assert run["logit_error_vs_torch_eager"]["onnxruntime_fp32"] < 1e-3
  assert run["ratio_if_trusted"] > 0
  assert run["aim"] is None  # the aims are for the full-size MobileBERT, not a micro run
  assert result["export"]["onnxruntime_int8"]["integer_matmuls"] > 0
  assert result["int8_size_ratio"] < 0.7


@pytest.mark.parametrize("make, message", [
    (lambda tmp: str(tmp / "missing"), "missing"),
    (lambda tmp: str(tmp), "--run"),
])
def test_a_workdir_it_cannot_score_is_one_line(tmp_path, make, message):
  proc = subprocess.run([sys.executable, SCRIPT, f"--run={make(tmp_path)}", "--rounds=1"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last and "Traceback" not in proc.stderr
  assert "fp32 export" not in proc.stdout  # refused before anything was exported
