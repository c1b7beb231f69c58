"""The planner (`python -m mbert_jax.plan`): every program of a run compiled for a TPU topology
on this CPU-only machine by XLA's TPU compiler (the libtpu wheel, the `tpu` extra), read back
as memory plans, collectives, FLOPs and projected step times."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from mbert_jax import config_files
from mbert_jax.models import preset
from mbert_jax.models import summary
from mbert_jax.planning import hardware, planner, programs, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"
DISTILL = "configs/distill_mobilebert.py:smoke"
GLUE = "configs/finetune_glue.py:task=sst2,smoke"
# One compiled program of each kind but fine-tuning on GLUE, which its own config gives.
DISTILL_ROWS = ("pkt_layer_1", "pd_teacher_online", "pd_teacher_cache", "teacher_cache_writer",
                "teacher_pretraining", "finetune_squad")

pytestmark = pytest.mark.skipif(not hardware.has_libtpu(),
                                reason=f"libtpu is not installed ({hardware.TPU_EXTRA})")


def _config(ref: str):
  path, arg = config_files.split_ref(ref)
  return config_files.load_config(os.path.join(ROOT, path) + (f":{arg}" if arg else ""))


@pytest.fixture(scope="module")
def target():
  return hardware.resolve(TOPOLOGY)


@pytest.fixture(scope="module")
def distill(target):
  run = programs.programs_for(_config(DISTILL), target.num_devices,
                              teacher_preset=programs.teacher_preset_from_ref(DISTILL))
  return planner.make_plan(run, target, only=DISTILL_ROWS)


@pytest.fixture(scope="module")
def glue(target):
  run = programs.programs_for(_config(GLUE), target.num_devices)
  return planner.make_plan(run, target)


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "mbert_jax.plan", *args], cwd=ROOT,
                        env={**os.environ, **(env or {})}, capture_output=True, text=True,
                        timeout=600)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), proc.stderr[-2000:]
  return last


def test_the_topology_is_the_pod_s(target):
  assert (target.num_devices, target.chips, target.device_kind) == (4, 4, "TPU v5 lite")
  assert target.memory_bytes == hardware.TPU_CHIPS["v5e"].usable_bytes
  assert target.peak_flops == 197e12 and target.compile_only
  # A v3 chip is two devices (libtpu exposes each TensorCore), each with half the chip.
  v3 = hardware.resolve("v3:2x2")
  assert (v3.num_devices, v3.chips, v3.peak_flops) == (8, 4, 123e12 / 2)


def test_loading_libtpu_leaves_the_environment_as_it_was(target):
  """The variables libtpu needs on a host without TPUs are gone once it has loaded: a command
  started later from this process must not take itself for a pod worker."""
  before = dict(os.environ)
  hardware.resolve("v4:2x2x1")
  assert dict(os.environ) == before


def test_a_row_for_every_program_kind(distill, glue):
  kinds = {r.program.kind for r in distill.rows + glue.rows}
  assert kinds == set(programs.KINDS) - {"transfer"}  # jkt's joint transfer: not in pkt
  names = {r.program.name for r in distill.rows}
  assert {n for n in names if "pd" in n} == {"pd_teacher_online", "pd_teacher_cache"}
  run = distill.run
  # Every stage of the schedule is priced: compiled phases by their own row, the rest between
  # the compiled depths around them.
  stages = [e.stage for e in run.schedule if e.group == "run"]
  assert stages == [f"pkt_layer_{i}" for i in range(1, 5)] + ["pd"]
  for e in run.schedule:
    assert abs(sum(e.weights) - 1.0) < 1e-9 and all(r in {p.name for p in run.programs}
                                                     for r in e.rows)
  assert all(r.compiled.fits and r.projected_step_seconds > 0 for r in distill.rows + glue.rows)


def test_memory_fields_are_the_compiled_programs_own(distill, glue):
  for r in distill.rows + glue.rows:
    m = r.compiled.executable.memory_analysis()
    b = r.compiled.bytes
    assert (b["arguments"], b["outputs"], b["temporaries"], b["donated"]) == (
        m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
        m.alias_size_in_bytes), r.program.name
    assert b["total"] == (m.argument_size_in_bytes + m.output_size_in_bytes
                          + m.temp_size_in_bytes - m.alias_size_in_bytes)
  # The train steps donate their state: the update is written in place.
  assert all(r.compiled.bytes["donated"] > 0 for r in distill.rows
             if r.program.kind != "cache_writer")


def test_flops_are_models_summary_count(distill, glue):
  seq, preds = 64, 10
  student = preset("mobilebert_micro", vocab_size=2048, max_position_embeddings=64)
  teacher = preset("ib_bert_large_micro", vocab_size=2048, max_position_embeddings=64)
  rows = {r.program.name: r for r in distill.rows + glue.rows}
  batch = {n: r.compiled.batch for n, r in rows.items()}
  fwd = summary.forward_flops
  expected = {
      "teacher_pretraining": summary.train_step_flops(teacher, seq, preds),
      "teacher_cache_writer": fwd(teacher, seq, None, preds, heads=True),
      "pd_teacher_cache": 3 * fwd(student, seq, None, preds, heads=True),
      "pd_teacher_online": 3 * fwd(student, seq, None, preds, heads=True)
                           + fwd(teacher, seq, None, preds, heads=True),
      # Phase 1 runs one student layer and the teacher layer it learns from, no heads.
      "pkt_layer_1": 3 * fwd(student, seq, 1, preds) + fwd(teacher, seq, 1, preds),
      "finetune_squad": 3 * fwd(student, seq),
      "finetune_glue": 3 * fwd(preset("mobilebert_micro", num_hidden_layers=2, vocab_size=1024,
                                      max_position_embeddings=128), seq)}
  for name, per_example in expected.items():
    assert rows[name].flops_per_step == pytest.approx(per_example * batch[name], rel=1e-12), name


def test_collectives_and_projection_inputs(distill, target):
  pd = next(r for r in distill.rows if r.program.name == "pd_teacher_online")
  traffic = pd.compiled.traffic
  # Data parallel over 4 devices: the gradients are all-reduced every step.
  assert traffic.collectives["all-reduce"].count >= 1
  assert traffic.collectives["all-reduce"].bytes > 0
  assert pd.compute_seconds == pytest.approx(
      pd.flops_per_step / (target.num_devices * target.peak_flops))
  assert pd.memory_seconds == pytest.approx(traffic.memory_bytes / target.hbm_bytes_per_s)
  assert pd.collective_seconds == pytest.approx(traffic.link_bytes / target.link_bytes_per_s)
  assert pd.projected_step_seconds == max(pd.compute_seconds, pd.memory_seconds,
                                          pd.collective_seconds)


def test_the_schedule_sums_steps_times_step_time(distill, glue, target):
  s = distill.schedule("run")
  assert s is None or s["projected_hours"] is None  # unplanned phases 2..4 leave it open
  t = distill.schedule("teacher")
  row = next(r for r in distill.rows if r.program.name == "teacher_pretraining")
  assert t["projected_hours"] == pytest.approx(300 * row.projected_step_seconds / 3600)
  assert t["chip_hours"] == pytest.approx(t["projected_hours"] * target.chips)
  assert t["most_expensive_stage"] == "scratch"
  g = glue.schedule("run")
  assert g["stages"][0]["steps"] == 60 and g["projected_hours"] > 0


def test_fsdp_keeps_activations_batch_sharded(distill, target):
  """Sharding the weights over fsdp must not gather the batch: in the teacher's compiled step
  no activation spans the global batch at a model width. Without the models' activation
  constraints XLA followed the fsdp-sharded weights and held the whole batch's activations on
  every device (hundreds of such arrays here; 2.3 TB per device for IB-BERT-large at
  4096 x 512 on 512 v3 cores)."""
  program = distill.by_name()["teacher_pretraining"].program
  batch = 16 * target.num_devices
  compiled = planner.compile_program(program, target, batch,
                                     mesh_cfg={"data": 1, "fsdp": -1, "tensor": 1})
  model = preset("ib_bert_large_micro")  # what configs/ib_bert_large.py:smoke pretrains
  widths = {model.hidden_size, model.true_hidden_size, model.intra_bottleneck_size,
            model.intermediate_size}
  shapes = re.findall(rf"= (?:bf16|f32)\[{batch},{program.seq},(\d+)\]",
                      compiled.executable.as_text())
  assert not [int(d) for d in shapes if int(d) in widths]
  local = re.findall(rf"= (?:bf16|f32)\[{batch // target.num_devices},{program.seq},(\d+)\]",
                     compiled.executable.as_text())
  assert [int(d) for d in local if int(d) in widths]  # the per-device activations are there


@pytest.mark.slow  # five compiles, about 90 s on two cores: run with -m slow
def test_a_batch_that_does_not_fit_and_the_largest_that_does(glue, target):
  small = glue.rows[0]
  big = dataclasses.replace(small.program, global_batch=4 * small.program.global_batch)
  at_big = planner.compile_program(big, target, big.global_batch)
  # The projection grows with the batch.
  assert planner.project(big, at_big, target).projected_step_seconds > \
      small.projected_step_seconds
  # A device between the two: the big batch does not fit it.
  limit = (small.compiled.bytes["total"] + at_big.bytes["total"]) / 2
  device = dataclasses.replace(target, memory_bytes=limit)
  at_big = dataclasses.replace(at_big, fits=planner.fits_in(at_big, limit))
  row = planner.project(big, at_big, device)
  row.max_fitting_batch, row.fit_evidence, row.fit_compiled = planner.largest_fitting_batch(
      big, device, 0.0, first=at_big)
  assert not row.compiled.fits
  assert small.compiled.batch <= row.max_fitting_batch < big.global_batch
  assert row.max_fitting_batch % target.num_devices == 0
  # The batch it names was compiled, and its memory plan fits; one more row per shard does not.
  fitting = row.fit_compiled
  assert fitting.batch == row.max_fitting_batch
  m = fitting.executable.memory_analysis()
  assert (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes) <= limit
  assert row.fit_evidence == (f"fits at {row.max_fitting_batch}, not at "
                              f"{row.max_fitting_batch + target.num_devices}")
  plan = planner.Plan(device, [row], glue.run, 0.0, True)
  line = next(x for x in report.fit_lines(plan) if x.strip().startswith(big.name))
  assert "does NOT fit" in line and f"largest that fits: {row.max_fitting_batch}" in line


def test_local_runs_the_programs_it_plans():
  """`--topology=local` compiles for this machine and runs a step of each program."""
  local = hardware.resolve("local")
  run = programs.programs_for(_config(GLUE), local.num_devices)
  row = planner.make_plan(run, local, measure_steps=1).rows[0]
  assert not local.compile_only and row.measured["step_seconds"] > 0
  assert row.compiled.bytes["total"] > 0 and row.flops_per_step > 0


def test_refusals_are_one_line(target):
  with pytest.raises(ValueError, match=r"^unknown topology 'v9:2x2'") as e:
    hardware.resolve("v9:2x2")
  assert "\n" not in str(e.value)
  run = programs.programs_for(_config(GLUE), target.num_devices)
  wrong_mesh = dataclasses.replace(run.programs[0], mesh_cfg={"data": 3, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match="needs 3 devices, 4 are available"):
    planner.make_plan(dataclasses.replace(run, programs=[wrong_mesh]), target)
  odd = dataclasses.replace(run.programs[0], global_batch=6)
  with pytest.raises(ValueError, match=r"data.batch_size = 6 must divide by data x fsdp = 4"):
    planner.make_plan(dataclasses.replace(run, programs=[odd]), target)


def test_command_line_refusals_exit_2():
  proc = _run_cli(f"--config={GLUE}", "--topology=v9:2x2")
  assert "unknown topology 'v9:2x2'" in _one_line_error(proc)


def test_without_libtpu_a_tpu_topology_names_the_extra(tmp_path):
  shim = tmp_path / "no_libtpu" / "libtpu"
  shim.mkdir(parents=True)
  (shim / "__init__.py").write_text("raise ImportError('libtpu made unimportable')\n")
  proc = _run_cli(f"--config={GLUE}", f"--topology={TOPOLOGY}",
                  env={"PYTHONPATH": os.pathsep.join([str(shim.parent), ROOT])})
  assert 'pip install -e ".[tpu]"' in _one_line_error(proc)


@pytest.mark.slow
def test_command_writes_the_contract_json(tmp_path):
  out = tmp_path / "plan.json"
  proc = _run_cli("--config=configs/ib_bert_large.py:smoke", f"--topology={TOPOLOGY}",
                  "--only=scratch", f"--out={out}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "projected" in proc.stdout and "scratch" in proc.stdout
  plan = json.loads(out.read_text())
  for key in ("topology", "devices", "device_kind", "device_memory_bytes", "programs",
              "schedule"):
    assert key in plan
  assert (plan["topology"], plan["devices"]) == (TOPOLOGY, 4)
  program = plan["programs"][0]
  for key in ("name", "stage", "global_batch", "seq", "bytes", "fits", "flops_per_step",
              "projected_step_seconds", "collectives"):
    assert key in program
  assert (program["global_batch"], program["seq"]) == (16, 64)
  assert set(program["bytes"]) == {"arguments", "outputs", "temporaries", "donated", "total"}
  assert all(set(v) == {"count", "bytes"} for v in program["collectives"].values())
  for key in ("projected_hours", "chip_hours", "most_expensive_stage"):
    assert key in plan["schedule"]
  assert plan["schedule"]["most_expensive_stage"] == "scratch"
