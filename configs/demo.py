"""The offline demo: a tiny IB-BERT teacher pretrained on the built-in corpus, then distilled
into a tiny MobileBERT with the progressive (pkt) schedule, and a `scratch` student trained for
the same number of steps on the same data as the baseline.

    python launch.py --config=configs/demo.py --workdir=runs/demo

Every run resumes if interrupted; finished runs are skipped. At this size (batch 32, 4 layers)
AdamW replaces LAMB, whose trust-ratio steps are tuned for batches in the thousands, and
dropout is off for all three runs (TF1 distils without dropout; the baseline matches it).
"""

import ml_collections

from configs import distill_mobilebert, ib_bert_large

BATCH = 32
TEACHER_STEPS = 1000
STEPS_PER_LAYER = 50
DISTILL_STEPS = 400


def _demo_size(c):
  c.data.batch_size = BATCH
  c.train.optimizer = "adamw"
  c.train.dropout = False
  c.train.eval_steps = 8
  # At sequence length 64 BERT's pairing cuts what whole sentences overshoot an example: 26.5%
  # of the built-in corpus's tokens (25.8% of its eval part) reach no example. That is the
  # demo's size, not a data problem, so only a larger drop is warned about.
  c.data.expected_drop_fraction = 0.30
  return c


def get_config(arg=None):
  del arg
  teacher = _demo_size(ib_bert_large.get_config("smoke"))
  teacher.train.steps = TEACHER_STEPS
  teacher.train.learning_rate = 2e-3
  teacher.train.warmup_steps = 100
  teacher.train.eval_every = 250
  teacher.train.checkpoint_every = 250

  student = _demo_size(distill_mobilebert.get_config("smoke,preset=pkt"))
  student.teacher.checkpoint = "{workdir}/teacher"
  # The student reuses the teacher's tokenizer so both see the same vocabulary.
  student.data.vocab = "{workdir}/teacher/tokenizer"
  student.schedule.steps_per_layer = STEPS_PER_LAYER
  student.schedule.distill_steps = DISTILL_STEPS
  student.schedule.learning_rate = 2e-3
  student.schedule.warmup_steps = 40
  student.train.eval_every = 200

  scratch = _demo_size(distill_mobilebert.get_config("smoke,preset=scratch"))
  scratch.data.vocab = "{workdir}/teacher/tokenizer"
  # Same total steps, peak learning rate and warm-up as the distilled student.
  scratch.schedule.distill_steps = (STEPS_PER_LAYER * student.model.num_hidden_layers
                                    + DISTILL_STEPS)
  scratch.schedule.learning_rate = 2e-3
  scratch.schedule.warmup_steps = 40
  scratch.train.eval_every = 200

  c = ml_collections.ConfigDict()
  c.runs = ml_collections.ConfigDict()
  c.runs.order = ("teacher", "student", "scratch")
  c.runs.teacher = teacher
  c.runs.student = student
  c.runs.scratch = scratch
  return c
