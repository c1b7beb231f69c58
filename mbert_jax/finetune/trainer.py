"""Fine-tuning: GLUE classification / STS-B regression and SQuAD v1.1 / v2.0 span extraction.

    python launch.py --config=configs/finetune_glue.py:task=sst2 --workdir=runs/sst2 \
        --config.init.checkpoint=runs/student
    python launch.py --config=configs/finetune_squad.py:version=2.0 --workdir=runs/squad2

Reads top to bottom: config -> initial weights (an mbert-jax workdir, a Hugging Face directory
or random) -> task data -> tokenizer -> features -> sharded state (restored or initialised,
the backbone copied in, the head fresh) -> loop (log, evaluate, checkpoint, preemption) ->
final evaluation with the official metrics -> `final.json`.

Determinism: the training stream is the concatenation of per-epoch permutations drawn from
`train.seed`, and the batch at step s is rows [s·B, (s+1)·B) of it, a pure function of
(config, step); dropout keys are folded from the seed and the step. A run stopped anywhere and
resumed from `<workdir>/checkpoints` therefore ends with the same parameters, bit for bit on
CPU, as one that never stopped. One workdir holds one run: rerun with a new workdir per seed or
per grid point.

A workdir ends up with config.json, model_config.json and tokenizer/ (so the fine-tuned model
can seed another run, e.g. MNLI -> RTE), task.json (head and labels), checkpoints/,
metrics.jsonl and tensorboard/ (`eval/<split>/<metric>` rows), predictions/ (GLUE submission
TSVs; SQuAD answers and v2.0 null odds for the official scripts) and final.json.

Steps: TF1's int(rows / batch · epochs). SQuAD counts rows as windowed features (as Hugging
Face does), not questions (TF1 run_squad), so long contexts train on every window each epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from mbert_jax import checkpoint as ckpt_lib
from mbert_jax import metrics as metrics_lib
from mbert_jax import optim
from mbert_jax import sharding
from mbert_jax import train as train_lib
from mbert_jax.finetune import defaults as ft_defaults
from mbert_jax.finetune import squad as squad_lib
from mbert_jax.finetune import tasks as tasks_lib
from mbert_jax.finetune.metrics import glue_metrics, squad_metrics
from mbert_jax.models import (ModelConfig, build_classifier, build_span_extractor,
                              from_hf_config, preset)

__all__ = ["DONE_FILE", "TASK_FILE", "default_config", "validate_config", "finetune_and_evaluate",
           "train_batch_indices", "load_tokenizer"]

DONE_FILE = train_lib.DONE_FILE
TASK_FILE = "task.json"
BACKBONE = ("embeddings", "encoder", "pooler")
POOLER_CHOICES = ("checkpoint", "tanh", "none")
# GLUE's submission server wants label names for the NLI tasks and class ids elsewhere.
_NAMED_LABEL_TASKS = ("mnli", "qnli", "rte", "ax")
HF_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")


# ============================================================================ config

def default_config(kind: str = "glue") -> ml_collections.ConfigDict:
  """Every section a fine-tuning run reads, with spec §11 defaults for `glue` or `squad`."""
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

  tr = c.train = ml_collections.ConfigDict()
  tr.epochs = float(d["num_epochs"])
  tr.steps = -1                # > 0 overrides epochs: the schedule's total length
  tr.stop_at_step = -1         # > 0: checkpoint and stop there (the schedule still spans `steps`)
  tr.optimizer = "adamw_tf1"   # TF1 AdamWeightDecayOptimizer: no bias correction
  tr.learning_rate = float(d["learning_rate"])
  tr.warmup_proportion = float(d["warmup_proportion"])
  tr.warmup_steps = -1         # >= 0 overrides warmup_proportion
  tr.lr_schedule = "linear"
  tr.end_factor = float(d["end_lr_ratio"])
  tr.weight_decay = float(d["weight_decay"])
  tr.clip_norm = float(d["grad_clip_norm"])
  tr.b1 = float(d["b1"])
  tr.b2 = float(d["b2"])
  tr.eps = float(d["eps"])
  tr.grad_accum_steps = 1
  tr.log_every = 50
  tr.eval_every = 0            # 0 = evaluate only at the end
  tr.checkpoint_every = 1000
  tr.keep_checkpoints = 2
  tr.async_checkpoint = True
  tr.seed = 0                  # head init, dropout and data order; one workdir per seed
  tr.compute_dtype = "float32"
  tr.max_nonfinite_steps = 20
  tr.progress_bar = True
  tr.compilation_cache_dir = ""

  # Architecture for random init only; with init.checkpoint the checkpoint's config is used.
  c.model = ml_collections.ConfigDict(preset("mobilebert").to_dict())
  c.model.vocab_size = -1      # -1: the tokenizer's size

  m = c.mesh = ml_collections.ConfigDict()
  m.data = -1
  m.fsdp = 1
  m.tensor = 1
  m.logical_axis_rules = ()
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
  o = optim.default_optimizer_config()
  o.name = tc.optimizer
  o.learning_rate = float(tc.learning_rate)
  o.b1, o.b2, o.eps = float(tc.b1), float(tc.b2), float(tc.eps)
  o.weight_decay = float(tc.weight_decay)
  o.clip_norm = float(tc.clip_norm) if tc.clip_norm else None
  o.grad_accum_steps = int(tc.grad_accum_steps)
  o.schedule = tc.lr_schedule
  o.total_steps = int(total_steps)
  o.warmup_steps = int(warmup_steps)
  o.end_factor = float(tc.end_factor)
  o.power = 1.0
  return optim.validate_optimizer_config(o)


def _looks_like_hub_name(spec: str) -> bool:
  return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec) is not None
          and not spec.startswith((".", "/", "~")) and not spec.endswith((".json", ".txt")))


def validate_config(config) -> TaskInfo:
  """Checks that need no data and no compile; raises ValueError naming the field."""
  for section in ("finetune", "init", "task", "data", "train", "mesh"):
    if section not in config:
      raise ValueError(f"config has no `{section}` section (start from trainer.default_config)")
  info = task_info(config)
  t, d, f = config.train, config.data, config.finetune
  if float(t.epochs) <= 0 and int(t.steps) <= 0:
    raise ValueError(f"train.epochs = {t.epochs} and train.steps = {t.steps}: set a positive "
                     "number of epochs or steps")
  if int(t.steps) == 0 or int(t.steps) < -1:
    raise ValueError(f"train.steps = {t.steps}: a positive number of steps, or -1 for epochs")
  if int(t.stop_at_step) == 0 or int(t.stop_at_step) < -1:
    raise ValueError(f"train.stop_at_step = {t.stop_at_step}: a positive step, or -1")
  if not 0.0 <= float(t.warmup_proportion) <= 1.0:
    raise ValueError(f"train.warmup_proportion = {t.warmup_proportion} must lie in [0, 1]")
  if int(t.warmup_steps) < -1:
    raise ValueError(f"train.warmup_steps = {t.warmup_steps}: >= 0, or -1 for warmup_proportion")
  for name in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps",
               "grad_accum_steps"):
    if int(t[name]) < 1:
      raise ValueError(f"train.{name} = {t[name]} must be >= 1")
  if int(t.eval_every) < 0:
    raise ValueError(f"train.eval_every = {t.eval_every}: >= 1, or 0 for the end only")
  if t.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"train.compute_dtype = {t.compute_dtype!r}: float32 or bfloat16")
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
    from mbert_jax.data.tokenizer import parse_trained_vocab_size
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
    if not os.path.exists(path) and not _looks_like_hub_name(spec):
      raise FileNotFoundError(f"init.checkpoint = {spec!r}: no such directory")
  elif "model" not in config:
    raise ValueError("init.checkpoint is empty (random init) but the config has no `model` "
                     "section to build the model from")
  sharding.mesh_shape(config.mesh, jax.device_count())
  return info


# ============================================================================ initial model

@dataclasses.dataclass
class InitSource:
  kind: str                    # mbert | hf | random
  path: str | None
  model_config: ModelConfig | None
  tokenizer_dir: str | None


def _download_hub_model(name: str) -> str:
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(name, allow_patterns=[
        "config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin",
        "pytorch_model.bin.index.json", *HF_TOKENIZER_FILES])
  except Exception as e:  # offline, unknown repo, gated model: all end the same way here
    raise FileNotFoundError(f"init.checkpoint = {name!r} is not a local directory, and "
                            f"downloading it from the Hugging Face hub failed ({e})") from e


def resolve_init(init_cfg) -> InitSource:
  spec = str(init_cfg.checkpoint)
  if not spec:
    return InitSource("random", None, None, None)
  path = os.path.expanduser(spec)
  if not os.path.isdir(path):
    path = _download_hub_model(spec)
  if train_lib.is_mbert_workdir(path):
    with open(os.path.join(path, "model_config.json")) as f:
      cfg = ModelConfig.from_dict(json.load(f))
    tok = os.path.join(path, "tokenizer")
    return InitSource("mbert", path, cfg, tok if os.path.isdir(tok) else None)
  if os.path.isfile(os.path.join(path, "config.json")):
    with open(os.path.join(path, "config.json")) as f:
      cfg = from_hf_config(json.load(f))
    has_tok = any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "vocab.txt"))
    return InitSource("hf", path, cfg, path if has_tok else None)
  raise FileNotFoundError(f"init.checkpoint = {spec!r} holds neither an mbert-jax run "
                          "(model_config.json) nor a Hugging Face model (config.json)")


def finetune_model_config(source: InitSource, config, vocab_size: int) -> ModelConfig:
  """The model to fine-tune: the checkpoint's architecture (or `model` for random init)."""
  if source.model_config is not None:
    cfg = source.model_config
    if vocab_size > cfg.vocab_size:
      raise ValueError(f"the tokenizer has {vocab_size} tokens but the model's embedding table "
                       f"only {cfg.vocab_size}: use the checkpoint's own vocabulary (data.vocab)")
  else:
    d = dict(config.model.to_dict())
    if d.get("vocab_size", -1) in (-1, None):
      d["vocab_size"] = vocab_size
    elif d["vocab_size"] < vocab_size:
      raise ValueError(f"model.vocab_size = {d['vocab_size']} but the tokenizer has {vocab_size} "
                       "tokens; set model.vocab_size=-1 to follow the tokenizer")
    cfg = ModelConfig.from_dict(d)
  pooler = config.finetune.pooler
  if pooler != "checkpoint":
    cfg = cfg.replace(classifier_activation=(pooler == "tanh"))
  # Fresh heads follow TF1 (truncated normal) whatever the checkpoint's own init rule was.
  cfg = cfg.replace(compute_dtype=config.train.compute_dtype, init_distribution="truncated")
  return cfg.validate(max_seq_length=int(config.data.max_seq_length))


def check_model_early(source: InitSource, config) -> None:
  """The architecture checks that need no tokenizer, before any data is read."""
  if source.model_config is not None:
    source.model_config.validate(max_seq_length=int(config.data.max_seq_length))
    return
  d = dict(config.model.to_dict())
  if d.get("vocab_size", -1) in (-1, None):
    d["vocab_size"] = 1  # placeholder until the tokenizer is known
  ModelConfig.from_dict(d).validate(max_seq_length=int(config.data.max_seq_length))


def build_model(info: TaskInfo, cfg: ModelConfig, dropout: float):
  if info.kind == "squad":
    return build_span_extractor(cfg)
  return build_classifier(cfg, info.num_labels, dropout)


def _dummy_inputs():
  ids = jnp.zeros((1, 8), jnp.int32)
  return ids, jnp.zeros_like(ids), jnp.ones_like(ids)


def abstract_params(model, mesh, rules):
  """(unboxed ShapeDtypeStructs, NamedShardings) of the fine-tuning model, nothing allocated."""
  boxed = jax.eval_shape(lambda k: model.init(k, *_dummy_inputs())["params"], jax.random.key(0))
  unboxed = nn.unbox(boxed)
  return unboxed, sharding.tree_shardings(nn.get_partition_spec(boxed), unboxed, mesh, rules)


def init_params(model, key, shardings):
  init = jax.jit(lambda k: nn.unbox(model.init(k, *_dummy_inputs())["params"]),
                 out_shardings=shardings)
  return init(key)


def load_backbone(source: InitSource, init_cfg, abs_params, shardings) -> dict[str, Any]:
  """The initial model's embeddings / encoder / pooler, placed with the fine-tuning shardings.

  Only the parts both models have are read: a pooler the fine-tuning model lacks is skipped,
  one the checkpoint lacks stays fresh.
  """
  wanted = [k for k in BACKBONE if k in abs_params]
  if source.kind == "mbert":
    src_cfg = source.model_config
    src_parts = {"embeddings", "encoder"} | ({"pooler"} if src_cfg.classifier_activation else set())
    parts = [k for k in wanted if k in src_parts]
    target = {k: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abs_params[k], shardings[k]) for k in parts}
    step = None if int(init_cfg.step) < 0 else int(init_cfg.step)
    try:
      params, at = ckpt_lib.restore_params_only(os.path.join(source.path, "checkpoints"), target,
                                                step)
    except ValueError as e:
      raise ValueError(f"init.checkpoint = {source.path}: cannot restore its backbone ({e})") from e
    logging.info("init: %s step %d (%s)", source.path, at, ", ".join(parts))
    return dict(params)
  from mbert_jax import hf
  _, np_params = hf.load(source.path)
  out = {}
  for k in wanted:
    if k not in np_params:
      continue
    flat_src = traverse_util.flatten_dict(np_params[k], sep="/")
    flat_abs = traverse_util.flatten_dict(abs_params[k], sep="/")
    if set(flat_src) != set(flat_abs):
      raise ValueError(f"init.checkpoint = {source.path}: `{k}` parameters differ from the "
                       f"model's: {sorted(set(flat_src) ^ set(flat_abs))[:6]}")
    for p, a in flat_abs.items():
      if tuple(flat_src[p].shape) != tuple(a.shape):
        raise ValueError(f"init.checkpoint = {source.path}: {k}/{p} has shape "
                         f"{tuple(flat_src[p].shape)}, the model needs {tuple(a.shape)}")
    out[k] = jax.tree.map(lambda a, s: jax.device_put(np.asarray(a, np.float32), s),
                          np_params[k], shardings[k])
  return out


# ============================================================================ tokenizer

def load_tokenizer(spec: str, lower_case: bool = True):
  """A `tokenizers.Tokenizer` from a vocab.txt, a tokenizer.json or a directory with either."""
  # Same file resolution as pretraining; a vocab.txt may be cased here, and fine-tuning needs
  # only [CLS]/[SEP]/[PAD] (no [MASK]).
  from mbert_jax.data.tokenizer import read_tokenizer_json, tokenizer_file
  path = tokenizer_file(spec)
  if path.endswith(".json"):
    tok = read_tokenizer_json(path, spec)
  else:
    tok = tasks_lib.build_wordpiece_tokenizer(path, lowercase=lower_case)
  tasks_lib.special_token_ids(tok)  # [CLS]/[SEP]/[PAD] must exist
  return tok


def resolve_tokenizer(config, source: InitSource, workdir: str, texts: Callable[[], list[str]]):
  """Explicit data.vocab > the run's own saved tokenizer (resume) > checkpoint's > trained."""
  spec = str(config.data.vocab)
  saved = os.path.join(workdir, "tokenizer")
  if spec and not spec.startswith("train:"):
    return load_tokenizer(spec, bool(config.data.lower_case))
  if os.path.isdir(saved):  # a resumed run keeps the vocabulary it started with
    return load_tokenizer(saved, bool(config.data.lower_case))
  if not spec and source.tokenizer_dir:
    return load_tokenizer(source.tokenizer_dir, bool(config.data.lower_case))
  if not spec and source.kind != "random":
    raise FileNotFoundError(f"init.checkpoint = {source.path} has no tokenizer (tokenizer/, "
                            "tokenizer.json or vocab.txt): set data.vocab")
  from mbert_jax.data.tokenizer import parse_trained_vocab_size, train_wordpiece
  size = parse_trained_vocab_size(spec) if spec else int(config.data.train_vocab_size)
  corpus = texts()
  logging.info("training a %d-token WordPiece vocabulary on %d training texts", size, len(corpus))
  return train_wordpiece(corpus, size)


# ============================================================================ data

def _data_source(config, info: TaskInfo) -> str | None:
  spec = str(config.task.data)
  if not spec:
    return None
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise FileNotFoundError(f"task.data = {spec!r} is a file; give the directory holding the "
                            "split files (train and dev/validation)")
  if _looks_like_hub_name(spec):
    return spec
  raise FileNotFoundError(f"task.data = {spec!r}: no such directory")


def _first(n_max: int, dataset):
  return dataset if n_max < 0 or len(dataset) <= n_max else dataset.select(range(n_max))


def load_split(config, info: TaskInfo, split: str, limit: int):
  """One split as a `datasets.Dataset` in the canonical layout (tasks.py / squad.py)."""
  source = _data_source(config, info)
  cache = str(config.data.cache_dir) or None
  try:
    if info.kind == "squad":
      ds = squad_lib.load_squad(source, version=info.squad_version, split=split, cache_dir=cache)
    elif source is not None and not os.path.isdir(source):
      import datasets  # another hub copy of GLUE: same configs and columns
      hub = datasets.load_dataset(source, info.name, split=split, cache_dir=cache)
      ds = tasks_lib.load_glue(info.glue, hub, split)
    else:
      ds = tasks_lib.load_glue(info.glue, source, split, cache_dir=cache)
  except (ValueError, FileNotFoundError):
    raise  # problems with the data itself, already named
  except Exception as e:  # network, hub or cache failures come in many types
    where = "the Hugging Face hub" if source is None or not os.path.isdir(source) else source
    raise FileNotFoundError(
        f"{info.name} split {split!r}: loading from {where} failed ({type(e).__name__}: "
        f"{str(e)[:300]}); offline, set task.data to a local directory with the task's files"
    ) from e
  if len(ds) == 0:
    raise ValueError(f"{info.name} split {split!r} is empty")
  return _first(limit, ds)


@dataclasses.dataclass
class Split:
  name: str
  examples: Any                # datasets.Dataset
  arrays: dict[str, np.ndarray]  # model inputs (+ labels for training)
  features: squad_lib.SquadFeatures | None = None

  def __len__(self) -> int:
    return int(self.arrays["input_ids"].shape[0])


def featurize(config, info: TaskInfo, tokenizer, split: str, examples, training: bool) -> Split:
  seq = int(config.data.max_seq_length)
  if info.kind == "glue":
    enc = tasks_lib.encode_glue(info.glue, examples, tokenizer, seq)
    arrays = {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    arrays["labels"] = enc["labels"]
    if training:
      unlabelled = arrays["labels"] == -1
      if unlabelled.any():
        raise ValueError(f"{info.name} split {split!r}: {int(unlabelled.sum())} training examples "
                         "have no label")
    return Split(split, examples, arrays)
  f = config.finetune
  feats = squad_lib.prepare_squad_features(
      examples, tokenizer, max_seq_length=seq, doc_stride=int(f.doc_stride),
      max_query_length=int(f.max_query_length),
      version_2_with_negative=info.squad_version == "2.0", is_training=training)
  if len(feats) == 0:
    raise ValueError(f"SQuAD split {split!r} produced no features")
  arrays = feats.training_batch() if training else feats.model_inputs()
  return Split(split, examples, dict(arrays), feats)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def train_batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
  """Example indices of the global batch at `step`: rows [step·B, (step+1)·B) of the stream of
  per-epoch permutations (so an epoch boundary can fall inside a batch; nothing is dropped)."""
  pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
  epochs, within = np.divmod(pos, num_examples)
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = _epoch_permutation(seed, int(e), num_examples)[within[sel]]
  return out


def _local_rows(rows: np.ndarray) -> np.ndarray:
  n = rows.shape[0] // jax.process_count()
  return rows[jax.process_index() * n:(jax.process_index() + 1) * n]


# ============================================================================ steps

def task_loss(info: TaskInfo, outputs, batch):
  """Mean loss over the batch and terms to log."""
  if info.kind == "squad":
    start, end = outputs

    def ce(logits, target):
      return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
    s_loss, e_loss = ce(start, batch["start_positions"]), ce(end, batch["end_positions"])
    loss = 0.5 * (s_loss + e_loss)
    acc = 0.5 * (jnp.mean(jnp.argmax(start, -1) == batch["start_positions"])
                 + jnp.mean(jnp.argmax(end, -1) == batch["end_positions"]))
    return loss, {"loss": loss, "start_loss": s_loss, "end_loss": e_loss, "position_accuracy": acc}
  labels = batch["labels"]
  if info.is_regression:
    err = outputs[:, 0] - labels.astype(jnp.float32)
    loss = jnp.mean(err * err)
    return loss, {"loss": loss}
  loss = optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()
  acc = jnp.mean(jnp.argmax(outputs, -1) == labels)
  return loss, {"loss": loss, "accuracy": acc}


def _apply(model, params, batch, deterministic: bool, rng=None):
  return model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                     batch["attention_mask"], deterministic=deterministic,
                     rngs=None if rng is None else {"dropout": rng})


def make_train_step(model, info: TaskInfo, tx, lr_schedule, dropout_key,
                    grad_accum: int) -> Callable:
  def grad_fn(params, batch, rng):
    def loss_fn(p):
      return task_loss(info, _apply(model, p, batch, False, rng), batch)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def step(state, batch):
    rng = jax.random.fold_in(dropout_key, state["step"])
    (loss, terms), grads = optim.accumulate_gradients(grad_fn, state["params"], batch,
                                                      grad_accum, rng=rng)
    # A non-finite step is skipped, not applied; the loop stops after too many in a row.
    new_state, grad_norm, _ = train_lib.guarded_update(state, tx, loss, grads)
    out = dict(terms)
    # One optimizer update per step from a fresh state, so its count is the step.
    out.update(grad_norm=grad_norm, param_norm=optax.tree.norm(state["params"]),
               learning_rate=lr_schedule(state["step"]))
    return new_state, out

  return step


def make_predict(model, info: TaskInfo) -> Callable:
  def predict(params, batch):
    out = _apply(model, params, batch, True)
    if info.kind == "squad":
      return {"start_logits": out[0], "end_logits": out[1]}
    return {"logits": out}
  return predict


# ============================================================================ evaluation

def predict_split(predict_fn, params, split: Split, batch_size: int, mesh) -> dict[str, np.ndarray]:
  """Model outputs for every row; the last batch is padded with copies of row 0 (a real row,
  so no all-masked attention) and the padding is cut off again."""
  n = len(split)
  keys = ("input_ids", "token_type_ids", "attention_mask")
  outs: dict[str, list[np.ndarray]] = {}
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    rows = np.where(rows < n, rows, 0)
    local = {k: _local_rows(split.arrays[k][rows]) for k in keys}
    out = jax.device_get(predict_fn(params, sharding.global_batch(local, mesh)))
    for k, v in out.items():
      outs.setdefault(k, []).append(np.asarray(v, np.float32))
  return {k: np.concatenate(v)[:n] for k, v in outs.items()}


def glue_predictions(info: TaskInfo, logits: np.ndarray) -> np.ndarray:
  return logits[:, 0] if info.is_regression else np.argmax(logits, -1)


def score_glue(info: TaskInfo, split: Split, logits: np.ndarray) -> dict[str, float]:
  preds = glue_predictions(info, logits)
  labels = split.arrays["labels"]
  labelled = labels != -1
  if not labelled.any():
    return {}  # a test split: predictions only
  if not labelled.all():
    logging.warning("%s %s: %d of %d examples have no label; scoring the rest", info.name,
                    split.name, int((~labelled).sum()), labels.shape[0])
  return glue_metrics(info.name, preds[labelled], labels[labelled])


def score_squad(config, info: TaskInfo, split: Split, out: dict[str, np.ndarray]):
  f = config.finetune
  v2 = info.squad_version == "2.0"
  decoded = squad_lib.postprocess_squad_predictions(
      split.examples, split.features, out["start_logits"], out["end_logits"],
      n_best_size=int(f.n_best_size), max_answer_length=int(f.max_answer_length),
      version_2_with_negative=v2, null_score_diff_threshold=float(f.null_score_diff_threshold))
  if not v2 and not any(a["text"] for a in split.examples["answers"]):
    return {}, decoded  # no gold answers at all: nothing to score
  # With na_prob_thresh = the decoding threshold, exact_match/f1 score exactly the answers
  # decoded above; best_* search the threshold over the null-score differences.
  metrics = squad_metrics(decoded.predictions, split.examples,
                          na_probs=decoded.null_score_diff if v2 else None,
                          version=info.squad_version,
                          na_prob_thresh=float(f.null_score_diff_threshold))
  return metrics, decoded


def _finite_or_str(v: float):
  return v if math.isfinite(v) else str(v)


def write_predictions(workdir: str, info: TaskInfo, split: Split, out, decoded) -> str:
  """GLUE: `<task>_<split>.tsv` in the submission format; SQuAD: the official script's inputs."""
  d = os.path.join(workdir, "predictions")
  os.makedirs(d, exist_ok=True)
  if info.kind == "squad":
    path = os.path.join(d, f"squad_{split.name}.json")
    train_lib.write_json(path, decoded.predictions)
    if info.squad_version == "2.0":
      train_lib.write_json(os.path.join(d, f"squad_{split.name}_null_odds.json"),
                           {k: _finite_or_str(v) for k, v in decoded.null_score_diff.items()})
    return path
  preds = glue_predictions(info, out["logits"])
  names = info.glue.label_names if info.name in _NAMED_LABEL_TASKS else None
  path = os.path.join(d, f"{info.name}_{split.name}.tsv")
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as fh:
      fh.write("index\tprediction\n")
      for idx, p in zip(split.examples["idx"], preds):
        value = f"{float(p):.6f}" if info.is_regression else (names[int(p)] if names else int(p))
        fh.write(f"{idx}\t{value}\n")
    os.replace(path + ".tmp", path)
  return path


# ============================================================================ the run

def _total_steps(tc, num_train: int, batch_size: int) -> int:
  if int(tc.steps) > 0:
    return int(tc.steps)
  # TF1 run_classifier: int(num_examples / batch_size * num_epochs).
  total = int(num_train / batch_size * float(tc.epochs))
  if total < 1:
    raise ValueError(f"{num_train} training rows x {tc.epochs} epochs / batch {batch_size} is "
                     "less than one step; raise train.epochs or set train.steps")
  return total


def param_counts(abs_params) -> dict[str, int]:
  counts = {k: sum(math.prod(a.shape) for a in jax.tree.leaves(v)) for k, v in abs_params.items()}
  counts["backbone"] = sum(counts.get(k, 0) for k in BACKBONE)
  counts["total"] = sum(v for k, v in counts.items() if k != "backbone")
  return counts


def _check_resume(meta: dict, expected: dict, workdir: str) -> None:
  for key, want in expected.items():
    if key in meta and meta[key] != want:
      raise ValueError(f"{workdir} holds a run with {key} = {meta[key]!r}, this config has "
                       f"{want!r}; use a new workdir (one per task, seed and grid point)")


def finetune_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes (or resumes) the configured task in `workdir`; returns the final report.

  Report keys: status (completed | stopped | preempted), step, total_steps, task, seed,
  init, eval (`eval/<split>/<metric>` and `eval/score`, the task's headline number; the key
  train.py's report uses too), score, main_metric, wall_seconds, params.
  """
  t_start = time.time()
  info = validate_config(config)
  tc = config.train
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if tc.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", tc.compilation_cache_dir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh)
  batch_size = int(config.data.batch_size)
  eval_batch = int(config.data.eval_batch_size) or batch_size
  sharding.check_batch_divisible(batch_size, mesh, int(tc.grad_accum_steps))
  sharding.check_batch_divisible(eval_batch, mesh)

  # ---- initial model, data, tokenizer (all errors surface here, before any compile)
  source = resolve_init(config.init)
  check_model_early(source, config)
  train_examples = load_split(config, info, config.task.train_split,
                              int(config.task.max_train_examples))
  eval_examples = {s: load_split(config, info, s, int(config.task.max_eval_examples))
                   for s in info.eval_splits}

  def corpus() -> list[str]:
    if info.kind == "squad":
      return list(dict.fromkeys(train_examples["context"])) + list(train_examples["question"])
    return [t for field in info.glue.text_fields for t in train_examples[field]]

  tokenizer = resolve_tokenizer(config, source, workdir, corpus)
  vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
  m_cfg = finetune_model_config(source, config, vocab_size)
  model = build_model(info, m_cfg, float(config.finetune.classifier_dropout))
  train_split = featurize(config, info, tokenizer, config.task.train_split, train_examples, True)
  eval_splits = [featurize(config, info, tokenizer, s, ex, False)
                 for s, ex in eval_examples.items()]

  total = _total_steps(tc, len(train_split), batch_size)
  warmup = (int(tc.warmup_steps) if int(tc.warmup_steps) >= 0
            else int(total * float(tc.warmup_proportion)))
  end_step = total if int(tc.stop_at_step) < 0 else min(int(tc.stop_at_step), total)
  opt_cfg = optimizer_config(tc, total, warmup)
  seed = int(tc.seed)
  init_key, dropout_key = jax.random.split(jax.random.key(seed))

  if is_main:
    train_lib.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    train_lib.write_json(os.path.join(workdir, "model_config.json"), m_cfg.to_dict())
    train_lib.write_json(os.path.join(workdir, TASK_FILE), {
        "kind": info.kind, "task": info.name, "num_labels": info.num_labels,
        "label_names": list(info.glue.label_names or ()) if info.glue else None,
        "squad_version": info.squad_version, "max_seq_length": int(config.data.max_seq_length),
        "pooler": m_cfg.classifier_activation, "init": source.path})
    if not os.path.isdir(os.path.join(workdir, "tokenizer")):
      from mbert_jax.data.tokenizer import save_tokenizer
      save_tokenizer(tokenizer, os.path.join(workdir, "tokenizer"))

  # ---- state: restore or initialise
  abs_params, p_shardings = abstract_params(model, mesh, rules)
  tx = optim.build_optimizer(opt_cfg, abs_params)
  st_sh = train_lib.state_shardings(p_shardings, tx, abs_params, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(tc.keep_checkpoints),
                               async_save=bool(tc.async_checkpoint))
  expected_meta = {"task": info.name, "seed": seed, "total_steps": total,
                   "train_rows": len(train_split), "batch_size": batch_size}
  if ckpt.latest_step() is not None:  # before any restore: a foreign run must not be resumed
    _check_resume(ckpt.read_meta(ckpt.latest_step()), expected_meta, workdir)
  restored = ckpt.restore_latest_good(lambda meta: train_lib.abstract_state(st_sh, abs_params, tx))
  if restored is not None:
    start, state, _ = restored
    logging.info("resumed %s from step %d", workdir, start)
  else:
    start = 0
    params = init_params(model, init_key, p_shardings)
    if source.kind != "random":
      params = {**params, **load_backbone(source, config.init, abs_params, p_shardings)}
    # Scalars placed on the mesh like the step's outputs: otherwise the second step sees
    # different input types and the whole step compiles twice.
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
    state = {"step": zero(), "params": params,
             "opt_state": jax.jit(tx.init, out_shardings=st_sh["opt_state"])(params),
             "nonfinite": zero(), "skipped": zero()}

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  progress = metrics_lib.Progress(end_step, start, enabled=is_main and bool(tc.progress_bar))

  def say(text: str) -> None:
    if progress.bar is not None:
      progress.write(text)
    elif is_main:
      print(text, flush=True)

  say(f"fine-tuning {info.name} ({info.kind}): {len(train_split)} training rows, {total} steps "
      f"(warm-up {warmup}), batch {batch_size}, init {source.path or 'random'}, seed {seed}")

  train_keys = tuple(train_split.arrays)
  batch_sh = {k: sharding.batch_sharding(mesh, train_split.arrays[k].ndim) for k in train_keys}
  lr_fn = optim.lr_schedule_from_config(opt_cfg)
  step_fn = jax.jit(make_train_step(model, info, tx, lr_fn, dropout_key, int(tc.grad_accum_steps)),
                    in_shardings=(st_sh, batch_sh),
                    out_shardings=(st_sh, sharding.replicated(mesh)),
                    donate_argnums=(0,))
  eval_sh = {k: sharding.batch_sharding(mesh, 2) for k in ("input_ids", "token_type_ids",
                                                            "attention_mask")}
  predict_fn = jax.jit(make_predict(model, info), in_shardings=(p_shardings, eval_sh),
                       out_shardings=sharding.replicated(mesh))

  def evaluate(params, step: int, final: bool) -> dict[str, float]:
    result: dict[str, float] = {}
    for split in eval_splits:
      out = predict_split(predict_fn, params, split, eval_batch, mesh)
      if info.kind == "squad":
        metrics, decoded = score_squad(config, info, split, out)
      else:
        metrics, decoded = score_glue(info, split, out["logits"]), None
      for k, v in metrics.items():
        result[f"eval/{split.name}/{k}"] = float(v)
      if final:
        write_predictions(workdir, info, split, out, decoded)
    headline = f"eval/{info.eval_splits[0]}/{info.main_metric}" if info.eval_splits else None
    if headline in result:
      result["eval/score"] = result[headline]
    writer.write(step, result)
    if result:
      say(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result

  def meta_for(step: int) -> dict:
    return {"step": int(step), **expected_meta}

  def rows_at(step: int) -> dict[str, np.ndarray]:
    rows = _local_rows(train_batch_indices(step, batch_size, len(train_split), seed))
    return {k: train_split.arrays[k][rows] for k in train_keys}

  status = "completed"
  last_eval: dict[str, float] = {}
  step = start
  timer = metrics_lib.Timer()
  since_log = 0
  with train_lib._Preemption() as preemption:
    while step < end_step:
      state, out = step_fn(state, sharding.global_batch(rows_at(step), mesh))
      step += 1
      since_log += 1
      if step == start + 1:  # keep the compile out of the throughput numbers
        jax.block_until_ready(out)
        say(f"first step (compile included): {timer.lap():.1f}s")
        since_log = 0
      at_log = step % int(tc.log_every) == 0 or step == end_step
      if at_log or step % int(tc.max_nonfinite_steps) == 0:
        bad = int(jax.device_get(state["nonfinite"]))
        if bad >= int(tc.max_nonfinite_steps):
          ckpt.wait()
          raise train_lib.NonFiniteError(
              f"{bad} consecutive steps had a non-finite loss or gradient (up to step {step}); "
              "the updates were skipped. Lower train.learning_rate or check the data.")
      if at_log:
        host = {k: float(v) for k, v in jax.device_get(out).items()}
        dt = timer.lap()
        host["skipped_steps"] = float(jax.device_get(state["skipped"]))
        if since_log:
          host.update(steps_per_second=since_log / dt,
                      examples_per_second=since_log * batch_size / dt)
        writer.write(step, host)
        progress.update(step, {"loss": host["loss"]})
        since_log = 0
      if int(tc.eval_every) and step % int(tc.eval_every) == 0 and step < total:
        last_eval = evaluate(state["params"], step, final=False)
      saved = step % int(tc.checkpoint_every) == 0 or step == end_step
      if saved:
        ckpt.save(step, state, meta_for(step))
      if preemption.agreed() and step < end_step:
        if not saved:
          ckpt.save(step, state, meta_for(step))
        ckpt.wait()
        status = "preempted"
        break
  ckpt.close()
  progress.close()

  if status != "preempted" and step < total:
    status = "stopped"
  if status == "completed":
    last_eval = evaluate(state["params"], step, final=True)
  report = {
      "status": status, "step": int(step), "total_steps": total, "task": info.name,
      "kind": info.kind, "squad_version": info.squad_version, "seed": seed,
      "init": source.path or "random", "eval": last_eval,
      "score": last_eval.get("eval/score"), "main_metric": info.main_metric,
      "wall_seconds": time.time() - t_start, "checkpoints": ckpt.directory,
      "params": param_counts(abs_params),
      "skipped_steps": int(jax.device_get(state["skipped"])),
  }
  if status == "completed":
    finite = {k: _finite_or_str(v) for k, v in last_eval.items()}
    train_lib.write_json(os.path.join(workdir, DONE_FILE), {**report, "eval": finite})
  elif status == "preempted":
    say(f"preempted at step {step}; rerun the same command to resume")
  else:
    say(f"stopped at step {step} of {total} (train.stop_at_step); rerun without it to finish")
  writer.close()
  return report
