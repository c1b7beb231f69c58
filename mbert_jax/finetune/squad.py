"""SQuAD v1.1 / v2.0: loading, windowed features, and span decoding back to context text.

Features follow BERT's `run_squad.py` rules, on a fast tokenizer's character offsets instead
of whitespace tokens: the question is cut to `max_query_length` tokens; the context is covered
by windows of at most `max_seq_length - len(question) - 3` tokens whose starts are
`doc_stride` tokens apart; each row is `[CLS] question [SEP] context-window [SEP]`. A window
that does not hold the whole answer (and every v2.0 unanswerable question) is labelled with
the [CLS] position 0. A context token seen by several windows belongs to the one where it has
the most context on both sides ("max context"); decoding only starts answers there.

Decoding takes the `n_best_size` best start and end positions of every window, keeps valid
spans (inside the context, start in max context, start <= end, at most `max_answer_length`
tokens), ranks them by start + end logit across the example's windows and cuts the answer from
the ORIGINAL context through the character offsets, so case, accents and spacing are kept.
For v2.0 the null score is the smallest [CLS] start + end logit over the windows; the answer
is "" when null score − best span score > `null_score_diff_threshold`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from mbert_jax.finetune.metrics import squad_version
from mbert_jax.finetune.glue import parse_json_lines, plain_tokenizer, special_token_ids

__all__ = [
    "SQUAD_HUB",
    "load_squad",
    "flatten_squad_json",
    "SquadFeatures",
    "prepare_squad_features",
    "SquadPredictions",
    "postprocess_squad_predictions",
]

SQUAD_HUB = {"1.1": "rajpurkar/squad", "2.0": "rajpurkar/squad_v2"}
_LOCAL_NAMES = {"train": "train-v{v}.json", "validation": "dev-v{v}.json"}


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def flatten_squad_json(data: Mapping[str, Any] | Sequence[Any]) -> list[dict[str, Any]]:
  """Official nested SQuAD JSON (articles → paragraphs → qas) as flat examples.

  Each example: `id`, `title`, `context`, `question`, `answers` = `{"text": [...],
  "answer_start": [...]}` (empty lists for unanswerable v2.0 questions, whose
  `plausible_answers` are not gold answers).
  """
  articles = data["data"] if isinstance(data, Mapping) else data
  if not isinstance(articles, (list, tuple)):
    raise ValueError("SQuAD JSON must be {'data': [articles]} or the list of articles")
  examples = []
  for a, article in enumerate(articles):
    if not isinstance(article, Mapping) or "paragraphs" not in article:
      raise ValueError(f"SQuAD article {a} has no 'paragraphs'")
    title = str(article.get("title", ""))
    for paragraph in article["paragraphs"]:
      context = paragraph["context"]
      for qa in paragraph["qas"]:
        answers = qa.get("answers", [])
        if qa.get("is_impossible", False):
          answers = []
        examples.append({
            "id": str(qa["id"]),
            "title": title,
            "context": context,
            "question": qa["question"],
            "answers": {"text": [x["text"] for x in answers],
                        "answer_start": [int(x["answer_start"]) for x in answers]},
        })
  return examples


def _read_local_squad(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    data = json.loads(text)
  except json.JSONDecodeError:
    data = None
  if isinstance(data, Mapping) and "data" in data:
    return flatten_squad_json(data)
  if isinstance(data, list):
    records = data
  else:  # JSON lines of flat examples (the hub layout exported with to_json)
    records = parse_json_lines(text, path)
  if records and isinstance(records[0], Mapping) and "paragraphs" in records[0]:
    return flatten_squad_json(records)
  return [dict(r) for r in records]


def load_squad(path_or_hub: str | os.PathLike | None = None, version: str = "1.1",
               split: str = "validation", cache_dir: str | None = None):
  """Loads SQuAD examples as a `datasets.Dataset` in the hub's flat layout.

  Args:
    path_or_hub: a local SQuAD JSON file (official nested layout, a JSON list or JSON lines
      of flat examples), a directory holding `train-v1.1.json` / `dev-v1.1.json` (or v2.0),
      a hub name (`rajpurkar/squad`, `rajpurkar/squad_v2`; needs network), or None for the
      hub default of `version`.
    version: "1.1" or "2.0". A v1.1 load rejects unanswerable questions.
    split: "train" or "validation".
    cache_dir: `datasets` cache for hub downloads.

  Columns: `id`, `title`, `context`, `question`, `answers` (`text`, `answer_start` lists).
  """
  import datasets

  v = squad_version(version)
  if path_or_hub is None:
    path_or_hub = SQUAD_HUB[v]
  source = os.fspath(path_or_hub)
  if os.path.isdir(source):
    if split not in _LOCAL_NAMES:
      raise ValueError(f"split must be one of {sorted(_LOCAL_NAMES)}, got {split!r}")
    candidates = [_LOCAL_NAMES[split].format(v=v), f"{split}.json", f"{split}.jsonl"]
    found = [os.path.join(source, c) for c in candidates
             if os.path.isfile(os.path.join(source, c))]
    if not found:
      raise FileNotFoundError(f"no SQuAD {split} file in {source}; tried {candidates}")
    records = _read_local_squad(found[0])
  elif os.path.isfile(source):
    records = _read_local_squad(source)
  elif (source.lower().endswith((".json", ".jsonl")) or source.startswith((".", "/", "~"))
        or source.count("/") > 1 or "\\" in source):
    # Hub names are "name" or "owner/name"; anything else was meant as a local file.
    raise FileNotFoundError(f"SQuAD file not found: {source}")
  else:
    records = datasets.load_dataset(source, split=split, cache_dir=cache_dir).to_list()

  rows = []
  for i, r in enumerate(records):
    missing = [k for k in ("id", "context", "question", "answers") if k not in r]
    if missing:
      raise ValueError(f"SQuAD example {i} lacks {missing}")
    texts, starts = _answer_lists(r["answers"], str(r["id"]))
    if v == "1.1" and not texts:
      raise ValueError(f"question {r['id']!r} has no answer; unanswerable questions need "
                       "version='2.0'")
    rows.append({"id": str(r["id"]), "title": str(r.get("title", "")),
                 "context": r["context"], "question": r["question"],
                 "answers": {"text": texts, "answer_start": starts}})
  features = datasets.Features({
      "id": datasets.Value("string"), "title": datasets.Value("string"),
      "context": datasets.Value("string"), "question": datasets.Value("string"),
      "answers": {"text": datasets.List(datasets.Value("string")),
                  "answer_start": datasets.List(datasets.Value("int32"))},
  })
  return datasets.Dataset.from_list(rows, features=features)


def _answer_lists(answers: Any, qid: str) -> tuple[list[str], list[int]]:
  if isinstance(answers, Mapping):
    texts = list(answers.get("text", []))
    starts = [int(s) for s in answers.get("answer_start", [])]
  else:
    texts = [a["text"] for a in answers]
    starts = [int(a["answer_start"]) for a in answers]
  if len(texts) != len(starts):
    raise ValueError(f"question {qid!r}: {len(texts)} answer texts but {len(starts)} starts")
  return texts, starts


def _example_columns(examples: Any) -> dict[str, list[Any]]:
  keys = ("id", "question", "context", "answers")
  if hasattr(examples, "column_names"):  # datasets.Dataset: read whole columns at once
    missing = [k for k in keys if k not in examples.column_names]
    if missing:
      raise ValueError(f"SQuAD examples lack columns {missing}")
    return {k: list(examples[k]) for k in keys}
  columns: dict[str, list[Any]] = {k: [] for k in keys}
  for i, ex in enumerate(examples):
    for k in keys:
      if k not in ex:
        raise ValueError(f"SQuAD example {i} lacks {k!r}")
      columns[k].append(ex[k])
  return columns


# ------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SquadFeatures:
  """Windowed model inputs for a list of SQuAD examples (F features, length L).

  Attributes:
    input_ids, token_type_ids, attention_mask: int32 [F, L].
    start_positions, end_positions: int32 [F]; 0 ([CLS]) where the window holds no answer.
    example_index: int32 [F], the example (position in the input list) a feature comes from.
    offsets: int32 [F, L, 2], each context token's [start, end) character span in its
      example's original context; -1 for [CLS], question, [SEP] and padding.
    token_is_max_context: bool [F, L], True where this window gives the token its most
      context (BERT's rule); False outside the context.
    example_ids: question id of every example, in input order.
  """

  input_ids: np.ndarray
  token_type_ids: np.ndarray
  attention_mask: np.ndarray
  start_positions: np.ndarray
  end_positions: np.ndarray
  example_index: np.ndarray
  offsets: np.ndarray
  token_is_max_context: np.ndarray
  example_ids: list[str]

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])

  def model_inputs(self) -> dict[str, np.ndarray]:
    """The arrays the encoder takes."""
    return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids,
            "attention_mask": self.attention_mask}

  def training_batch(self) -> dict[str, np.ndarray]:
    """Model inputs plus `start_positions` / `end_positions`."""
    return {**self.model_inputs(), "start_positions": self.start_positions,
            "end_positions": self.end_positions}


def _windows(num_tokens: int, max_tokens: int, doc_stride: int) -> list[tuple[int, int]]:
  """(start, length) of the context windows; the last one reaches the end of the context."""
  spans = []
  start = 0
  while True:
    length = min(num_tokens - start, max_tokens)
    spans.append((start, length))
    if start + length >= num_tokens:
      return spans
    start += min(length, doc_stride)


def _max_context_owner(spans: list[tuple[int, int]], num_tokens: int) -> np.ndarray:
  """For each context token, the window where min(left, right context) + 0.01·window length
  is largest (first such window on ties, as BERT)."""
  best_score = np.full(num_tokens, -np.inf)
  owner = np.full(num_tokens, -1, dtype=np.int64)
  for w, (start, length) in enumerate(spans):
    if length == 0:
      continue
    pos = np.arange(start, start + length)
    score = np.minimum(pos - start, start + length - 1 - pos) + 0.01 * length
    better = score > best_score[pos]
    best_score[pos[better]] = score[better]
    owner[pos[better]] = w
  return owner


def _without_leading_spaces(offsets: np.ndarray, context: str) -> np.ndarray:
  """Character spans that start at the token's first visible character.

  A byte-level BPE (ModernBERT's, EuroBERT's) folds the space before a word into the word's
  token (`" France"`), and its offsets cover that space unless the tokenizer's post-processor
  trims them, which a tokenizer.json need not ask for. Answers read back through untrimmed
  offsets would start with a space; WordPiece offsets have none to trim."""
  out = offsets.copy()
  for i, (start, end) in enumerate(offsets):
    while start < end - 1 and context[start].isspace():
      start += 1
    out[i, 0] = start
  return out


def _answer_token_span(offsets: np.ndarray, start_char: int, end_char: int
                       ) -> tuple[int, int] | None:
  """First and last context token overlapping [start_char, end_char), or None."""
  if offsets.shape[0] == 0:
    return None
  first = int(np.searchsorted(offsets[:, 1], start_char, side="right"))
  last = int(np.searchsorted(offsets[:, 0], end_char, side="left")) - 1
  if first >= offsets.shape[0] or last < 0 or first > last:
    return None
  return first, last


def prepare_squad_features(examples: Any, tokenizer, max_seq_length: int = 384,
                           doc_stride: int = 128, max_query_length: int = 64,
                           version_2_with_negative: bool = False,
                           is_training: bool = False) -> SquadFeatures:
  """Tokenizes SQuAD examples into sliding-window features (BERT's rules, module doc).

  Args:
    examples: flat examples (`load_squad` output, or dicts with `id`, `question`, `context`,
      `answers`).
    tokenizer: a `tokenizers.Tokenizer` (WordPiece) with [CLS]/[SEP]/[PAD] in its vocabulary.
    max_seq_length, doc_stride, max_query_length: window geometry (TF1 run_squad.py: 384/128/64).
    version_2_with_negative: allow questions without answers (labelled [CLS]).
    is_training: drop examples whose first answer cannot be located in the context tokens
      (BERT skips them; they would teach "no answer"), with a warning.

  Labels always come from the first gold answer, when there is one.
  """
  if doc_stride < 1:
    raise ValueError(f"doc_stride must be >= 1, got {doc_stride}")
  if max_query_length < 1:
    raise ValueError(f"max_query_length must be >= 1, got {max_query_length}")
  columns = _example_columns(examples)
  n_examples = len(columns["id"])
  ids = special_token_ids(tokenizer)
  tok = plain_tokenizer(tokenizer)

  questions = tok.encode_batch(columns["question"], add_special_tokens=False)
  # SQuAD asks ~5 questions per paragraph: tokenize each distinct context once.
  unique_contexts = list(dict.fromkeys(columns["context"]))
  context_encodings = dict(zip(unique_contexts,
                               tok.encode_batch(unique_contexts, add_special_tokens=False)))

  rows: dict[str, list[Any]] = {k: [] for k in (
      "input_ids", "token_type_ids", "start", "end", "example", "offsets", "max_context")}
  skipped = 0
  for e in range(n_examples):
    qid = str(columns["id"][e])
    context = columns["context"][e]
    if not isinstance(context, str) or not isinstance(columns["question"][e], str):
      raise ValueError(f"question {qid!r}: question and context must be strings")
    query_ids = questions[e].ids[:max_query_length]
    enc = context_encodings[context]
    doc_ids = np.asarray(enc.ids, dtype=np.int32)
    doc_offsets = _without_leading_spaces(
        np.asarray(enc.offsets, dtype=np.int32).reshape(-1, 2), context)
    max_tokens = max_seq_length - len(query_ids) - 3
    if max_tokens < 1:
      raise ValueError(f"max_seq_length {max_seq_length} leaves no room for context after a "
                       f"{len(query_ids)}-token question and 3 special tokens")

    texts, starts = _answer_lists(columns["answers"][e], qid)
    answer_span = None
    if texts:
      start_char, text = starts[0], texts[0]
      end_char = start_char + len(text)
      if start_char < 0 or end_char > len(context):
        raise ValueError(f"question {qid!r}: answer span [{start_char}, {end_char}) lies "
                         f"outside its {len(context)}-character context")
      answer_span = _answer_token_span(doc_offsets, start_char, end_char)
      if answer_span is None and is_training:
        skipped += 1
        continue
    elif not version_2_with_negative:
      raise ValueError(f"question {qid!r} has no answer; pass version_2_with_negative=True "
                       "for SQuAD v2.0")

    spans = _windows(len(doc_ids), max_tokens, doc_stride)
    owner = _max_context_owner(spans, len(doc_ids))
    prefix = [ids["cls"], *query_ids, ids["sep"]]
    context_start = len(prefix)
    for w, (start, length) in enumerate(spans):
      row_ids = np.full(max_seq_length, ids["pad"], dtype=np.int32)
      row_types = np.zeros(max_seq_length, dtype=np.int32)
      row_offsets = np.full((max_seq_length, 2), -1, dtype=np.int32)
      row_max = np.zeros(max_seq_length, dtype=bool)
      stop = context_start + length
      row_ids[:context_start] = prefix
      row_ids[context_start:stop] = doc_ids[start:start + length]
      row_ids[stop] = ids["sep"]
      row_types[context_start:stop + 1] = 1
      row_offsets[context_start:stop] = doc_offsets[start:start + length]
      row_max[context_start:stop] = owner[start:start + length] == w
      label_start = label_end = 0
      if answer_span is not None:
        first, last = answer_span
        if start <= first and last < start + length:
          label_start = context_start + first - start
          label_end = context_start + last - start
      rows["input_ids"].append(row_ids)
      rows["token_type_ids"].append(row_types)
      rows["offsets"].append(row_offsets)
      rows["max_context"].append(row_max)
      rows["start"].append(label_start)
      rows["end"].append(label_end)
      rows["example"].append(e)
  if skipped:
    warnings.warn(f"skipped {skipped} training examples whose answer covers no context token",
                  stacklevel=2)

  input_ids = (np.stack(rows["input_ids"]) if rows["input_ids"]
               else np.zeros((0, max_seq_length), np.int32))
  token_type_ids = (np.stack(rows["token_type_ids"]) if rows["token_type_ids"]
                    else np.zeros((0, max_seq_length), np.int32))
  offsets = (np.stack(rows["offsets"]) if rows["offsets"]
             else np.zeros((0, max_seq_length, 2), np.int32))
  max_context = (np.stack(rows["max_context"]) if rows["max_context"]
                 else np.zeros((0, max_seq_length), bool))
  attention_mask = (input_ids != ids["pad"]).astype(np.int32)
  # [PAD] can only appear as padding: it is never produced from text by WordPiece.
  return SquadFeatures(
      input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
      start_positions=np.asarray(rows["start"], dtype=np.int32),
      end_positions=np.asarray(rows["end"], dtype=np.int32),
      example_index=np.asarray(rows["example"], dtype=np.int32),
      offsets=offsets, token_is_max_context=max_context,
      example_ids=[str(i) for i in columns["id"]])


# ------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SquadPredictions:
  """Decoded answers.

  Attributes:
    predictions: `{question id: answer text}` ("" = no answer), the input of `squad_metrics`.
    null_score_diff: `{question id: null score − best span score}` (v2.0; +inf when no valid
      span exists); pass as `na_probs` to `squad_metrics`. Empty for v1.1.
    nbest: `{question id: [{"text", "start_logit", "end_logit", "score", "probability"}]}`,
      best first; v2.0 lists include the null answer "" with its score.
  """

  predictions: dict[str, str]
  null_score_diff: dict[str, float]
  nbest: dict[str, list[dict[str, Any]]]


def _top_indices(logits: np.ndarray, n: int) -> np.ndarray:
  return np.argsort(-logits, kind="stable")[:n]


def postprocess_squad_predictions(examples: Any, features: SquadFeatures, start_logits: Any,
                                  end_logits: Any, n_best_size: int = 20,
                                  max_answer_length: int = 30,
                                  version_2_with_negative: bool = False,
                                  null_score_diff_threshold: float = 0.0
                                  ) -> SquadPredictions:
  """Turns per-feature start/end logits into answer texts (rules in the module doc).

  Args:
    examples: the examples `features` were built from, in the same order.
    features: `prepare_squad_features` output.
    start_logits, end_logits: [F, L] arrays (numpy, jax or nested lists).
    n_best_size: start and end candidates per window, and length of the n-best lists.
    max_answer_length: longest answer in tokens.
    version_2_with_negative: allow "" answers (SQuAD v2.0).
    null_score_diff_threshold: answer "" when null score − best span score exceeds it.
  """
  if n_best_size < 1 or max_answer_length < 1:
    raise ValueError("n_best_size and max_answer_length must be >= 1")
  starts = np.asarray(start_logits, dtype=np.float64)
  ends = np.asarray(end_logits, dtype=np.float64)
  shape = features.input_ids.shape
  for name, arr in (("start_logits", starts), ("end_logits", ends)):
    if arr.shape != shape:
      raise ValueError(f"{name} has shape {arr.shape}; the features need {shape}")
    if np.isnan(arr).any():
      raise ValueError(f"{name} contains NaN")
  columns = _example_columns(examples)
  example_ids = [str(i) for i in columns["id"]]
  if example_ids != features.example_ids:
    raise ValueError("examples do not match the ones the features were built from")

  by_example: dict[int, list[int]] = {}
  for f, e in enumerate(features.example_index.tolist()):
    by_example.setdefault(e, []).append(f)

  predictions: dict[str, str] = {}
  null_diffs: dict[str, float] = {}
  nbest_out: dict[str, list[dict[str, Any]]] = {}
  for e, qid in enumerate(example_ids):
    context = columns["context"][e]
    cand_scores, cand_start, cand_end, cand_feat, cand_s, cand_e = [], [], [], [], [], []
    null_score, null_start, null_end = math.inf, math.nan, math.nan
    for f in by_example.get(e, []):
      s_logits, e_logits = starts[f], ends[f]
      if s_logits[0] + e_logits[0] < null_score:
        null_score = s_logits[0] + e_logits[0]
        null_start, null_end = float(s_logits[0]), float(e_logits[0])
      in_context = features.offsets[f, :, 0] >= 0
      s_idx = _top_indices(s_logits, n_best_size)
      e_idx = _top_indices(e_logits, n_best_size)
      length = e_idx[None, :] - s_idx[:, None] + 1
      pair_scores = s_logits[s_idx][:, None] + e_logits[e_idx][None, :]
      # -inf logits (masked positions) make a span impossible, not merely unlikely.
      valid = (in_context[s_idx][:, None] & in_context[e_idx][None, :]
               & features.token_is_max_context[f, s_idx][:, None]
               & (length >= 1) & (length <= max_answer_length) & np.isfinite(pair_scores))
      si, ei = np.nonzero(valid)
      if si.size == 0:
        continue
      cand_s.append(s_idx[si])
      cand_e.append(e_idx[ei])
      cand_start.append(s_logits[s_idx[si]])
      cand_end.append(e_logits[e_idx[ei]])
      cand_scores.append(pair_scores[si, ei])
      cand_feat.append(np.full(si.size, f))

    entries: list[dict[str, Any]] = []
    if cand_scores:
      scores = np.concatenate(cand_scores)
      s_all, e_all = np.concatenate(cand_s), np.concatenate(cand_e)
      f_all = np.concatenate(cand_feat)
      start_all, end_all = np.concatenate(cand_start), np.concatenate(cand_end)
      seen: set[str] = set()
      for k in np.argsort(-scores, kind="stable"):
        f, s, t = int(f_all[k]), int(s_all[k]), int(e_all[k])
        text = context[features.offsets[f, s, 0]:features.offsets[f, t, 1]]
        if text in seen:  # the same span seen from another window
          continue
        seen.add(text)
        entries.append({"text": text, "start_logit": float(start_all[k]),
                        "end_logit": float(end_all[k]), "score": float(scores[k])})
        if len(entries) == n_best_size:
          break
    best = entries[0] if entries else None

    if version_2_with_negative:
      diff = math.inf if best is None else float(null_score - best["score"])
      null_diffs[qid] = diff
      predictions[qid] = "" if best is None or diff > null_score_diff_threshold else best["text"]
      if math.isfinite(null_score):
        entries = entries + [{"text": "", "start_logit": null_start, "end_logit": null_end,
                              "score": float(null_score)}]
        entries.sort(key=lambda x: -x["score"])
    else:
      predictions[qid] = "" if best is None else best["text"]
    if entries:
      scores = np.array([x["score"] for x in entries])
      probs = np.exp(scores - scores.max())
      probs /= probs.sum()
      for x, p in zip(entries, probs):
        x["probability"] = float(p)
    nbest_out[qid] = entries
  return SquadPredictions(predictions=predictions, null_score_diff=null_diffs, nbest=nbest_out)
