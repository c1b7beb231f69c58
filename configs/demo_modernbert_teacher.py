"""Distil from a ModernBERT teacher the loop pretrained itself (issue 21's proof).

    python launch.py --config=configs/demo_modernbert_teacher.py --workdir=runs/modernbert_teacher

Runs (in `<workdir>/<name>`, in this order; each resumes if interrupted, finished ones are
skipped):

* `teacher`: a micro ModernBERT (configs/modernbert_teacher.py:smoke: 64 wide, 4 heads,
  4 layers, pre-norm, rotary, alternating global/banded-local attention, GeGLU) pretrained
  MLM-only on the built-in corpus (30% masking, single segments, no NSP) with its own byte-level
  BPE vocabulary (data.vocab=bpe:modernbert:1024), saved in `teacher/tokenizer`.
* `student`: a micro MobileBERT (64 wide, 4 heads, 4 layers) distilled from it with the TF2
  progressive schedule (`pkt_tf2`: one layer-wise phase per student layer, the truncated model
  and its embeddings training at x1: the teacher's 64-wide word table does not fit the
  student's 16-wide one, so only the MLM head's tensors of matching shape are copied, its
  transform and output bias, 3 tensors), feature-map transfer (the teacher's residual stream
  through its own final norm; equal widths, no projection) and per-head attention transfer
  (4 heads each), then pre-training distillation (`pd`): MLM on the ground truth (alpha 0.5)
  plus KL to the teacher's MLM logits. It reads the teacher's tokenizer (data.vocab=teacher).
* `scratch`: the same student, the same total steps, data, vocabulary, batch, peak learning
  rate and warm-up, MLM from step 0, no teacher.
* `control`: the student's run from a teacher of the same architecture with fresh weights
  (teacher.reinitialise=True, seed REINIT_SEED of mbert_jax/distill/teacher.py): it separates
  what the pretrained teacher transfers from what the staged schedule alone does.

All runs evaluate on the same held-out 5% of the corpus (the students also with the same
tokenizer and masking); the final report prints each run's held-out MLM accuracy (the
student's and the control's also their teacher's). At equal steps the comparison shows what
distillation from the pretrained teacher gives over training from scratch (student vs
scratch), and whether that gain needs the teacher's pretraining or only the staged schedule and
its architecture (student vs control). At this size AdamW replaces LAMB and dropout is off in
every run, as in configs/demo.py.

Time: about 24 minutes in all, measured on a shared, loaded 2-core CPU (teacher ~4.7 steps/s,
a distilled student ~5 steps/s with the teacher's forward, scratch ~6.5 steps/s, and ~70 s per
run for the corpus, the BPE and one compile per stage): teacher ~8.5 min, student and control
~6 min each, scratch ~4 min. Less on a quiet machine.
"""

import ml_collections

from configs import distill_mobilebert, modernbert_teacher

BATCH = 32
SEQ = 64
TEACHER_STEPS = 2000            # ~8.5 min; held-out MLM accuracy 4.4% at step 100, 14.5% at 600
TEACHER_LEARNING_RATE = 2e-3
TEACHER_WARMUP_STEPS = 100
STEPS_PER_LAYER = 100           # four layer-wise phases: 400 steps
DISTILL_STEPS = 1000            # the final PD stage; each student's budget is 1400 steps
LEARNING_RATE = 2e-3            # the students' peak (PD / scratch) and the phases' constant rate
WARMUP_STEPS = 100
EVAL_EVERY = 100
EVAL_STEPS = 8
RUNS = ("teacher", "student", "scratch", "control")


def _demo_size(c):
  c.data.cache_dir = "{workdir}/data_cache"  # one cache: the students read one data section
  # Lines split into sentences: 22.5% of the corpus's tokens reach no 64-token example (the
  # demo's size, as in configs/demo.py), against 32.5% with whole lines as sentences.
  c.data.sentence_splitter = "blingfire"
  c.data.expected_drop_fraction = 0.25
  c.data.batch_size = BATCH
  c.data.max_seq_length = SEQ
  c.model.max_position_embeddings = SEQ
  c.train.optimizer = "adamw"
  c.train.dropout = False
  c.train.eval_steps = EVAL_STEPS
  c.train.eval_every = EVAL_EVERY
  c.train.checkpoint_every = 500
  c.train.log_every = 10
  return c


def total_steps(num_layers: int) -> int:
  """The student's budget: one phase per layer and the distillation stage."""
  return STEPS_PER_LAYER * num_layers + DISTILL_STEPS


def get_config(arg=None):
  if arg not in (None, ""):
    raise ValueError(f"config argument {arg!r}: this config takes none")
  teacher = _demo_size(modernbert_teacher.get_config("smoke"))
  teacher.train.steps = TEACHER_STEPS
  teacher.train.learning_rate = TEACHER_LEARNING_RATE
  teacher.train.warmup_steps = TEACHER_WARMUP_STEPS

  student = _demo_size(distill_mobilebert.get_config("teacher=modernbert_base,smoke"))
  student.teacher.checkpoint = "{workdir}/teacher"  # its checkpoints and tokenizer/
  student.schedule.steps_per_layer = STEPS_PER_LAYER
  student.schedule.distill_steps = DISTILL_STEPS
  student.schedule.learning_rate = LEARNING_RATE
  student.schedule.warmup_steps = WARMUP_STEPS

  # The scratch student reads the same data and vocabulary (the teacher's tokenizer); its one
  # stage is MLM only, like the student's data (single segments, no NSP).
  scratch = _demo_size(distill_mobilebert.get_config("teacher=modernbert_base,smoke,"
                                                     "preset=scratch"))
  scratch.teacher.checkpoint = "{workdir}/teacher"  # read for its tokenizer only
  scratch.schedule.distill_steps = total_steps(student.model.num_hidden_layers)
  scratch.schedule.learning_rate = LEARNING_RATE
  scratch.schedule.warmup_steps = WARMUP_STEPS

  control = student.copy_and_resolve_references()
  control.teacher.reinitialise = True

  c = ml_collections.ConfigDict()
  c.runs = ml_collections.ConfigDict()
  c.runs.order = RUNS
  c.runs.teacher = teacher
  c.runs.student = student
  c.runs.scratch = scratch
  c.runs.control = control
  return c
