"""The one loop's contract for every task: a workdir of another configuration is refused with
nothing moved or overwritten, cadence and stop changes resume, SIGTERM on a step that also
checkpoints saves once and resumes bit for bit, and user errors are one line with exit 2."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from train_util import ROOT, checkpoint_steps, final_params, metrics_rows, tiny_teacher_config

from mbert_jax.training import checkpoint as ckpt_lib
from mbert_jax import launch, training
from mbert_jax.errors import WorkdirMismatchError

STEPS = 8


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("loop_cache"))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, cache_dir):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  report = launch.run_config(tiny_teacher_config(cache_dir, steps=STEPS), workdir)
  assert report["status"] == "completed" and report["step"] == STEPS
  return workdir


def _digest(workdir: str) -> dict[str, str]:
  """Every file under the workdir (relative path -> content hash)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _copy(src: str, dst: str) -> str:
  shutil.copytree(src, dst)
  return dst


@pytest.mark.parametrize("field, value, named", [
    ("model.num_hidden_layers", 3, "model.num_hidden_layers"),
    ("data.seed", 7, "data.seed"),
    ("train.seed", 1, "train.seed"),
])
def test_other_configuration_is_refused_and_nothing_changes(teacher_run, cache_dir, tmp_path,
                                                            field, value, named):
  workdir = _copy(teacher_run, str(tmp_path / "run"))
  before = _digest(workdir)
  c = tiny_teacher_config(cache_dir, steps=STEPS)
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(WorkdirMismatchError, match=named) as e:
    launch.run_config(c, workdir)
  assert "new --workdir" in str(e.value) and "delete" in str(e.value)
  assert _digest(workdir) == before  # config.json, model_config.json, checkpoints: untouched
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))


def test_checkpoint_of_another_shape_is_refused_not_quarantined(teacher_run, cache_dir, tmp_path):
  """Even past the identity check (a workdir edited by hand), a readable checkpoint whose
  shapes differ is another run's, never 'damaged'."""
  workdir = _copy(teacher_run, str(tmp_path / "run"))
  c = tiny_teacher_config(cache_dir, steps=STEPS)
  c.model.intermediate_size = 2 * c.model.intermediate_size
  task = launch.task_for(c)
  task.identity = lambda: launch.task_for(tiny_teacher_config(cache_dir, steps=STEPS)).identity()
  before = _digest(workdir)
  with pytest.raises(WorkdirMismatchError, match="another model or optimizer"):
    training.run(task, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
  assert checkpoint_steps(workdir) == checkpoint_steps(teacher_run)
  assert {k: v for k, v in _digest(workdir).items() if k.startswith("checkpoints")} == \
      {k: v for k, v in before.items() if k.startswith("checkpoints")}


def test_cadence_and_more_steps_resume(teacher_run, cache_dir, tmp_path):
  workdir = _copy(teacher_run, str(tmp_path / "run"))
  c = tiny_teacher_config(cache_dir, steps=STEPS + 2)
  c.train.log_every = 2
  c.train.eval_every = 3
  c.train.checkpoint_every = 5
  report = launch.run_config(c, workdir)
  assert report["status"] == "completed" and report["step"] == STEPS + 2
  new_rows = [r["step"] for r in metrics_rows(workdir) if "loss" in r][STEPS:]
  assert new_rows == [STEPS + 2]  # resumed at STEPS: only the last two steps ran


def _preempt_at(monkeypatch, at_step: int) -> list[int]:
  """SIGTERM (a real signal to this process) right after the checkpoint of `at_step` is
  written: the preemption lands on a step that also checkpoints. Returns the saved steps."""
  saved: list[int] = []
  real_save = ckpt_lib.Checkpointer.save

  def save(self, step, state, meta):
    real_save(self, step, state, meta)
    saved.append(int(step))
    if step == at_step:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
  return saved


def _assert_same_params(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigterm_on_a_checkpoint_step_saves_once_then_resumes_bitwise(teacher_run, cache_dir,
                                                                       tmp_path, monkeypatch):
  workdir = str(tmp_path / "cut")
  c = tiny_teacher_config(cache_dir, steps=STEPS)
  c.train.checkpoint_every = 1
  saved = _preempt_at(monkeypatch, 3)
  report = launch.run_config(c, workdir)
  assert report["status"] == "preempted" and report["step"] == 3
  assert saved == [1, 2, 3]  # step 3 once, though it both checkpoints and is preempted
  assert not os.path.exists(os.path.join(workdir, training.workdir.DONE_FILE))
  monkeypatch.undo()
  report = launch.run_config(c, workdir)
  assert report["status"] == "completed" and report["step"] == STEPS
  _assert_same_params(final_params(teacher_run), final_params(workdir))


# ------------------------------------------------------------------------------ fine-tuning

@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  import random
  from test_finetune_train import _sentence, _write_tsv
  d = tmp_path_factory.mktemp("sst2_loop")
  rng = random.Random(1)
  for name, n in (("train", 64), ("dev", 16)):
    _write_tsv(d / f"{name}.tsv", ["sentence", "label"],
               [(_sentence(rng, i % 2), i % 2) for i in range(n)])
  return str(d)


def _glue(glue_dir: str, **train_fields):
  from test_finetune_train import glue_config
  return glue_config(glue_dir, **{"steps": STEPS, "log_every": 1, "checkpoint_every": 1000,
                                   **train_fields})


def test_finetune_sigterm_on_a_checkpoint_step_and_refusal(glue_dir, tmp_path, monkeypatch):
  ref = str(tmp_path / "ref")
  assert launch.run_config(_glue(glue_dir), ref)["status"] == "completed"
  cut = str(tmp_path / "cut")
  saved = _preempt_at(monkeypatch, 4)
  report = launch.run_config(_glue(glue_dir, checkpoint_every=2), cut)
  assert report["status"] == "preempted" and report["step"] == 4 and saved == [2, 4]
  monkeypatch.undo()
  report = launch.run_config(_glue(glue_dir, checkpoint_every=2), cut)
  assert report["status"] == "completed" and report["step"] == STEPS
  from test_finetune_train import flat, restore_state
  _assert_same_params(flat(restore_state(ref)["params"]), flat(restore_state(cut)["params"]))
  before = _digest(cut)
  with pytest.raises(WorkdirMismatchError, match="train.learning_rate"):
    launch.run_config(_glue(glue_dir, learning_rate=1e-2), cut)
  assert _digest(cut) == before


# ------------------------------------------------------------------------------ commands

def _launch(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                        timeout=300)


def test_unknown_override_names_the_closest_field(tmp_path):
  workdir = str(tmp_path / "w")
  out = _launch(f"--config={ROOT}/configs/ib_bert_large.py:smoke", f"--workdir={workdir}",
                "--config.train.lerning_rate=1")
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "train.lerning_rate" in lines[0]
  assert "did you mean train.learning_rate" in lines[0]
  assert not os.path.exists(workdir)
  out = _launch(f"--config={ROOT}/configs/distill_mobilebert.py:smoke", f"--workdir={workdir}",
                "--config.train.learning_rate=1")
  assert out.returncode == 2 and "did you mean schedule.learning_rate" in out.stderr


def test_config_errors_name_the_field_to_change():
  from configs import ib_bert_large
  c = ib_bert_large.get_config("smoke")
  c.train.steps = 6  # shorter than the smoke warm-up of 30 steps
  with pytest.raises(ValueError, match="train.warmup_steps"):
    launch.task_for(c)


def test_a_known_error_is_one_line_and_exit_2(tmp_path):
  out = _launch(f"--config={ROOT}/configs/ib_bert_large.py:smoke", f"--workdir={tmp_path / 'w'}",
                "--config.data.source=/nonexistent/corpus.txt")
  assert out.returncode == 2, out.stderr
  lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error:")]
  assert len(lines) == 1 and "/nonexistent/corpus.txt" in lines[0], out.stderr
  assert "Traceback" not in out.stderr
