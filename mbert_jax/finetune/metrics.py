"""Evaluation metrics for GLUE and SQuAD, in plain numpy (no framework, no scipy).

GLUE (`glue_metrics`) returns fractions in [0, 1] (correlations in [-1, 1]), as the Hugging
Face `glue` metric does; `glue_score` turns a set of task results into the leaderboard's
percent score. SQuAD (`squad_metrics`) returns percentages, as the official evaluation scripts
do, and follows their rules: v1.1 answer normalisation, exact match, token F1, maximum over the
gold answers, and for v2.0 the no-answer handling and the best `na_prob` threshold search.
"""

from __future__ import annotations

import collections
import math
import re
import string
import warnings
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = [
    "GLUE_TASK_METRICS",
    "accuracy",
    "f1_binary",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "rankdata",
    "glue_metrics",
    "glue_task_score",
    "glue_score",
    "normalize_answer",
    "squad_exact",
    "squad_f1",
    "squad_gold_answers",
    "squad_metrics",
]

# ------------------------------------------------------------------------------------------
# Basic metrics
# ------------------------------------------------------------------------------------------


def _as_1d(name: str, values: Any) -> np.ndarray:
  array = np.asarray(values)
  if array.ndim != 1:
    raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
  return array


def _paired(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  preds = _as_1d("predictions", predictions)
  labs = _as_1d("labels", labels)
  if preds.shape != labs.shape:
    raise ValueError(
        f"predictions and labels differ in length: {preds.shape[0]} vs {labs.shape[0]}")
  if preds.size == 0:
    raise ValueError("cannot compute a metric over zero examples")
  return preds, labs


def _as_class_ids(name: str, values: np.ndarray) -> np.ndarray:
  if values.dtype.kind in "iub":
    return values.astype(np.int64)
  if values.dtype.kind == "f":
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
      raise ValueError(f"{name} must be integer class ids, got non-integer floats")
    return values.astype(np.int64)
  raise ValueError(f"{name} must be integer class ids, got dtype {values.dtype}")


def _as_finite_floats(name: str, values: np.ndarray) -> np.ndarray:
  if values.dtype.kind not in "iubf":
    raise ValueError(f"{name} must be numeric, got dtype {values.dtype}")
  values = values.astype(np.float64)
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name} contains NaN or infinite values")
  return values


def accuracy(predictions: Any, labels: Any) -> float:
  """Fraction of predictions equal to their label."""
  preds, labs = _paired(predictions, labels)
  preds = _as_class_ids("predictions", preds)
  labs = _as_class_ids("labels", labs)
  return float(np.mean(preds == labs))


def f1_binary(predictions: Any, labels: Any, positive_label: int = 1) -> float:
  """F1 of the positive class of a binary task (GLUE MRPC/QQP use class 1).

  With no positive prediction and no positive label, precision and recall are undefined;
  the score is then 0.0 (scikit-learn's convention, which GLUE evaluation code inherits).
  """
  preds, labs = _paired(predictions, labels)
  preds = _as_class_ids("predictions", preds)
  labs = _as_class_ids("labels", labs)
  for name, arr in (("predictions", preds), ("labels", labs)):
    bad = set(np.unique(arr).tolist()) - {0, 1}
    if bad:
      raise ValueError(f"f1_binary needs {name} in {{0, 1}}, found {sorted(bad)}")
  pred_pos = preds == positive_label
  true_pos = labs == positive_label
  tp = int(np.sum(pred_pos & true_pos))
  fp = int(np.sum(pred_pos & ~true_pos))
  fn = int(np.sum(~pred_pos & true_pos))
  denominator = 2 * tp + fp + fn
  return 0.0 if denominator == 0 else 2.0 * tp / denominator


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
  """Matthews correlation coefficient, multi-class form (Gorodkin 2004).

  For two classes this is the usual (TP·TN − FP·FN)/sqrt(...). When either the predictions or
  the labels hold a single class the denominator is zero; the score is then 0.0, so a
  constant classifier counts as uninformative rather than undefined.
  """
  preds, labs = _paired(predictions, labels)
  preds = _as_class_ids("predictions", preds)
  labs = _as_class_ids("labels", labs)
  classes, encoded = np.unique(np.concatenate([labs, preds]), return_inverse=True)
  k = classes.size
  true_idx, pred_idx = encoded[: labs.size], encoded[labs.size:]
  confusion = np.zeros((k, k), dtype=np.float64)
  np.add.at(confusion, (true_idx, pred_idx), 1.0)
  n = confusion.sum()
  correct = np.trace(confusion)
  true_counts = confusion.sum(axis=1)
  pred_counts = confusion.sum(axis=0)
  numerator = correct * n - np.dot(true_counts, pred_counts)
  denominator = math.sqrt(
      (n * n - np.dot(pred_counts, pred_counts)) * (n * n - np.dot(true_counts, true_counts)))
  return 0.0 if denominator == 0.0 else float(numerator / denominator)


def pearson(x: Any, y: Any) -> float:
  """Pearson correlation; 0.0 when either input is constant (no measurable association)."""
  a, b = _paired(x, y)
  a = _as_finite_floats("predictions", a)
  b = _as_finite_floats("labels", b)
  a = a - a.mean()
  b = b - b.mean()
  denominator = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
  if denominator == 0.0:
    return 0.0
  # Rounding can push |r| a hair past 1 for perfectly linear inputs.
  return float(np.clip(np.dot(a, b) / denominator, -1.0, 1.0))


def rankdata(values: Any) -> np.ndarray:
  """Ranks starting at 1; tied values share the mean of the ranks they span."""
  x = _as_1d("values", values)
  n = x.size
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  new_run = np.ones(n, dtype=bool)
  new_run[1:] = sorted_x[1:] != sorted_x[:-1]
  run_start = np.flatnonzero(new_run)
  run_end = np.append(run_start[1:], n)
  # Positions start..end-1 (0-based) hold ranks start+1..end; their mean is (start+1+end)/2.
  run_rank = (run_start + 1 + run_end) / 2.0
  run_of_sorted = np.cumsum(new_run) - 1
  ranks = np.empty(n, dtype=np.float64)
  ranks[order] = run_rank[run_of_sorted]
  return ranks


def spearman(x: Any, y: Any) -> float:
  """Spearman rank correlation: Pearson of the tie-averaged ranks."""
  a, b = _paired(x, y)
  a = _as_finite_floats("predictions", a)
  b = _as_finite_floats("labels", b)
  return pearson(rankdata(a), rankdata(b))


# ------------------------------------------------------------------------------------------
# GLUE
# ------------------------------------------------------------------------------------------

# Metric names per task, in the order GLUE reports them. The leaderboard averages a task's
# metrics into one task score, and MNLI-m/-mm into one MNLI score.
GLUE_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    # The diagnostic set is scored with the three-class Matthews correlation (R3).
    "ax": ("matthews_correlation",),
}

_GLUE_ALIASES = {
    "sst-2": "sst2", "sst": "sst2", "sts-b": "stsb", "sts": "stsb",
    "mnli-m": "mnli_matched", "mnli_m": "mnli_matched",
    "mnli-mm": "mnli_mismatched", "mnli_mm": "mnli_mismatched",
}


def _glue_task_name(task: str) -> str:
  key = task.lower().strip()
  key = _GLUE_ALIASES.get(key, key)
  if key not in GLUE_TASK_METRICS:
    raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_TASK_METRICS)}")
  return key


def glue_metrics(task: str, predictions: Any, labels: Any) -> dict[str, float]:
  """Metrics GLUE reports for `task`, as fractions.

  `predictions` are class ids [N], or logits [N, C] (reduced with argmax); for STS-B they
  are scores [N] or [N, 1]. Keys: `accuracy`, `f1`, `matthews_correlation`, `pearson`,
  `spearman` as the task uses them, plus `combined_score` (their mean, the task's leaderboard
  score) where a task has two.
  """
  name = _glue_task_name(task)
  preds = np.asarray(predictions)
  labs = np.asarray(labels)
  if name == "stsb":
    if preds.ndim == 2 and preds.shape[1] == 1:
      preds = preds[:, 0]
    if preds.ndim != 1:
      raise ValueError(f"STS-B predictions must be scores [N] or [N, 1], got {preds.shape}")
  elif preds.ndim == 2:
    preds = np.argmax(preds, axis=-1)
  elif preds.ndim != 1:
    raise ValueError(f"{name} predictions must be class ids [N] or logits [N, C], "
                     f"got shape {preds.shape}")
  result: dict[str, float] = {}
  for metric in GLUE_TASK_METRICS[name]:
    if metric == "accuracy":
      result[metric] = accuracy(preds, labs)
    elif metric == "f1":
      result[metric] = f1_binary(preds, labs)
    elif metric == "matthews_correlation":
      result[metric] = matthews_corrcoef(preds, labs)
    elif metric == "pearson":
      result[metric] = pearson(preds, labs)
    elif metric == "spearman":
      result[metric] = spearman(preds, labs)
  if len(result) > 1:
    result["combined_score"] = float(np.mean(list(result.values())))
  return result


def glue_task_score(task: str, metrics: Mapping[str, float]) -> float:
  """One task's leaderboard score (fraction): the mean of the metrics GLUE reports for it."""
  name = _glue_task_name(task)
  missing = [m for m in GLUE_TASK_METRICS[name] if m not in metrics]
  if missing:
    raise ValueError(f"metrics for {name} lack {missing}; got {sorted(metrics)}")
  return float(np.mean([metrics[m] for m in GLUE_TASK_METRICS[name]]))


_LEADERBOARD_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def glue_score(results: Mapping[str, Mapping[str, float]], include_wnli: bool = True,
               require_all: bool = True) -> dict[str, float]:
  """GLUE benchmark score in percent, computed as the leaderboard does.

  Each task's metrics are averaged into a task score (MRPC/QQP: accuracy and F1; STS-B:
  Pearson and Spearman); MNLI is the mean of `mnli_matched` and `mnli_mismatched` (a plain
  `mnli` entry is taken as one accuracy); the benchmark score is the unweighted mean over the
  nine tasks. The diagnostic set (AX) is not part of it. The BERT paper's "Average" column
  differs: it excludes WNLI and lists MNLI-m/-mm separately (`include_wnli=False` gives the
  WNLI part of that convention).

  Returns `{task: percent}` for every scored task plus `"glue"`. With `require_all`, missing
  tasks are an error; otherwise the mean is taken over the tasks present.
  """
  normalized = {_glue_task_name(k): v for k, v in results.items()}
  scores: dict[str, float] = {}
  for task in _LEADERBOARD_TASKS:
    if task == "wnli" and not include_wnli:
      continue
    if task == "mnli":
      parts = [normalized[k] for k in ("mnli_matched", "mnli_mismatched") if k in normalized]
      if len(parts) == 1 and "mnli" not in normalized:
        raise ValueError("MNLI needs both mnli_matched and mnli_mismatched results")
      if parts:
        scores[task] = 100.0 * float(np.mean([glue_task_score("mnli", p) for p in parts]))
      elif "mnli" in normalized:
        scores[task] = 100.0 * glue_task_score("mnli", normalized["mnli"])
      continue
    if task in normalized:
      scores[task] = 100.0 * glue_task_score(task, normalized[task])
  expected = [t for t in _LEADERBOARD_TASKS if include_wnli or t != "wnli"]
  missing = [t for t in expected if t not in scores]
  if missing and require_all:
    raise ValueError(f"GLUE score needs results for {missing}")
  if not scores:
    raise ValueError("no GLUE task results given")
  scores["glue"] = float(np.mean([scores[t] for t in expected if t in scores]))
  return scores


# ------------------------------------------------------------------------------------------
# SQuAD
# ------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
  """SQuAD answer normalisation: lower case, drop ASCII punctuation, drop the articles
  a/an/the as whole words, collapse whitespace (in this order, as the official scripts)."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def squad_exact(prediction: str, gold: str) -> int:
  """1 if the normalised strings are equal, else 0."""
  return int(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str, version: str = "1.1") -> float:
  """Bag-of-tokens F1 between normalised answers.

  v1.1 and v2.0 differ only when a side has no tokens: v1.1 scores that 0, v2.0 scores it 1
  if both sides are empty (a correct abstention) and 0 otherwise.
  """
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  if squad_version(version) == "2.0" and (not pred_tokens or not gold_tokens):
    return float(pred_tokens == gold_tokens)
  overlap = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
  same = sum(overlap.values())
  if same == 0:
    return 0.0
  precision = same / len(pred_tokens)
  recall = same / len(gold_tokens)
  return 2.0 * precision * recall / (precision + recall)


def squad_version(version: str) -> str:
  """'1.1' or '2.0' from the spellings users write (1, v1.1, 2, 2.0, ...)."""
  v = str(version).lower().lstrip("v")
  if v in ("1", "1.1"):
    return "1.1"
  if v in ("2", "2.0"):
    return "2.0"
  raise ValueError(f"SQuAD version must be '1.1' or '2.0', got {version!r}")


def _answer_texts(answers: Any, qid: str) -> list[str]:
  if answers is None:
    return []
  if isinstance(answers, Mapping):  # Hugging Face layout: {"text": [...], "answer_start": [...]}
    if "text" not in answers:
      raise ValueError(f"answers of question {qid!r} have no 'text' field")
    texts = answers["text"]
    return [texts] if isinstance(texts, str) else list(texts)
  if isinstance(answers, str):
    return [answers]
  out = []
  for answer in answers:  # SQuAD JSON layout: [{"text": ..., "answer_start": ...}, ...]
    if isinstance(answer, str):
      out.append(answer)
    elif isinstance(answer, Mapping) and "text" in answer:
      out.append(answer["text"])
    else:
      raise ValueError(f"unrecognised answer {answer!r} for question {qid!r}")
  return out


def squad_gold_answers(dataset: Any) -> dict[str, list[str]]:
  """`{question id: [gold answer texts]}` from any SQuAD layout.

  Accepts the official JSON (a dict with `"data"`, or its `data` list of articles with
  `paragraphs` / `qas`) or flat examples (a list of dicts, or a `datasets.Dataset`, with `id`
  and `answers`, where `answers` is `{"text": [...], ...}` or a list of `{"text": ...}`).
  Unanswerable v2.0 questions map to an empty list.
  """
  if isinstance(dataset, Mapping):
    if "data" not in dataset:
      raise ValueError("a SQuAD dict must hold the official layout with a 'data' list")
    dataset = dataset["data"]
  gold: dict[str, list[str]] = {}

  def add(qid: Any, answers: Any) -> None:
    qid = str(qid)
    if qid in gold:
      raise ValueError(f"question id {qid!r} occurs twice in the dataset")
    gold[qid] = _answer_texts(answers, qid)

  for item in dataset:
    if not isinstance(item, Mapping):
      raise ValueError(f"SQuAD entries must be dicts, got {type(item).__name__}")
    if "paragraphs" in item:
      for paragraph in item["paragraphs"]:
        for qa in paragraph["qas"]:
          add(qa["id"], qa.get("answers", []))
    elif "id" in item and "answers" in item:
      add(item["id"], item["answers"])
    else:
      raise ValueError("SQuAD entries must be articles with 'paragraphs' or examples with "
                       f"'id' and 'answers'; got keys {sorted(item)}")
  if not gold:
    raise ValueError("the SQuAD dataset holds no questions")
  return gold


def _best_threshold(predictions: Mapping[str, str], scores: Mapping[str, float],
                    na_probs: Mapping[str, float], has_answer: Mapping[str, bool]
                    ) -> tuple[float, float]:
  """Best score (percent) over `na_prob` thresholds, and the threshold reaching it.

  A question abstains when `na_prob > threshold`. Starting below every na_prob (all abstain:
  only unanswerable questions score), the threshold moves up through the sorted na_probs;
  each question that starts answering adds its raw score if it has an answer, and loses the
  point of a correct abstention if it has none and the prediction is not empty. This is the
  official v2.0 search, except that questions with equal na_prob change state together: the
  official script scores part of a tie group, a state no threshold can produce.
  """
  qids = list(scores)
  total = len(qids)
  score = float(sum(1 for q in qids if not has_answer[q]))
  probs = np.array([na_probs[q] for q in qids], dtype=np.float64)
  gains = np.array([
      scores[q] if has_answer[q] else (-1.0 if predictions.get(q, "") else 0.0) for q in qids
  ])
  order = np.argsort(probs, kind="stable")
  best_score = score
  lowest = float(probs[order[0]])
  # Threshold 0.0 abstains on everything when na_probs are probabilities (the official
  # default); otherwise pick a value below the smallest na_prob so that stays true.
  best_thresh = 0.0 if lowest > 0.0 else lowest - 1.0
  i = 0
  while i < total:
    j = i
    while j < total and probs[order[j]] == probs[order[i]]:
      score += gains[order[j]]
      j += 1
    if score > best_score:
      best_score = score
      best_thresh = float(probs[order[i]])
    i = j
  return float(100.0 * best_score / total), float(best_thresh)


def squad_metrics(predictions: Mapping[str, str], dataset: Any,
                  na_probs: Mapping[str, float] | None = None, version: str = "1.1",
                  na_prob_thresh: float = 1.0) -> dict[str, float]:
  """SQuAD evaluation as the official v1.1 / v2.0 scripts define it (scores in percent).

  Args:
    predictions: `{question id: answer text}`; `""` means "no answer" (v2.0). Ids that are
      not in `dataset` are ignored, as the official scripts do.
    dataset: gold data in any layout `squad_gold_answers` accepts.
    na_probs: v2.0 only: `{question id: no-answer score}`, higher = more likely unanswerable
      (probabilities, or the null-score differences `postprocess_squad_predictions` returns).
    version: "1.1" or "2.0".
    na_prob_thresh: v2.0: a question with `na_prob > na_prob_thresh` counts as abstaining
      in `exact_match`/`f1`/`HasAns_*`/`NoAns_*` (official default 1.0).

  Returns:
    v1.1: `exact_match`, `f1`, `total`, `missing`. A question without a prediction scores 0
    (official v1.1 rule; a warning names how many). v2.0: additionally `HasAns_exact`,
    `HasAns_f1`, `HasAns_total`, `NoAns_exact`, `NoAns_f1`, `NoAns_total` (when the set has
    such questions) and, with `na_probs`, `best_exact`, `best_exact_thresh`, `best_f1`,
    `best_f1_thresh`. v2.0 requires a prediction for every question.
  """
  v = squad_version(version)
  if not isinstance(predictions, Mapping):
    raise ValueError("predictions must be a dict {question id: answer text}")
  gold = squad_gold_answers(dataset)
  for qid, text in predictions.items():
    if not isinstance(text, str):
      raise ValueError(f"prediction for {qid!r} must be a string, got {type(text).__name__}")

  if v == "1.1":
    if na_probs is not None:
      raise ValueError("na_probs only apply to SQuAD v2.0")
    exact_sum = f1_sum = 0.0
    missing = 0
    for qid, answers in gold.items():
      if not answers:
        raise ValueError(f"question {qid!r} has no gold answer; unanswerable questions need "
                         "version='2.0'")
      if qid not in predictions:
        missing += 1
        continue
      pred = predictions[qid]
      exact_sum += max(squad_exact(pred, a) for a in answers)
      f1_sum += max(squad_f1(pred, a, "1.1") for a in answers)
    if missing:
      warnings.warn(f"{missing} of {len(gold)} questions have no prediction; they score 0",
                    stacklevel=2)
    total = len(gold)
    return {"exact_match": 100.0 * exact_sum / total, "f1": 100.0 * f1_sum / total,
            "total": float(total), "missing": float(missing)}

  missing_ids = [qid for qid in gold if qid not in predictions]
  if missing_ids:
    raise ValueError(f"{len(missing_ids)} questions have no prediction, e.g. "
                     f"{missing_ids[:3]}; SQuAD v2.0 scores every question")
  if na_probs is not None:
    absent = [qid for qid in gold if qid not in na_probs]
    if absent:
      raise ValueError(f"na_probs lack {len(absent)} questions, e.g. {absent[:3]}")
    for qid in gold:
      if math.isnan(float(na_probs[qid])):
        raise ValueError(f"na_prob of {qid!r} is NaN")

  has_answer: dict[str, bool] = {}
  exact_raw: dict[str, float] = {}
  f1_raw: dict[str, float] = {}
  for qid, answers in gold.items():
    # Gold answers that normalise to nothing count as no answer (official v2.0 rule).
    real = [a for a in answers if normalize_answer(a)]
    has_answer[qid] = bool(real)
    candidates = real if real else [""]
    pred = predictions[qid]
    exact_raw[qid] = float(max(squad_exact(pred, a) for a in candidates))
    f1_raw[qid] = max(squad_f1(pred, a, "2.0") for a in candidates)

  probs = {qid: float(na_probs[qid]) for qid in gold} if na_probs is not None else {
      qid: 0.0 for qid in gold}

  def thresholded(raw: Mapping[str, float]) -> dict[str, float]:
    return {qid: (float(not has_answer[qid]) if probs[qid] > na_prob_thresh else s)
            for qid, s in raw.items()}

  exact = thresholded(exact_raw)
  f1 = thresholded(f1_raw)

  def mean_over(values: Mapping[str, float], qids: Iterable[str]) -> float:
    qids = list(qids)
    return 100.0 * sum(values[q] for q in qids) / len(qids)

  result: dict[str, float] = {
      "exact_match": mean_over(exact, gold),
      "f1": mean_over(f1, gold),
      "total": float(len(gold)),
  }
  has_ids = [q for q in gold if has_answer[q]]
  no_ids = [q for q in gold if not has_answer[q]]
  if has_ids:
    result.update(HasAns_exact=mean_over(exact, has_ids), HasAns_f1=mean_over(f1, has_ids),
                  HasAns_total=float(len(has_ids)))
  if no_ids:
    result.update(NoAns_exact=mean_over(exact, no_ids), NoAns_f1=mean_over(f1, no_ids),
                  NoAns_total=float(len(no_ids)))
  if na_probs is not None:
    preds_in_set = {q: predictions[q] for q in gold}
    best_exact, exact_thresh = _best_threshold(preds_in_set, exact_raw, probs, has_answer)
    best_f1, f1_thresh = _best_threshold(preds_in_set, f1_raw, probs, has_answer)
    result.update(best_exact=best_exact, best_exact_thresh=exact_thresh, best_f1=best_f1,
                  best_f1_thresh=f1_thresh)
  return result
