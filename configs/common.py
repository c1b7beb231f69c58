"""Shared pieces of the config files: the sections every run has and the `:arg` parser.

Config files are code: `get_config(arg)` returns an ml_collections ConfigDict. The argument is
a comma-separated list such as `smoke` or `smoke,preset=jkt` (big_vision's `parse_arg`).
"""

from __future__ import annotations

import ml_collections

from mbert_jax.data.config import default_data_config
from mbert_jax.models.config import preset as model_preset
from mbert_jax.distill.schedule import default_schedule_config
from mbert_jax.training import config as train_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`'smoke,preset=pkt'` -> ConfigDict(smoke=True, preset='pkt'), typed after `defaults`."""
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if not sep:
      if kind is not bool:
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ("1", "true", "yes", "on")
    else:
      out[key] = kind(value)
  return out


def model_section(name: str, **overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(model_preset(name, **overrides).to_dict())


def train_section() -> ml_collections.ConfigDict:
  """How a pretraining or distillation run trains (mbert_jax/training/config.py). The learning
  rate belongs to the schedule (`schedule.learning_rate`, `schedule.warmup_steps`, ...);
  pretraining configs add `train.learning_rate`, `train.warmup_steps` and `train.end_factor`
  and the one stage follows them (`pretraining_schedule`)."""
  t = train_config.train_section()
  t.dropout = True            # False runs the student deterministically (TF1 KT/PD does)
  return t


mesh_section = train_config.mesh_section
distributed_section = train_config.distributed_section


def teacher_section() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.checkpoint = ""           # an mbert-jax workdir or a Hugging Face directory
  t.step = -1                 # -1 = latest good checkpoint
  t.compute_dtype = "float32"
  t.copy_embeddings = True    # word table, embedding transformation, position and type tables
  t.copy_embedding_norm = "auto"  # auto: only if teacher and student use the same norm type
  t.copy_mlm_head = True
  t.copy_nsp_head = True
  # A stage that runs embeddings (or heads) frozen which the teacher could not seed (another
  # width: every ModernBERT/EuroBERT teacher, any wider BERT, under pkt/pkt_freeze/jkt) trains
  # on random inputs: refuse (naming pkt_tf2), or warn and run.
  t.frozen_fresh = "refuse"
  # True: the checkpoint's architecture with fresh weights (seed REINIT_SEED in
  # mbert_jax/distill/teacher.py): the control that tells what a pretrained teacher transfers
  # from what the schedule alone does (configs/demo_bert_teacher.py:control).
  t.reinitialise = False
  return t


def kt_section() -> ml_collections.ConfigDict:
  k = ml_collections.ConfigDict()
  k.normalize_features = True     # official LN0 feature MSE; False = plain MSE
  k.feature_over = "all"          # FMT and mean/var over all positions (official) | real tokens
  k.attention_over = "all"        # all positions (official) | real (non-padding query rows)
  k.attention_kind = "ce"         # ce (official, KL gradient) | kl
  k.tf1_all_layer_stats = False   # TF1 quirk: mean/var vs all teacher outputs
  # Teachers of another shape (mbert_jax.distill.teacher.check_transfer validates these before compile):
  k.feature_transfer = "features"  # features (FMT + mean/var) | similarity (token-similarity MSE)
  k.feature_projection = "auto"    # auto (shared when widths differ) | shared | per_layer | none
  k.attention_transfer = "auto"    # auto (per_head if head counts match) | per_head | relation
  k.relation_heads = 0             # MiniLMv2 relation heads; 0 = auto (divides both Q/K/V widths)
  k.layer_map = ()                 # 1-based teacher layer per student layer; () = uniform map
  # Pre-norm teachers (ModernBERT, EuroBERT) hand over their un-normalised residual stream:
  # auto = final_norm (each state through the teacher's own final norm, where its last state
  # and MLM head live) for them, none for BERT-family teachers (states already LayerNorm'd);
  # layer_norm = a parameter-free LayerNorm; none = compare the raw stream.
  k.teacher_feature_norm = "auto"
  # Rotary teachers: MiniLMv2 Q-Q/K-K relations of the queries and keys as the teacher's
  # attention multiplies them (rotated, each layer with its own theta) or before the rotation.
  k.relation_rotary = "rotated"
  return k


def teacher_cache_section() -> ml_collections.ConfigDict:
  from mbert_jax.distill.teacher_cache import default_cache_config
  return default_cache_config()


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_section("mobilebert")
  c.teacher = teacher_section()
  c.schedule = default_schedule_config()
  c.kt = kt_section()
  c.teacher_cache = teacher_cache_section()
  c.data = default_data_config()
  c.train = train_section()
  c.mesh = mesh_section()
  c.distributed = distributed_section()
  return c


def pretraining_schedule(c: ml_collections.ConfigDict, steps: int, learning_rate: float,
                         warmup_steps: int, end_factor: float = 0.0) -> None:
  """One MLM + NSP stage of `train.steps` steps whose learning rate follows `train.*`
  (teacher / baseline pretraining): TF1's linear warm-up then linear decay to
  end_factor x learning_rate. Distillation configs have no train.learning_rate: their stages
  take it from `schedule.*`. The teacher and kt sections are dropped: nothing reads them here."""
  c.train.steps = steps
  c.train.learning_rate = learning_rate
  c.train.warmup_steps = warmup_steps
  c.train.end_factor = end_factor
  c.schedule.name = "scratch"
  c.schedule.distill_steps = c.train.get_ref("steps")
  c.schedule.learning_rate = c.train.get_ref("learning_rate")
  c.schedule.warmup_steps = c.train.get_ref("warmup_steps")
  c.schedule.end_factor = c.train.get_ref("end_factor")
  for unread in ("teacher", "kt", "teacher_cache"):
    if unread in c:
      del c[unread]


def smoke(c: ml_collections.ConfigDict, model: str | ml_collections.ConfigDict) -> None:
  """Shrinks any preset to a CPU-sized run: micro model (a preset name or a model section),
  built-in corpus, one device axis."""
  c.model = model_section(model) if isinstance(model, str) else model
  smoke_data(c)
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_steps = 4
  c.train.checkpoint_every = 100
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1


def smoke_data(c: ml_collections.ConfigDict) -> None:
  """CPU-sized data: the built-in corpus, a small trained vocabulary, short sequences."""
  c.data.source = "builtin"
  c.data.vocab = "train:2048"
  c.data.max_seq_length = 64
  c.data.max_predictions_per_seq = 10
  c.data.batch_size = 16
  c.model.vocab_size = -1      # -1: take the size of the tokenizer's vocabulary
  c.model.max_position_embeddings = 64


def finetune_smoke(c: ml_collections.ConfigDict, seq: int, train_examples: int,
                   eval_examples: int) -> None:
  """CPU-sized fine-tuning: a random 2-layer micro model with a small trained vocabulary."""
  c.init.checkpoint = ""
  c.model = model_section("mobilebert_micro", num_hidden_layers=2)
  c.model.vocab_size = -1
  c.data.train_vocab_size = 1024
  c.data.max_seq_length = seq
  c.data.batch_size = 16
  c.task.max_train_examples = train_examples
  c.task.max_eval_examples = eval_examples
  c.train.steps = 60
  c.train.learning_rate = 3e-3  # a random micro model needs far more than 5e-5 to move
  c.train.log_every = 10
  c.train.checkpoint_every = 20
