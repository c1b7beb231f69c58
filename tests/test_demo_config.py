"""configs/demo.py, the Quick start's main job and the source of docs/evidence.md's first
table: a teacher, a progressively distilled student and a scratch baseline. The comparison is
fair only if the two students differ in the teacher alone: same total steps, data, vocabulary,
model, batch, peak learning rate and warm-up. Checked on the configs, through the loop's own
validation where it needs no teacher on disk (no data, no compile)."""

import os

import pytest

from configs import common
from mbert_jax import launch
from mbert_jax.config_files import load_config, substitute_workdir
from mbert_jax.distill import schedule
from mbert_jax.distill.config import build_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = "/runs/demo"


@pytest.fixture(scope="module")
def runs():
  config = load_config(os.path.join(ROOT, "configs", "demo.py"))
  assert tuple(config.runs.order) == ("teacher", "student", "scratch")
  return {name: substitute_workdir(config.runs[name].copy_and_resolve_references(), WORKDIR)
          for name in config.runs.order}


def test_the_teacher_is_pretrained_first_and_feeds_the_student(runs):
  teacher = launch.task_for(runs["teacher"])
  assert [s.name for s in teacher.stages] == ["scratch"]
  assert schedule.total_steps(teacher.stages) == runs["teacher"].train.steps == 1000
  # The paper's teacher architecture (bottlenecks around a wide block), at micro size.
  micro = common.model_section("ib_bert_large_micro").to_dict()
  teacher_model = runs["teacher"].model.to_dict()
  assert teacher_model.pop("vocab_size") == -1  # the size of the vocabulary it trains
  # Positions cut to the demo's sequence length.
  assert teacher_model.pop("max_position_embeddings") == runs["teacher"].data.max_seq_length
  assert {k: v for k, v in micro.items()
          if k not in ("vocab_size", "max_position_embeddings")} == teacher_model
  assert runs["student"].teacher.checkpoint == f"{WORKDIR}/teacher"
  for name in ("student", "scratch"):
    assert runs[name].data.vocab == f"{WORKDIR}/teacher/tokenizer", name


def test_the_student_runs_the_progressive_schedule(runs):
  c = runs["student"]
  stages = build_stages(c, c.model.num_hidden_layers)
  phases, final = stages[:-1], stages[-1]
  assert c.schedule.name == "pkt"
  assert [s.transfer_layers for s in phases] == [(k,) for k in range(1, len(phases) + 1)]
  assert len(phases) == c.model.num_hidden_layers == 4
  assert all(s.needs_teacher and s.steps == 50 for s in phases)
  assert final.needs_teacher and final.steps == 400  # pre-training distillation


def test_scratch_has_the_students_budget_data_model_and_learning_rate(runs):
  s, b = runs["student"], runs["scratch"]
  s_stages = build_stages(s, s.model.num_hidden_layers)
  b_stages = launch.task_for(b).stages
  assert [st.name for st in b_stages] == ["scratch"]
  assert not any(st.needs_teacher for st in b_stages)
  assert schedule.total_steps(s_stages) == schedule.total_steps(b_stages) == 600
  assert s.data.to_dict() == b.data.to_dict()
  assert s.model.to_dict() == b.model.to_dict()
  for field in ("optimizer", "weight_decay", "clip_norm", "seed", "dropout", "eval_steps",
                "eval_every", "grad_accum_steps"):
    assert s.train[field] == b.train[field], field
  for field in ("learning_rate", "warmup_steps"):
    assert s.schedule[field] == b.schedule[field], field
  assert s.train.optimizer == "adamw" and not s.train.dropout
