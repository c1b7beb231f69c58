"""configs/demo_modernbert_teacher.py, issue 21's proof: a micro ModernBERT pretrained by the
loop with its own BPE, distilled into a micro MobileBERT (feature maps, attention, PD), against
the same student from scratch and from a re-initialised teacher. The comparison is fair only if
the students differ in the teacher alone: same total steps, data, vocabulary, model, batch,
peak learning rate and warm-up. Checked on the configs, through the loop's own validation where
it needs no teacher on disk (no data, no compile)."""

import os

import pytest
from train_util import config_strings

from configs import demo_modernbert_teacher as demo
from configs import modernbert_teacher
from mbert_jax import launch
from mbert_jax.config_files import load_config, substitute_workdir
from mbert_jax.distill import schedule
from mbert_jax.distill import teacher as teacher_lib
from mbert_jax.distill.config import build_stages, model_config_from
from mbert_jax.models import ModernConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = "/runs/modernbert_teacher"
STUDENTS = ("student", "scratch", "control")


_strings = config_strings


@pytest.fixture(scope="module")
def runs():
  config = load_config(os.path.join(ROOT, "configs", "demo_modernbert_teacher.py"))
  assert tuple(config.runs.order) == ("teacher", "student", "scratch", "control")
  out = {name: substitute_workdir(config.runs[name].copy_and_resolve_references(), WORKDIR)
         for name in config.runs.order}
  for name, c in out.items():
    assert not any("{workdir}" in s for s in _strings(c)), name
  return out


def test_the_teacher_is_a_micro_modernbert_pretrained_first_with_its_own_bpe(runs):
  t = runs["teacher"]
  task = launch.task_for(t)  # the loop's checks: no data, no compile
  assert [s.name for s in task.stages] == ["scratch"]
  assert schedule.total_steps(task.stages) == t.train.steps == demo.TEACHER_STEPS
  assert dict(task.stages[0].loss_weights) == {"mlm": 1.0}  # MLM only, no NSP head
  assert t.model.family == "modernbert" and t.model.vocab_size == -1
  micro = modernbert_teacher.model_section("modernbert_micro").to_dict()
  model = t.model.to_dict()
  assert model.pop("max_position_embeddings") == t.data.max_seq_length == demo.SEQ
  micro.pop("max_position_embeddings")
  assert model == micro
  assert t.data.vocab.startswith("bpe:modernbert:")  # its own byte-level BPE
  assert not t.data.next_sentence and t.data.masked_lm_prob == 0.30
  assert t.train.optimizer == "adamw" and not t.train.dropout
  # Every student reads the teacher run's tokenizer.
  for name in STUDENTS:
    assert runs[name].teacher.checkpoint == f"{WORKDIR}/teacher", name
    assert runs[name].data.vocab == "teacher", name


def _stages(c):
  return build_stages(c, c.model.num_hidden_layers)


def test_the_student_transfers_feature_maps_and_attention_then_distils(runs):
  c = runs["student"]
  stages = _stages(c)
  phases, final = stages[:-1], stages[-1]
  layers = c.model.num_hidden_layers
  assert c.schedule.name == "pkt_tf2"  # the teacher's embeddings cannot seed a MobileBERT
  assert len(phases) == layers == 4
  assert [s.transfer_layers for s in phases] == [(k,) for k in range(1, layers + 1)]
  assert all(s.needs_teacher and s.steps == demo.STEPS_PER_LAYER for s in phases)
  for s in phases:
    assert s.weight("fmt") > 0 and s.weight("at") > 0, s.name
  # The final stage: ground truth and the teacher's MLM distribution, no NSP.
  assert final.name == "pd" and final.needs_teacher and final.steps == demo.DISTILL_STEPS
  assert final.weight("kd") > 0 and final.weight("mlm") > 0 and final.weight("nsp") == 0
  assert schedule.total_steps(stages) == demo.total_steps(layers)


def test_attention_transfer_is_per_head_against_the_teacher_shape(runs):
  """What the loop resolves once the teacher exists: same head count and width, so per-head
  attention maps and unprojected feature maps (through the teacher's final norm)."""
  s, t = runs["student"], runs["teacher"]
  vocab, special = 1024, {"pad": 0, "mask": 4}
  s_cfg = model_config_from(s.model, vocab, "float32", s.data.max_seq_length, special)
  t_cfg = model_config_from(t.model, vocab, "float32", t.data.max_seq_length, special)
  assert isinstance(t_cfg, ModernConfig)
  plan = teacher_lib.check_transfer(s.kt, _stages(s), s_cfg, t_cfg, teacher_has_mlm_head=True)
  assert plan.attention_transfer == "per_head"
  assert plan.projection == "none" and plan.teacher_feature_norm == "final_norm"
  assert plan.layer_map == (1, 2, 3, 4)


def test_scratch_has_the_students_budget_data_model_and_learning_rate(runs):
  s, b = runs["student"], runs["scratch"]
  b_stages = _stages(b)
  assert [st.name for st in b_stages] == ["scratch"]
  assert not any(st.needs_teacher for st in b_stages)
  assert dict(b_stages[0].loss_weights) == {"mlm": 1.0}  # no NSP
  assert schedule.total_steps(_stages(s)) == schedule.total_steps(b_stages) == demo.total_steps(4)
  assert s.data.to_dict() == b.data.to_dict()  # same corpus, vocabulary, masking, batch
  assert s.model.to_dict() == b.model.to_dict()
  for field in ("optimizer", "weight_decay", "clip_norm", "b1", "b2", "eps", "seed", "dropout",
                "eval_steps", "eval_every", "grad_accum_steps", "steps"):
    assert s.train[field] == b.train[field], field
  for field in ("learning_rate", "warmup_steps", "end_factor", "power"):
    assert s.schedule[field] == b.schedule[field], field
  # The student's final stage and the scratch stage follow one learning-rate schedule.
  s_final, b_only = _stages(s)[-1], b_stages[0]
  assert s_final.lr == b_only.lr
  assert s.train.optimizer == "adamw" and not s.train.dropout


def test_control_differs_from_the_student_only_in_reinitialise(runs):
  student, control = runs["student"].to_dict(), runs["control"].to_dict()
  assert control["teacher"].pop("reinitialise") is True
  assert student["teacher"].pop("reinitialise") is False
  assert control == student
