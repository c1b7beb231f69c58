"""configs/demo_bert_teacher.py: the distil-from-a-pretrained-BERT demo and its baseline.

Both runs must validate through the training loop's own checks, and the comparison must be
fair: same total steps, data, batch, peak learning rate and warm-up, the student the only one
that sees the teacher. Needs the packaged all-MiniLM-L6-v2 teacher (the `test` extra).
"""

import json
import os

import pytest
from train_util import config_strings

from mbert_jax.config_files import substitute_workdir

from configs import distill_mobilebert

TEACHER_DIR = distill_mobilebert.packaged_teacher_dir()
pytestmark = pytest.mark.skipif(not TEACHER_DIR,
                                reason=distill_mobilebert.packaged_teacher_problem() or "unused")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_substitute = substitute_workdir


_strings = config_strings


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  from mbert_jax import launch
  from mbert_jax.config_files import load_config
  workdir = str(tmp_path_factory.mktemp("bert_teacher"))
  config = load_config(os.path.join(ROOT, "configs", "demo_bert_teacher.py"))
  assert tuple(config.runs.order) == ("student", "scratch")
  out = {}
  for name in config.runs.order:
    sub = _substitute(config.runs[name].copy_and_resolve_references(), workdir)
    assert not any("{workdir}" in s for s in _strings(sub)), name
    out[name] = (sub, launch.task_for(sub))  # the loop's checks: no data, no compile
  return out


def test_student_is_a_layerwise_transfer_from_the_packaged_teacher(runs):
  from mbert_jax.distill.transfer_options import layer_map
  cfg, task = runs["student"]
  stages = task.stages
  layers = cfg.model.num_hidden_layers
  assert cfg.teacher.checkpoint == TEACHER_DIR
  assert cfg.model.hidden_size == 64 and cfg.model.num_attention_heads == 4
  assert tuple(cfg.kt.layer_map) == layer_map(layers, 6)  # the uniform map over 6 layers
  assert cfg.kt.feature_projection in ("auto", "shared", "per_layer")
  phases, final = stages[:-1], stages[-1]
  assert [s.transfer_layers for s in phases] == [(k,) for k in range(1, layers + 1)]
  assert all(s.needs_teacher and s.num_layers == k + 1 for k, s in enumerate(phases))
  assert all(s.steps == cfg.schedule.steps_per_layer for s in phases)
  # The teacher is a bare encoder: the last stage is ground truth only and needs no teacher.
  assert not final.needs_teacher and final.alpha == 1.0 and final.weight("mlm") == 1.0


def test_scratch_matches_the_student_budget_data_and_learning_rate(runs):
  from mbert_jax.distill import schedule
  s_cfg, s_task = runs["student"]
  b_cfg, b_task = runs["scratch"]
  assert [st.name for st in b_task.stages] == ["scratch"]
  assert not any(st.needs_teacher for st in b_task.stages)
  assert schedule.total_steps(s_task.stages) == schedule.total_steps(b_task.stages)
  assert s_cfg.train.steps == b_cfg.train.steps == -1
  assert s_cfg.data.to_dict() == b_cfg.data.to_dict()  # same corpus, vocab, masking, batch
  assert s_cfg.model.to_dict() == b_cfg.model.to_dict()
  for field in ("optimizer", "weight_decay", "clip_norm", "b1", "b2", "eps", "seed", "dropout",
                "grad_accum_steps", "eval_steps"):
    assert s_cfg.train[field] == b_cfg.train[field], field
  # Same peak learning rate, warm-up and decay: the scratch stage and the student's last stage
  # follow one schedule; the student's transfer phases never exceed that peak.
  s_final, b_only = s_task.stages[-1], b_task.stages[0]
  assert (s_final.lr.kind, s_final.lr.base_lr, s_final.lr.warmup_steps,
          s_final.lr.end_factor) == (b_only.lr.kind, b_only.lr.base_lr, b_only.lr.warmup_steps,
                                     b_only.lr.end_factor)
  peak = b_only.lr.base_lr
  assert b_only.lr.warmup_steps > 0 and float(b_only.learning_rate(0)) == 0.0
  # pkt_tf2's phases run at that peak, constant (a fresh optimizer each phase).
  assert all((st.lr.kind, st.lr.base_lr) == ("constant", peak) for st in s_task.stages[:-1])
  assert dict(s_final.loss_weights) == dict(b_only.loss_weights)  # MLM + NSP in both


def test_control_is_the_student_from_a_reinitialised_teacher():
  """`:control` (the README's random-teacher row) differs from the student in one field, and
  that field gives the teacher's architecture with fresh weights, not the packaged ones."""
  import jax
  import numpy as np
  from mbert_jax.config_files import load_config
  from mbert_jax.distill import teacher as teacher_lib
  from mbert_jax.training import sharding
  config = load_config(os.path.join(ROOT, "configs", "demo_bert_teacher.py") + ":control")
  assert tuple(config.runs.order) == ("student", "scratch", "control")
  student, control = config.runs.student.to_dict(), config.runs.control.to_dict()
  assert control["teacher"].pop("reinitialise") is True
  assert student["teacher"].pop("reinitialise") is False
  assert control == student
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = sharding.rules_from_config(config.runs.control.mesh)
  real = teacher_lib.open_teacher(config.runs.student.teacher, mesh, rules)
  fresh = teacher_lib.open_teacher(config.runs.control.teacher, mesh, rules)
  again = teacher_lib.open_teacher(config.runs.control.teacher, mesh, rules)
  assert fresh.config == real.config
  words = lambda t: np.asarray(t.params["embeddings"]["word_embeddings"]["embedding"])
  assert words(fresh).shape == words(real).shape
  assert not np.allclose(words(fresh), words(real))
  np.testing.assert_array_equal(words(fresh), words(again))  # one fixed seed


def test_both_read_the_teachers_vocabulary_without_padding(runs):
  """data.vocab is the teacher's vocab.txt: its tokenizer.json pads every encoding to 128."""
  from mbert_jax.data.tokenizer import load_tokenizer, read_vocab_txt
  vocab = runs["student"][0].data.vocab
  assert os.path.dirname(vocab) == TEACHER_DIR
  assert read_vocab_txt(vocab) == read_vocab_txt(os.path.join(TEACHER_DIR, "vocab.txt"))
  with open(os.path.join(TEACHER_DIR, "config.json")) as f:
    assert len(read_vocab_txt(vocab)) == json.load(f)["vocab_size"] == 30522
  ids = load_tokenizer(vocab).encode("The quick brown fox jumps.", add_special_tokens=False).ids
  assert 0 < len(ids) < 16 and 0 not in ids  # no [PAD] (id 0) appended


def test_plot_script_on_a_synthetic_log(tmp_path):
  import subprocess
  import sys
  for name, rows in (
      ("student", [{"step": 1, "stage": 0.0, "loss": 9.0, "fmt_loss/layer_01": 0.8,
                    "at_loss/layer_01": 2.0},
                   {"step": 2, "stage": 0.0, "loss": 5.0, "fmt_loss/layer_01": 0.2,
                    "at_loss/layer_01": 1.0},
                   {"step": 3, "stage": 1.0, "loss": 3.0, "mlm_loss": 9.0},
                   {"step": 3, "eval/mlm_accuracy": 0.05, "eval/mlm_loss": 8.0},
                   {"step": 4, "eval/mlm_accuracy": 0.2, "eval/mlm_loss": 6.0}]),
      ("scratch", [{"step": 2, "stage": 0.0, "loss": 9.0},
                   {"step": 4, "eval/mlm_accuracy": 0.1, "eval/mlm_loss": 7.0}])):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "metrics.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  out = tmp_path / "plot.png"
  done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "plot_bert_teacher.py"),
                         f"--workdir={tmp_path}", f"--out={out}"],
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  assert out.stat().st_size > 10_000
  assert "| scratch |  | 4 | 0.1000 | 7.000 |" in done.stdout
  assert "| 1 | 1..2 | 0.8 -> 0.2 (4.0x) | 2 -> 1 (2.0x) |" in done.stdout
