"""What a fine-tuning step computes (the task's loss) and what evaluation computes
(predictions over a split, the official metrics, the prediction files GLUE and SQuAD expect)."""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mbert_jax.training import sharding
from mbert_jax.training.workdir import write_json
from mbert_jax.finetune import squad as squad_lib
from mbert_jax.finetune.metrics import glue_metrics, squad_metrics
from mbert_jax.finetune.config import TaskInfo
from mbert_jax.finetune.data import Split, local_rows

_NAMED_LABEL_TASKS = ("mnli", "qnli", "rte", "ax")


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
    local = {k: local_rows(split.arrays[k][rows]) for k in keys}
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
