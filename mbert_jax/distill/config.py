"""The config of a pretraining or distillation run: its checks (every one that needs no data
and no compile), the student's model config, the optimizer, the stages, and the run identity
that a workdir keeps."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from mbert_jax.data.config import validate_data_config
from mbert_jax.distill import micro_teacher
from mbert_jax.distill import schedule as schedule_lib
from mbert_jax.models import ModelConfig, ModernConfig, config_from_dict
from mbert_jax.models.config import table_size_for
from mbert_jax.training import config as train_config
from mbert_jax.training import sharding

TEACHER_VOCAB = "teacher"  # data.vocab: the teacher's own tokenizer files
STOP_FIELD = "train.steps"
# Data fields whose change leaves the checkpoints valid.
RESUMABLE_DATA_FIELDS = ("cache_dir", "num_proc", "expected_drop_fraction")


def model_config_from(section, vocab_size: int, compute_dtype: str, max_seq_length: int,
                      special_ids: dict[str, int] | None = None) -> ModelConfig | ModernConfig:
  """The student's (or a pretrained model's) config for a tokenizer of `vocab_size` tokens. A
  ModernBERT/EuroBERT section's unset pad/mask ids come from the tokenizer's `special_ids`
  (its vocabulary is trained with the run, so the config file cannot know them)."""
  d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  d["vocab_size"] = table_size_for(d.get("vocab_size", -1), vocab_size)
  d["compute_dtype"] = compute_dtype
  if "family" in d and special_ids:
    for role in ("pad", "mask"):
      if d.get(f"{role}_token_id") is None and special_ids.get(role, -1) >= 0:
        d[f"{role}_token_id"] = special_ids[role]
  return config_from_dict(d).validate(max_seq_length=max_seq_length)


def optimizer_config(config) -> ml_collections.ConfigDict:
  """The optimizer of `train`; each stage brings its own learning-rate schedule."""
  return train_config.optimizer_config(config.train, config.schedule.learning_rate)


def schedule_fields(config) -> str:
  """The config fields a user sets to change the preset stages, for error messages."""
  if "learning_rate" in config.train:  # a pretraining config: its one stage follows train.*
    return ("the stage's length, warm-up and learning rate are train.steps, "
            "train.warmup_steps and train.learning_rate")
  return ("stage lengths are schedule.steps_per_layer (layer-wise phases), "
          "schedule.transfer_steps (joint transfer) and schedule.distill_steps (the final "
          "stage); its warm-up and learning rate are schedule.warmup_steps and "
          "schedule.learning_rate")


def build_stages(config, num_layers: int) -> list[schedule_lib.Stage]:
  try:
    return schedule_lib.build_schedule(config.schedule, num_layers)
  except ValueError as e:
    raise ValueError(f"schedule `{config.schedule.name}`: {e}; {schedule_fields(config)}") from e


def validate_config(config) -> list[schedule_lib.Stage]:
  """Checks that need no data and no compile; raises ValueError naming the field."""
  train_config.require_sections(config, ("model", "data", "train", "mesh", "schedule"))
  t = config.train
  train_config.validate_train_section(t, eval_every_may_be_zero=False)
  if config.get("teacher") and config.teacher.compute_dtype not in train_config.DTYPES:
    raise ValueError(f"teacher.compute_dtype = {config.teacher.compute_dtype!r}: float32 or "
                     "bfloat16")
  optimizer_config(config)
  validate_data_config(config.data)
  model = dict(config.model.to_dict())
  if model.get("vocab_size", -1) == -1:
    model["vocab_size"] = 1  # placeholder until the tokenizer is known
  config_from_dict({**model, "compute_dtype": t.compute_dtype}).validate(
      max_seq_length=config.data.max_seq_length)
  stages = build_stages(config, config.model.num_hidden_layers)
  nsp_stages = [s.name for s in stages if s.weight("nsp") > 0]
  if not config.data.next_sentence and nsp_stages:
    raise ValueError(f"data.next_sentence=False builds single-segment examples without "
                     f"next-sentence labels, but stage(s) {nsp_stages} weight the NSP loss: set "
                     "schedule.nsp_factor=0 (or data.next_sentence=True)")
  if any(s.needs_teacher for s in stages):
    path = config.teacher.checkpoint
    if not path:
      raise ValueError(f"schedule `{config.schedule.name}` needs a teacher: set teacher.checkpoint "
                       "to an mbert-jax workdir or a Hugging Face directory")
    if not os.path.isdir(path) and not micro_teacher.is_micro(path):
      raise FileNotFoundError(f"teacher.checkpoint = {path!r} is not a directory")
  sharding.mesh_shape(config.mesh, jax.device_count())
  return stages


def run_identity(config) -> dict[str, Any]:
  """What this run's checkpoints depend on (see `workdir.claim`)."""
  c = config.to_dict()
  stages = build_stages(config, config.model.num_hidden_layers)
  # The final stage may grow ("more steps"): it is where a run stops, and a longer one only
  # stretches its learning-rate decay. Every earlier boundary fixes which stage a checkpoint
  # belongs to, so those are part of the identity.
  # Where the PD stage reads its teacher targets is not part of it either: a cache is checked
  # against the data and teacher it was built for (teacher_cache.identity_key), so a run may
  # switch to one mid-stage, or read a moved copy, like it may change compute_dtype.
  sched = {k: v for k, v in c["schedule"].items() if k not in ("distill_steps", "teacher_cache")}
  sched["stages"] = [[s.name, s.steps] for s in stages[:-1]] + [[stages[-1].name]]
  sections = train_config.identity_sections(config, ("data", "train"), STOP_FIELD,
                                            {"data": RESUMABLE_DATA_FIELDS})
  ident = {"task": "pretrain", "model": c["model"], "schedule": sched, "kt": c.get("kt", {}),
           **sections}
  if any(s.needs_teacher for s in stages):
    ident["teacher"] = {k: v for k, v in c["teacher"].items()
                        if k not in ("compute_dtype", "frozen_fresh")}
  return ident
