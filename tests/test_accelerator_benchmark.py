"""benchmarks/accelerator.py at --smoke on CPU: every case measured, the batch search, a forced
batch, the deadline, and one-line errors for bad arguments (the script runs in a subprocess, as
a user runs it; its last stdout line is the JSON record)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator.py")
SMOKE_CASES = ("scratch_32", "pd_32", "teacher_32", "pkt1_32", "pkt4_32", "scratch_64", "pd_64",
               "teacher_64")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the smoke size is for CPU, whatever the host
  return subprocess.run([sys.executable, SCRIPT, "--smoke", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def record(proc: subprocess.CompletedProcess) -> dict:
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def forced():
  """Every default case at a forced batch of 16."""
  proc = run("--batch", "16", "--warmup", "0", "--steps", "2", timeout=400)
  return proc, record(proc)


@pytest.mark.slow
def test_every_case_is_measured(forced):
  proc, rec = forced
  assert [c["case"] for c in rec["cases"]] == list(SMOKE_CASES)
  assert rec["skipped"] == [] and rec["failed"] == []
  assert rec["platform"] == "cpu" and rec["compute_dtype"] == "bfloat16"
  for c in rec["cases"]:
    assert c["step_s"] > 0 and c["examples_per_s"] > 0, c["case"]
    assert c["examples_per_s"] == pytest.approx(c["batch"] / c["step_s"])
    assert c["flops_per_example"] > 0 and c["model_flop_per_s"] > 0
    assert c["mfu"] is None  # no known CPU peak: never a made-up figure
    assert c["plan_bytes"] > 0
    if c["kind"] != "teacher":
      assert c["finite_last_step"], c["case"]
  by = {c["case"]: c for c in rec["cases"]}
  # The PD step runs the teacher forward inside it; truncation to one layer costs less.
  assert by["pd_32"]["flops_per_example"] > by["teacher_32"]["flops_per_example"]
  assert by["pkt1_32"]["flops_per_example"] < by["pkt4_32"]["flops_per_example"]
  assert (by["pkt1_32"]["layer"], by["pkt4_32"]["layer"]) == (1, 4)
  lines = proc.stdout.splitlines()
  for name in SMOKE_CASES:  # one table row per case, MFU shown as n/a
    row = [l for l in lines if l.startswith(name + " ")]
    assert row and "n/a" in row[-1], name
  assert any(l.startswith("what limits MFU") for l in lines)


@pytest.mark.slow
def test_forced_batch_is_kept(forced):
  _, rec = forced
  assert {(c["batch"], c["batch_source"]) for c in rec["cases"]} == {(16, "forced")}


def test_batch_search_picks_the_largest_batch_that_fits():
  limit_gib = 0.04
  rec = record(run("--cases", "scratch_32", "--mem_limit_gib", str(limit_gib), "--steps", "1"))
  (c,) = rec["cases"]
  s = c["search"]
  assert c["batch_source"] == "search" and c["batch"] % 8 == 0
  assert c["batch"] > s["probe_batch"]
  assert c["plan_bytes"] <= s["target_bytes"] <= 0.9 * limit_gib * 2**30
  if c["batch"] < rec["max_batch"]:  # the line through the compiled plans allows no much larger one
    (b0, n0), (b1, n1) = s["plans"][0], s["plans"][-1]
    slope = (n1 - n0) / (b1 - b0)
    largest = (s["target_bytes"] - n1) / slope + b1
    assert largest < max(1.1 * c["batch"], c["batch"] + 16) + 8


def test_deadline_skips_and_names_the_cases():
  proc = run("--cases", "scratch_32,pd_32", "--budget_s", "0.01")
  rec = record(proc)
  assert rec["cases"] == []
  assert [s["case"] for s in rec["skipped"]] == ["scratch_32", "pd_32"]
  assert "skipped scratch_32: budget" in proc.stdout


@pytest.mark.parametrize("args, expected", [
    (("--cases", "scratch_32,bogus"), "unknown case 'bogus'; valid cases: scratch_32, pd_32"),
    (("--cases", "pkt9_32"), "pkt<1..4>"),
    (("--cases", "pd_4096"), "unknown case 'pd_4096'"),
    (("--mem_fraction", "2"), "--mem_fraction=2.0 must be in (0, 1]"),
    (("--batch", "x"), "invalid int value"),
])
def test_bad_arguments_fail_in_one_line(args, expected):
  proc = run(*args, timeout=60)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("accelerator.py: error:"), proc.stderr
  assert expected in lines[0]
  assert proc.stdout == ""
