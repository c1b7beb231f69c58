"""The config of a fine-tuning run: its sections and defaults (GLUE or SQuAD), its checks (every
one that needs no data and no compile), the optimizer and the run identity."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from mbert_jax.training import sharding
from mbert_jax.finetune import defaults as ft_defaults
from mbert_jax.finetune import glue as tasks_lib
from mbert_jax.models import preset
from mbert_jax.data.tokenizer import parse_trained_vocab_size
from mbert_jax.interop import model_source
from mbert_jax.training import config as train_config

POOLER_CHOICES = ("checkpoint", "tanh", "none")


def default_config(kind: str = "glue") -> ml_collections.ConfigDict:
  """Every section a fine-tuning run reads, with the TF1 release's defaults for `glue` or `squad`."""
  if kind not in ("glue", "squad"):
    raise ValueError(f"fine-tuning kind {kind!r}: 'glue' or 'squad'")
  d = ft_defaults.GLUE_DEFAULTS if kind == "glue" else ft_defaults.SQUAD_DEFAULTS
  c = ml_collections.ConfigDict()

  f = c.finetune = ml_collections.ConfigDict()
  f.classifier_dropout = float(ft_defaults.GLUE_DEFAULTS["classifier_dropout"])
  # checkpoint: keep the initial model's pooler choice; tanh: force a (fresh if absent) tanh
  # pooler; none: classify the raw [CLS] vector (the maintainer found the pooler can hurt GLUE).
  f.pooler = "checkpoint"
  f.doc_stride = int(ft_defaults.SQUAD_DEFAULTS["doc_stride"])
  f.max_query_length = int(ft_defaults.SQUAD_DEFAULTS["max_query_length"])
  f.max_answer_length = int(ft_defaults.SQUAD_DEFAULTS["max_answer_length"])
  f.n_best_size = int(ft_defaults.SQUAD_DEFAULTS["n_best_size"])
  f.null_score_diff_threshold = float(ft_defaults.SQUAD_DEFAULTS["null_score_diff_threshold"])

  i = c.init = ml_collections.ConfigDict()
  # An mbert-jax workdir (pretraining, distillation or fine-tuning run), a Hugging Face model
  # directory, a hub model name (downloaded; online only), or "" for random init (`model`).
  i.checkpoint = ""
  i.step = -1                  # mbert-jax workdirs: -1 = latest good checkpoint

  t = c.task = ml_collections.ConfigDict()
  t.name = "sst2" if kind == "glue" else "squad"
  t.version = "1.1"            # SQuAD only: 1.1 | 2.0
  # "" = the hub (nyu-mll/glue, rajpurkar/squad[_v2]); a local directory with the split files
  # (GLUE: train.tsv, dev.tsv, dev_matched.tsv, ... or <split>.jsonl; SQuAD: train-v1.1.json,
  # dev-v1.1.json or train.json, validation.json); or another hub dataset name.
  t.data = ""
  t.train_split = "train"
  t.eval_splits = ""           # comma-separated; "" = the task's (MNLI: matched, mismatched)
  t.max_train_examples = -1    # > 0: the first N examples only (smoke runs on hub data)
  t.max_eval_examples = -1

  da = c.data = ml_collections.ConfigDict()
  # A vocab.txt, tokenizer.json or a directory with either; `train:<size>` trains an uncased
  # WordPiece vocabulary on the training text; "" = the init checkpoint's tokenizer, or for
  # random init a trained one of `train_vocab_size` tokens.
  da.vocab = ""
  da.train_vocab_size = 8192
  da.lower_case = bool(d["lower_case"])  # vocab.txt only; tokenizer.json carries its own rules
  da.max_seq_length = int(d["max_seq_length"])
  da.batch_size = int(d["batch_size"])  # global
  da.eval_batch_size = 0       # 0 = batch_size
  da.cache_dir = ""            # `datasets` cache for hub downloads; "" = its default

  # The loop's section (training/config.py) with fine-tuning's defaults; `steps` > 0 overrides
  # epochs as the schedule's length; the seed sets head init, dropout and data order.
  tr = c.train = train_config.train_section(
      optimizer=str(d["optimizer"]),  # adamw_tf1: TF1 AdamWeightDecayOptimizer
      weight_decay=float(d["weight_decay"]), clip_norm=float(d["grad_clip_norm"]),
      b1=float(d["b1"]), b2=float(d["b2"]), eps=float(d["eps"]), eval_every=0,
      keep_checkpoints=2)
  del tr["eval_steps"]  # every evaluation reads whole splits
  tr.epochs = float(d["num_epochs"])
  tr.stop_at_step = -1         # > 0: checkpoint and stop there (the schedule still spans `steps`)
  tr.learning_rate = float(d["learning_rate"])
  tr.warmup_proportion = float(d["warmup_proportion"])
  tr.warmup_steps = -1         # >= 0 overrides warmup_proportion
  tr.lr_schedule = "linear"    # linear | polynomial | cosine | constant (optim.make_lr_schedule)
  tr.end_factor = float(d["end_lr_ratio"])

  # Architecture for random init only; with init.checkpoint the checkpoint's config is used.
  c.model = ml_collections.ConfigDict(preset("mobilebert").to_dict())
  c.model.vocab_size = -1      # -1: the tokenizer's size

  c.mesh = train_config.mesh_section()
  return c


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  kind: str                    # glue | squad
  name: str                    # GLUE task name or "squad"
  num_labels: int              # classes; 1 = regression; 2 = start/end for SQuAD
  glue: tasks_lib.GlueTask | None
  squad_version: str | None
  eval_splits: tuple[str, ...]
  main_metric: str

  @property
  def is_regression(self) -> bool:
    return self.kind == "glue" and self.num_labels == 1


def task_info(config) -> TaskInfo:
  name = str(config.task.name).strip()
  eval_splits = tuple(s.strip() for s in str(config.task.eval_splits).split(",") if s.strip())
  if name.lower() in ("squad", "squad_v2", "squad2", "squad_v1"):
    version = ft_defaults.squad_defaults(
        "2.0" if name.lower() in ("squad_v2", "squad2") else config.task.version)["version"]
    splits = eval_splits or ("validation",)
    for s in splits + (config.task.train_split,):
      if s not in ("train", "validation"):
        raise ValueError(f"SQuAD has splits 'train' and 'validation', not {s!r}")
    return TaskInfo("squad", "squad", 2, None, version, splits, "f1")
  spec = tasks_lib.get_task(name)  # ValueError naming the known tasks
  if config.task.train_split not in spec.splits:
    raise ValueError(f"task.train_split={config.task.train_split!r}: {spec.name} has splits "
                     f"{sorted(spec.splits)}" + (" (ax is test-only: evaluate an MNLI model on it)"
                                                 if spec.name == "ax" else ""))
  splits = eval_splits or spec.eval_splits
  for s in splits:
    if s not in spec.splits:
      raise ValueError(f"task.eval_splits: {spec.name} has no split {s!r}; splits: "
                       f"{sorted(spec.splits)}")
  return TaskInfo("glue", spec.name, spec.num_labels, spec, None, tuple(splits), spec.main_metric)


def optimizer_config(tc, total_steps: int, warmup_steps: int) -> ml_collections.ConfigDict:
  """The one stage's optimizer: `train`'s fields and its learning-rate schedule."""
  return train_config.optimizer_config(tc, tc.learning_rate, schedule=tc.lr_schedule,
                                       total_steps=total_steps, warmup_steps=warmup_steps,
                                       end_factor=tc.end_factor)


def validate_config(config) -> TaskInfo:
  """Checks that need no data and no compile; raises ValueError naming the field."""
  train_config.require_sections(config, ("finetune", "init", "task", "data", "train", "mesh"),
                                " (start from finetune.task.default_config)")
  info = task_info(config)
  t, d, f = config.train, config.data, config.finetune
  if float(t.epochs) <= 0 and int(t.steps) <= 0:
    raise ValueError(f"train.epochs = {t.epochs} and train.steps = {t.steps}: set a positive "
                     "number of epochs or steps")
  train_config.validate_train_section(t, eval_every_may_be_zero=True)
  if int(t.stop_at_step) == 0 or int(t.stop_at_step) < -1:
    raise ValueError(f"train.stop_at_step = {t.stop_at_step}: a positive step, or -1")
  if not 0.0 <= float(t.warmup_proportion) <= 1.0:
    raise ValueError(f"train.warmup_proportion = {t.warmup_proportion} must lie in [0, 1]")
  if int(t.warmup_steps) < -1:
    raise ValueError(f"train.warmup_steps = {t.warmup_steps}: >= 0, or -1 for warmup_proportion")
  # The optimizer fields are checked with a stand-in schedule length.
  optimizer_config(t, total_steps=max(int(t.steps), 1), warmup_steps=0)
  if int(d.batch_size) < 1 or int(d.eval_batch_size) < 0:
    raise ValueError(f"data.batch_size = {d.batch_size} must be >= 1 and data.eval_batch_size = "
                     f"{d.eval_batch_size} >= 0")
  min_len = 3 if info.kind == "glue" else int(f.max_query_length) + 4
  if int(d.max_seq_length) < min_len:
    raise ValueError(f"data.max_seq_length = {d.max_seq_length} is too short (at least "
                     f"{min_len} for {info.name})")
  if str(d.vocab).startswith("train:"):
    parse_trained_vocab_size(str(d.vocab))
  elif int(d.train_vocab_size) < 64:
    raise ValueError(f"data.train_vocab_size = {d.train_vocab_size} must be >= 64")
  if not 0.0 <= float(f.classifier_dropout) < 1.0:
    raise ValueError(f"finetune.classifier_dropout = {f.classifier_dropout} must lie in [0, 1)")
  if f.pooler not in POOLER_CHOICES:
    raise ValueError(f"finetune.pooler = {f.pooler!r}: choose one of {POOLER_CHOICES}")
  if info.kind == "squad":
    for name in ("doc_stride", "max_query_length", "max_answer_length", "n_best_size"):
      if int(f[name]) < 1:
        raise ValueError(f"finetune.{name} = {f[name]} must be >= 1")
  for name in ("max_train_examples", "max_eval_examples"):
    if int(config.task[name]) == 0 or int(config.task[name]) < -1:
      raise ValueError(f"task.{name} = {config.task[name]}: a positive count, or -1 for all")
  spec = str(config.init.checkpoint)
  if spec:
    path = os.path.expanduser(spec)
    if os.path.exists(path) and not os.path.isdir(path):
      raise FileNotFoundError(f"init.checkpoint = {spec!r} is a file; expected an mbert-jax "
                              "workdir or a Hugging Face model directory")
    if not os.path.exists(path) and not model_source.looks_like_hub_name(spec):
      raise FileNotFoundError(f"init.checkpoint = {spec!r}: no such directory")
  elif "model" not in config:
    raise ValueError("init.checkpoint is empty (random init) but the config has no `model` "
                     "section to build the model from")
  sharding.mesh_shape(config.mesh, jax.device_count())
  return info


STOP_FIELD = "train.stop_at_step"
# Fields besides the loop's (training/config.py) whose change leaves the checkpoints valid.
_RESUMABLE = {"data": ("cache_dir", "eval_batch_size"),
              "task": ("eval_splits", "max_eval_examples")}


def run_identity(config) -> dict[str, Any]:
  """What this run's checkpoints depend on (see `workdir.claim`)."""
  ident = {"kind": "finetune", **train_config.identity_sections(
      config, ("finetune", "init", "task", "data", "train"), STOP_FIELD, _RESUMABLE)}
  if not config.init.checkpoint:
    ident["model"] = config.model.to_dict()
  return ident
