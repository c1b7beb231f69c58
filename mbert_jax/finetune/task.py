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
import logging
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mbert_jax.training import optim
from mbert_jax.training import sharding
from mbert_jax.training import loop
from mbert_jax.training.task import Setup, StagePlan
from mbert_jax.training.workdir import (CONFIG_FILE, DONE_FILE, MODEL_CONFIG_FILE, TASK_FILE,
                                        TOKENIZER_DIR, write_json)
from mbert_jax.finetune import defaults as ft_defaults
from mbert_jax.finetune import squad as squad_lib
from mbert_jax.finetune import glue as tasks_lib
from mbert_jax.finetune.metrics import glue_metrics, squad_metrics
from mbert_jax.models import ModelConfig, build_for, example_inputs, preset
from mbert_jax.models.config import table_size_for
from mbert_jax.data.tokenizer import (FINETUNE_SPECIAL_TOKENS, load_tokenizer,
                                      parse_trained_vocab_size, save_tokenizer, train_wordpiece)
from mbert_jax.interop import model_source
from mbert_jax.training import config as train_config

__all__ = ["DONE_FILE", "TASK_FILE", "FinetuneTask", "default_config", "validate_config",
           "finetune_and_evaluate", "train_batch_indices"]

BACKBONE = ("embeddings", "encoder", "pooler")
POOLER_CHOICES = ("checkpoint", "tanh", "none")
# GLUE's submission server wants label names for the NLI tasks and class ids elsewhere.
_NAMED_LABEL_TASKS = ("mnli", "qnli", "rte", "ax")


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
    if not os.path.exists(path) and not model_source.looks_like_hub_name(spec):
      raise FileNotFoundError(f"init.checkpoint = {spec!r}: no such directory")
  elif "model" not in config:
    raise ValueError("init.checkpoint is empty (random init) but the config has no `model` "
                     "section to build the model from")
  sharding.mesh_shape(config.mesh, jax.device_count())
  return info


# ============================================================================ initial model

@dataclasses.dataclass(frozen=True)
class InitSource:
  """The initial model: a checkpoint `model_source.locate` found, or None for random init."""
  checkpoint: model_source.ModelSource | None

  @property
  def kind(self) -> str:
    """'mbert' (a run), 'hf', 'sentence-transformers' (`model_source` kinds) or 'random'."""
    return self.checkpoint.kind if self.checkpoint else "random"

  @property
  def path(self) -> str | None:
    return self.checkpoint.path if self.checkpoint else None

  @property
  def model_config(self) -> ModelConfig | None:
    return self.checkpoint.model_config if self.checkpoint else None

  @property
  def tokenizer_dir(self) -> str | None:
    return self.checkpoint.tokenizer_dir if self.checkpoint else None


def resolve_init(init_cfg) -> InitSource:
  """`init.checkpoint`: an mbert-jax run, a Hugging Face directory or hub name, or "" (random)."""
  spec = str(init_cfg.checkpoint)
  if not spec:
    return InitSource(None)
  return InitSource(model_source.locate(spec, setting="init.checkpoint", allow_hub=True))


def finetune_model_config(source: InitSource, config, vocab_size: int) -> ModelConfig:
  """The model to fine-tune: the checkpoint's architecture (or `model` for random init)."""
  if source.model_config is not None:
    cfg = source.model_config
    if vocab_size > cfg.vocab_size:
      raise ValueError(f"the tokenizer has {vocab_size} tokens but the model's embedding table "
                       f"only {cfg.vocab_size}: use the checkpoint's own vocabulary (data.vocab)")
  else:
    d = dict(config.model.to_dict())
    d["vocab_size"] = table_size_for(d.get("vocab_size", -1), vocab_size)
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
  head = "question_answering" if info.kind == "squad" else "classification"
  return build_for(cfg, head, info.num_labels, dropout)


def abstract_params(model, cfg: ModelConfig, mesh, rules):
  """(unboxed ShapeDtypeStructs, NamedShardings) of the fine-tuning model, nothing allocated."""
  _, unboxed, shardings = sharding.abstract_params(
      model, example_inputs(cfg, "classification"), mesh, rules)
  return unboxed, shardings


def init_params_of(model, cfg: ModelConfig, key, shardings):
  args, kwargs = example_inputs(cfg, "classification")
  return sharding.init_model_params(model, args, key, shardings, **kwargs)


def load_backbone(source: InitSource, init_cfg, abs_params, shardings) -> dict[str, Any]:
  """The initial model's embeddings / encoder / pooler, placed with the fine-tuning shardings.

  Only the parts both models have are read: a pooler the fine-tuning model lacks is skipped,
  one the checkpoint lacks stays fresh.
  """
  has = {"embeddings", "encoder"} | (
      {"pooler"} if source.model_config.classifier_activation else set())
  parts = [k for k in BACKBONE if k in abs_params and k in has]
  target = {k: sharding.with_shardings(abs_params[k], shardings[k]) for k in parts}
  step = None if int(init_cfg.step) < 0 else int(init_cfg.step)
  loaded = model_source.load(source.checkpoint, target, step=step)
  at = "" if loaded.step is None else f" step {loaded.step}"
  logging.info("init: %s%s (%s)", source.path, at, ", ".join(parts))
  return dict(loaded.params)


# ============================================================================ tokenizer

def resolve_tokenizer(config, source: InitSource, workdir: str, texts: Callable[[], list[str]]):
  """Explicit data.vocab > the run's own saved tokenizer (resume) > checkpoint's > trained."""
  spec = str(config.data.vocab)
  saved = os.path.join(workdir, TOKENIZER_DIR)
  # Fine-tuning never masks: a vocabulary without [MASK] will do.
  load = functools.partial(load_tokenizer, lower_case=bool(config.data.lower_case),
                           require=FINETUNE_SPECIAL_TOKENS)
  if spec and not spec.startswith("train:"):
    return load(spec)
  if os.path.isdir(saved):  # a resumed run keeps the vocabulary it started with
    return load(saved)
  if not spec and source.tokenizer_dir:
    return load(source.tokenizer_dir)
  if not spec and source.kind != "random":
    raise FileNotFoundError(f"init.checkpoint = {source.path} has no tokenizer ({TOKENIZER_DIR}/, "
                            "tokenizer.json or vocab.txt): set data.vocab")
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
  if model_source.looks_like_hub_name(spec):
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


def make_loss(model, info: TaskInfo):
  """The fine-tuning loss for the one loop: (params, aux, batch, dropout rng) -> (loss, terms)."""
  def loss_fn(params, aux, batch, rng):
    del aux
    return task_loss(info, _apply(model, params, batch, False, rng), batch)
  return loss_fn


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
    write_json(path, decoded.predictions)
    if info.squad_version == "2.0":
      write_json(os.path.join(d, f"squad_{split.name}_null_odds.json"),
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


# ============================================================================ the task

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


class FinetuneTask:
  """GLUE classification / STS-B regression / SQuAD span extraction for
  `mbert_jax.training.loop.run`."""

  stop_field = STOP_FIELD

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.info = validate_config(config)

  def identity(self) -> dict[str, Any]:
    return run_identity(self.config)

  def setup(self, workdir: str, mesh, rules) -> Setup:
    """Reads the initial model, the task's data and the tokenizer (every input error surfaces
    here, before any compile) and builds the one fine-tuning stage."""
    config, info, tc = self.config, self.info, self.config.train
    batch_size = int(config.data.batch_size)
    eval_batch = int(config.data.eval_batch_size) or batch_size
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
    m_cfg = finetune_model_config(source, config, tokenizer.get_vocab_size(with_added_tokens=True))
    model = build_model(info, m_cfg, float(config.finetune.classifier_dropout))
    train_split = featurize(config, info, tokenizer, config.task.train_split, train_examples, True)
    eval_splits = [featurize(config, info, tokenizer, s, ex, False)
                   for s, ex in eval_examples.items()]
    total = _total_steps(tc, len(train_split), batch_size)
    warmup = (int(tc.warmup_steps) if int(tc.warmup_steps) >= 0
              else int(total * float(tc.warmup_proportion)))
    stop = total if int(tc.stop_at_step) < 0 else min(int(tc.stop_at_step), total)
    opt_cfg = optimizer_config(tc, total, warmup)

    sharding.check_batch_divisible(batch_size, mesh, int(tc.grad_accum_steps))
    sharding.check_batch_divisible(eval_batch, mesh)
    abs_params, p_shardings = abstract_params(model, m_cfg, mesh, rules)
    lr_fn = optim.lr_schedule_from_config(opt_cfg)
    eval_sh = {k: sharding.batch_sharding(mesh, 2) for k in ("input_ids", "token_type_ids",
                                                              "attention_mask")}
    predict_fn = jax.jit(make_predict(model, info), in_shardings=(p_shardings, eval_sh),
                         out_shardings=sharding.replicated(mesh))
    plan = StagePlan(
        name="finetune", steps=total, tx=optim.build_optimizer(opt_cfg, abs_params),
        loss=make_loss(model, info), learning_rate=lambda s: float(lr_fn(s)),
        banner=(f"fine-tuning {info.name} ({info.kind}): {len(train_split)} training rows, "
                f"{total} steps (warm-up {warmup}), batch {batch_size}, init "
                f"{source.path or 'random'}, seed {int(tc.seed)}"))

    def init_params():
      init_key = jax.random.split(jax.random.key(int(tc.seed)))[0]
      params = init_params_of(model, m_cfg, init_key, p_shardings)
      if source.kind != "random":
        params = {**params, **load_backbone(source, config.init, abs_params, p_shardings)}
      return params

    train_keys = tuple(train_split.arrays)

    def batch_at(step: int) -> dict[str, np.ndarray]:
      rows = _local_rows(train_batch_indices(step, batch_size, len(train_split), int(tc.seed)))
      return {k: train_split.arrays[k][rows] for k in train_keys}

    last_eval: dict[str, float] = {}

    def evaluate(params, step: int, final: bool) -> dict[str, float]:
      result = {}
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
      last_eval.clear()
      last_eval.update(result)
      return result

    def write_side_files(w: str) -> None:
      if not os.path.isdir(os.path.join(w, TOKENIZER_DIR)):
        save_tokenizer(tokenizer, os.path.join(w, TOKENIZER_DIR))

    def report() -> dict[str, Any]:
      return {"task": info.name, "kind": info.kind, "squad_version": info.squad_version,
              "seed": int(tc.seed), "init": source.path or "random",
              "score": last_eval.get("eval/score"), "main_metric": info.main_metric,
              "params": param_counts(abs_params)}

    task_file = {"kind": info.kind, "task": info.name, "num_labels": info.num_labels,
                 "label_names": list(info.glue.label_names or ()) if info.glue else None,
                 "squad_version": info.squad_version,
                 "max_seq_length": int(config.data.max_seq_length),
                 "pooler": m_cfg.classifier_activation, "init": source.path}
    return Setup(
        stages=(plan,), abstract_params=abs_params, param_shardings=p_shardings,
        init_params=init_params, batch_at=batch_at, evaluate=evaluate,
        global_batch_size=batch_size, total_steps=total, stop_step=stop,
        files={CONFIG_FILE: config.to_dict(), MODEL_CONFIG_FILE: m_cfg.to_dict(),
               TASK_FILE: task_file},
        write_side_files=write_side_files, report=report)


def finetune_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes (or resumes) the configured task in `workdir`; returns the final report.

  Report keys: status (completed | stopped | preempted), step, total_steps, task, seed,
  init, eval (`eval/<split>/<metric>` and `eval/score`, the task's headline number), score,
  main_metric, wall_seconds, params.
  """
  return loop.run(FinetuneTask(config), workdir)
