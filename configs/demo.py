"""The offline demo: a tiny IB-BERT teacher pretrained on the built-in corpus, then distilled
into a tiny MobileBERT with the progressive (pkt) schedule, and a `scratch` student trained for
the same number of steps on the same data as the baseline.

    python launch.py --config=configs/demo.py --workdir=runs/demo

Every run resumes if interrupted; finished runs are skipped.
"""

import ml_collections

from configs import distill_mobilebert, ib_bert_large


def get_config(arg=None):
  del arg
  teacher = ib_bert_large.get_config("smoke")
  teacher.train.steps = 600
  teacher.train.eval_every = 200
  teacher.train.checkpoint_every = 200

  student = distill_mobilebert.get_config("smoke,preset=pkt")
  student.teacher.checkpoint = "{workdir}/teacher"
  # The student reuses the teacher's tokenizer so both see the same vocabulary.
  student.data.vocab = "{workdir}/teacher/tokenizer"

  scratch = distill_mobilebert.get_config("smoke,preset=scratch")
  scratch.data.vocab = "{workdir}/teacher/tokenizer"
  # Same total steps as the distilled student.
  scratch.schedule.distill_steps = (student.schedule.steps_per_layer * student.model.num_hidden_layers
                                    + student.schedule.distill_steps)
  scratch.schedule.learning_rate = student.schedule.learning_rate

  c = ml_collections.ConfigDict()
  c.runs = ml_collections.ConfigDict()
  c.runs.order = ("teacher", "student", "scratch")
  c.runs.teacher = teacher
  c.runs.student = student
  c.runs.scratch = scratch
  return c
