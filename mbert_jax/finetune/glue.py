"""GLUE tasks: registry, loading (hub online, local TSV/CSV/JSON offline) and BERT encoding.

Every task is loaded into one canonical layout, the column names of the Hugging Face `glue`
dataset: the task's text fields (e.g. `sentence1`, `sentence2`), `label` (int class id, float
for STS-B, -1 where a file has no labels, as in test sets) and `idx`. Local files can use the
original GLUE TSV headers (known per task), the hub names, or any names mapped with
`column_map`; string labels (`entailment`, ...) map to the hub's class ids.

Encoding follows BERT: `[CLS] a [SEP] b [SEP]`, token type 0 up to the first `[SEP]` and 1
after, longest-first truncation, padding with `[PAD]` to a fixed length.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mbert_jax.data import tokenizer as tokenizer_lib
from mbert_jax.finetune.metrics import GLUE_TASK_METRICS

__all__ = [
    "GlueTask",
    "GLUE_TASKS",
    "get_task",
    "load_glue",
    "encode_pairs",
    "encode_glue",
    "special_token_ids",
    "build_wordpiece_tokenizer",
    "plain_tokenizer",
    "truncated_lengths",
]

HUB_PATH = "nyu-mll/glue"  # formerly plain "glue"; both resolve online


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """Static description of one GLUE task.

  Attributes:
    name: registry key (hub config name).
    text_fields: one or two canonical text columns, in encoding order.
    num_labels: classes, or 1 for the STS-B regression.
    label_names: class names in id order (None for regression).
    metrics: metric keys `glue_metrics` returns for the task.
    main_metric: the one metric the MobileBERT/BERT papers report (accuracy; F1 for MRPC and
      QQP, Matthews correlation for CoLA, Spearman for STS-B).
    hub: `(path, config)` for `datasets.load_dataset` when online.
    splits: split name → stem of the original GLUE file (`dev` for `validation`, ...).
    eval_splits: splits scored at evaluation (MNLI: matched and mismatched).
    tsv_columns: original GLUE file header → canonical column name.
    headerless_columns: column names of files that ship without a header (CoLA train/dev).
  """

  name: str
  text_fields: tuple[str, ...]
  num_labels: int
  label_names: tuple[str, ...] | None
  metrics: tuple[str, ...]
  main_metric: str
  hub: tuple[str, str]
  splits: Mapping[str, str]
  eval_splits: tuple[str, ...]
  tsv_columns: Mapping[str, str]
  headerless_columns: tuple[str, ...] | None = None

  @property
  def is_regression(self) -> bool:
    return self.num_labels == 1

  @property
  def is_pair(self) -> bool:
    return len(self.text_fields) == 2


_STD_SPLITS = {"train": "train", "validation": "dev", "test": "test"}
_MNLI_SPLITS = {
    "train": "train",
    "validation_matched": "dev_matched",
    "validation_mismatched": "dev_mismatched",
    "test_matched": "test_matched",
    "test_mismatched": "test_mismatched",
}
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")


def _task(name, text_fields, num_labels, label_names, main_metric, tsv_columns,
          splits=None, eval_splits=("validation",), headerless_columns=None) -> GlueTask:
  return GlueTask(
      name=name, text_fields=tuple(text_fields), num_labels=num_labels,
      label_names=label_names, metrics=GLUE_TASK_METRICS[name], main_metric=main_metric,
      hub=(HUB_PATH, name), splits=dict(splits or _STD_SPLITS), eval_splits=eval_splits,
      tsv_columns=dict(tsv_columns), headerless_columns=headerless_columns)


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in [
    _task("cola", ["sentence"], 2, ("unacceptable", "acceptable"), "matthews_correlation",
          {"index": "idx"},
          # CoLA train/dev TSVs have no header: source, label, original mark, sentence.
          headerless_columns=("source", "label", "original_label", "sentence")),
    _task("sst2", ["sentence"], 2, ("negative", "positive"), "accuracy", {"index": "idx"}),
    _task("mrpc", ["sentence1", "sentence2"], 2, ("not_equivalent", "equivalent"), "f1",
          {"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label",
           "index": "idx"}),
    _task("stsb", ["sentence1", "sentence2"], 1, None, "spearman",
          {"score": "label", "index": "idx"}),
    _task("qqp", ["question1", "question2"], 2, ("not_duplicate", "duplicate"), "f1",
          {"is_duplicate": "label", "id": "idx"}),
    _task("mnli", ["premise", "hypothesis"], 3, _NLI3, "accuracy",
          {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label",
           "index": "idx"},
          splits=_MNLI_SPLITS, eval_splits=("validation_matched", "validation_mismatched")),
    _task("qnli", ["question", "sentence"], 2, _NLI2, "accuracy", {"index": "idx"}),
    _task("rte", ["sentence1", "sentence2"], 2, _NLI2, "accuracy", {"index": "idx"}),
    _task("wnli", ["sentence1", "sentence2"], 2, ("not_entailment", "entailment"), "accuracy",
          {"index": "idx"}),
    # Diagnostic set: test only, MNLI labels; models trained on MNLI are run on it.
    _task("ax", ["premise", "hypothesis"], 3, _NLI3, "matthews_correlation",
          {"sentence1": "premise", "sentence2": "hypothesis", "index": "idx"},
          splits={"test": "AX"}, eval_splits=()),
]}

_TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "diagnostic": "ax", "mnli-m": "mnli",
                 "mnli-mm": "mnli"}


def get_task(task: str | GlueTask) -> GlueTask:
  """Registry lookup (case-insensitive; `SST-2`, `STS-B` accepted)."""
  if isinstance(task, GlueTask):
    return task
  key = str(task).lower().strip()
  key = _TASK_ALIASES.get(key, key)
  if key not in GLUE_TASKS:
    raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_TASKS)}")
  return GLUE_TASKS[key]


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")


def _find_split_file(task: GlueTask, directory: str, split: str) -> str:
  stems = [task.splits[split], split]
  if task.name == "ax":
    stems += ["ax", "diagnostic", "diagnostic-full"]
  tried = []
  for stem in dict.fromkeys(stems):
    for ext in _EXTENSIONS:
      path = os.path.join(directory, stem + ext)
      tried.append(os.path.basename(path))
      if os.path.isfile(path):
        return path
  raise FileNotFoundError(f"no file for {task.name} split {split!r} in {directory}; "
                          f"tried {tried}")


def _read_delimited(path: str, delimiter: str, task: GlueTask) -> list[dict[str, str]]:
  # The original GLUE TSVs contain unbalanced quote characters inside sentences, so quotes
  # are literal text there; CSV files use standard quoting.
  quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
  with open(path, newline="", encoding="utf-8-sig") as f:
    rows = list(csv.reader(f, delimiter=delimiter, quoting=quoting))
  rows = [r for r in rows if r]  # a trailing blank line is not a record
  if not rows:
    raise ValueError(f"{path} is empty")
  first = [c.strip() for c in rows[0]]
  known = set(task.tsv_columns) | set(task.tsv_columns.values()) | set(task.text_fields)
  known |= {"label", "idx"}
  if task.headerless_columns is not None and not known.intersection(first):
    header, body, start_line = list(task.headerless_columns), rows, 1
  else:
    header, body, start_line = first, rows[1:], 2
  records = []
  for line, row in enumerate(body, start=start_line):
    if len(row) != len(header):
      raise ValueError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")
    records.append(dict(zip(header, row)))
  return records


def _read_json(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  stripped = text.lstrip()
  if not stripped:
    raise ValueError(f"{path} is empty")
  if stripped[0] == "[" or (stripped[0] == "{" and path.endswith(".json")):
    try:
      data = json.loads(text)
    except json.JSONDecodeError:
      data = None  # a .json file may still hold JSON lines
    if isinstance(data, list):
      return data
    if isinstance(data, dict):
      if isinstance(data.get("data"), list):
        return data["data"]
      raise ValueError(f"{path}: a JSON object must hold the records in a 'data' list")
  return parse_json_lines(text, path)


def parse_json_lines(text: str, path: str) -> list[Any]:
  """One JSON value per non-blank line; ValueError naming the file and line of a bad one."""
  records = []
  for line, raw in enumerate(text.splitlines(), start=1):
    if raw.strip():
      try:
        records.append(json.loads(raw))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line}: invalid JSON line ({e.msg})") from None
  return records


def _read_file(path: str, task: GlueTask, delimiter: str | None) -> list[dict[str, Any]]:
  lower = path.lower()
  if lower.endswith((".json", ".jsonl")):
    return _read_json(path)
  if delimiter is None:
    if lower.endswith(".tsv"):
      delimiter = "\t"
    elif lower.endswith(".csv"):
      delimiter = ","
    else:
      raise ValueError(f"cannot tell the format of {path}; use a .tsv/.csv/.json/.jsonl "
                       "name or pass delimiter=")
  return _read_delimited(path, delimiter, task)


def _convert_label(raw: Any, task: GlueTask, label_map: Mapping[str, int], where: str
                   ) -> int | float:
  if task.is_regression:
    try:
      return float(raw)
    except (TypeError, ValueError):
      raise ValueError(f"{where}: STS-B label {raw!r} is not a number") from None
  if isinstance(raw, str):
    key = raw.strip()
    if key in label_map:
      return int(label_map[key])
    try:
      value = int(key)
    except ValueError:
      raise ValueError(f"{where}: unknown label {raw!r} for {task.name}; known: "
                       f"{sorted(label_map)}") from None
  elif isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
    raise ValueError(f"{where}: label {raw!r} of {task.name} is not a class id or name")
  else:
    value = int(raw)
  if not (value == -1 or 0 <= value < task.num_labels):
    raise ValueError(f"{where}: label {value} out of range for {task.name} "
                     f"({task.num_labels} classes; -1 = unlabelled)")
  return value


def _canonicalize(records: Sequence[Mapping[str, Any]], task: GlueTask,
                  column_map: Mapping[str, str] | None, label_map: Mapping[str, int] | None,
                  source: str):
  import datasets  # deferred: only loading needs it

  names = dict(task.tsv_columns)
  names.update(column_map or {})
  labels = {name: i for i, name in enumerate(task.label_names or ())}
  labels.update(label_map or {})
  wanted = list(task.text_fields) + ["label", "idx"]
  columns: dict[str, list[Any]] = {c: [] for c in wanted}
  for i, record in enumerate(records):
    if not isinstance(record, Mapping):
      raise ValueError(f"{source}: record {i} is a {type(record).__name__}, not a mapping")
    row = {}
    for key, value in record.items():
      target = names.get(key, key)
      if target in columns and target not in row:
        row[target] = value
    for field in task.text_fields:
      if field not in row:
        raise ValueError(
            f"{source}: record {i} lacks text column {field!r} for {task.name}; found "
            f"{sorted(record)} (map names with column_map={{'your_name': {field!r}}})")
      if not isinstance(row[field], str):
        raise ValueError(f"{source}: record {i} column {field!r} is not a string")
      columns[field].append(row[field])
    where = f"{source}: record {i}"
    if "label" in row and row["label"] not in (None, ""):
      columns["label"].append(_convert_label(row["label"], task, labels, where))
    else:
      columns["label"].append(-1.0 if task.is_regression else -1)
    raw_idx = row.get("idx", i)
    try:
      columns["idx"].append(int(raw_idx))
    except (TypeError, ValueError):
      raise ValueError(f"{where}: index {raw_idx!r} is not an integer") from None
  features = datasets.Features(
      {**{f: datasets.Value("string") for f in task.text_fields},
       "label": datasets.Value("float32" if task.is_regression else "int64"),
       "idx": datasets.Value("int64")})
  return datasets.Dataset.from_dict(columns, features=features)


def load_glue(task: str | GlueTask, data_dir_or_files: Any = None, split: str = "train", *,
              column_map: Mapping[str, str] | None = None,
              label_map: Mapping[str, int] | None = None, delimiter: str | None = None,
              cache_dir: str | None = None):
  """Loads one split of a GLUE task as a `datasets.Dataset` in the canonical layout.

  Args:
    task: registry name (`cola`, `sst2`, `mrpc`, `stsb`, `qqp`, `mnli`, `qnli`, `rte`,
      `wnli`, `ax`) or a `GlueTask`.
    data_dir_or_files: where the data is.
      None: the Hugging Face hub (`nyu-mll/glue`, task config; needs network).
      A directory: the split's file, by the original GLUE names (`train.tsv`, `dev.tsv`,
      `dev_matched.tsv`, ..., `AX.tsv`) or by split name (`validation.jsonl`), with
      extension .tsv, .csv, .jsonl or .json.
      A file path, or a list of them (concatenated): read as is (`split` only labels it).
      A dict split → path(s).
      A `datasets.Dataset` / `DatasetDict`: re-mapped to the canonical layout.
    split: `train`, `validation` (`validation_matched` / `validation_mismatched` for MNLI),
      `test`, ... (see `GlueTask.splits`).
    column_map: extra `{source column: canonical column}` names.
    label_map: extra `{label string: class id}` entries.
    delimiter: field separator for files whose extension does not tell it.
    cache_dir: `datasets` cache for hub downloads.
  """
  spec = get_task(task)
  source = data_dir_or_files
  # Split names matter only where they select the data (hub, directory); for explicit files
  # or datasets they are labels, and for dicts the key check below names the problem.
  if (source is None or _is_dir(source)) and split not in spec.splits:
    hint = (" (MNLI has validation_matched and validation_mismatched)"
            if spec.name == "mnli" and split == "validation" else "")
    raise ValueError(f"{spec.name} has no split {split!r}{hint}; splits: "
                     f"{sorted(spec.splits)}")

  if source is None:
    import datasets
    dataset = datasets.load_dataset(spec.hub[0], spec.hub[1], split=split, cache_dir=cache_dir)
    return _canonicalize(dataset.to_list(), spec, column_map, label_map,
                         f"{spec.hub[0]}/{spec.hub[1]}:{split}")

  if _is_hf_dataset_dict(source):
    if split not in source:
      raise ValueError(f"the DatasetDict has no split {split!r}; it has {sorted(source)}")
    source = source[split]
  if _is_hf_dataset(source):
    return _canonicalize(source.to_list(), spec, column_map, label_map, f"dataset:{split}")

  if isinstance(source, Mapping):
    if split not in source:
      raise ValueError(f"no file given for split {split!r}; given: {sorted(source)}")
    source = source[split]
  if isinstance(source, (str, os.PathLike)) and _is_dir(source):
    paths = [_find_split_file(spec, os.fspath(source), split)]
  elif isinstance(source, (str, os.PathLike)):
    paths = [os.fspath(source)]
  elif isinstance(source, (list, tuple)):
    paths = [os.fspath(p) for p in source]
  else:
    raise ValueError(f"data_dir_or_files must be None, a path, a list of paths, a dict of "
                     f"them or a datasets.Dataset; got {type(source).__name__}")
  records: list[Any] = []
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"GLUE file not found: {path}")
    records.extend(_read_file(path, spec, delimiter))
  return _canonicalize(records, spec, column_map, label_map, ", ".join(paths))


def _is_dir(source: Any) -> bool:
  return isinstance(source, (str, os.PathLike)) and os.path.isdir(source)


def _is_hf_dataset(obj: Any) -> bool:
  import datasets
  return isinstance(obj, datasets.Dataset)


def _is_hf_dataset_dict(obj: Any) -> bool:
  import datasets
  return isinstance(obj, datasets.DatasetDict)


# ------------------------------------------------------------------------------------------
# Tokenizer helpers and encoding
# ------------------------------------------------------------------------------------------


def build_wordpiece_tokenizer(vocab: str | os.PathLike | Sequence[str] | Mapping[str, int],
                              lowercase: bool = True):
  """A BERT WordPiece `tokenizers.Tokenizer` from a `vocab.txt` path, a token list or a dict
  (mbert_jax.data.tokenizer.build_wordpiece with fine-tuning's special tokens: no [MASK]).

  Normalisation matches BERT: clean text, split CJK characters, lower case and strip accents
  when `lowercase` (uncased MobileBERT), keep them otherwise.
  """
  return tokenizer_lib.build_wordpiece(vocab, lower_case=lowercase,
                                       require=tokenizer_lib.FINETUNE_SPECIAL_TOKENS)


def special_token_ids(tokenizer) -> dict[str, int]:
  """`{"cls", "sep", "pad"}` ids looked up in the tokenizer's vocabulary."""
  return tokenizer_lib.token_ids(tokenizer, ("cls", "sep", "pad"))


def plain_tokenizer(tokenizer):
  """The tokenizer without its own truncation/padding, which would cut text before the
  pair-aware truncation here (a copy; the caller's tokenizer is left unchanged)."""
  return tokenizer_lib.plain_tokenizer(tokenizer)


def truncated_lengths(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
  """Lengths after BERT's longest-first truncation of a pair to `max_tokens` tokens.

  BERT removes one token at a time from the end of the longer sequence, from `b` on ties.
  Closed form of that loop: the longer side shrinks until it meets the shorter one, then
  both shrink together, `a` keeping the odd token.
  """
  if max_tokens < 0:
    raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
  if len_a + len_b <= max_tokens:
    return len_a, len_b
  shorter = min(len_a, len_b)
  if 2 * shorter <= max_tokens:
    longer = max_tokens - shorter
    return (longer, shorter) if len_a > len_b else (shorter, longer)
  return (max_tokens + 1) // 2, max_tokens // 2


def _check_texts(name: str, texts: Any) -> list[str]:
  if isinstance(texts, str):
    raise ValueError(f"{name} must be a sequence of strings, not a single string")
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise ValueError(f"{name}[{i}] is a {type(t).__name__}, not a string")
  return texts


def encode_pairs(tokenizer, texts_a: Iterable[str], texts_b: Iterable[str] | None = None,
                 max_seq_length: int = 128) -> dict[str, np.ndarray]:
  """BERT inputs for single texts or text pairs.

  Each row is `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, truncated longest-first to
  `max_seq_length` and padded with `[PAD]`.

  Args:
    tokenizer: a `tokenizers.Tokenizer` (WordPiece) whose vocabulary has [CLS]/[SEP]/[PAD].
    texts_a: first segments.
    texts_b: second segments (same length as `texts_a`) or None.
    max_seq_length: fixed output length.

  Returns:
    `input_ids`, `token_type_ids`, `attention_mask`: int32 arrays [N, max_seq_length].
  """
  texts_a = _check_texts("texts_a", texts_a)
  if texts_b is not None:
    texts_b = _check_texts("texts_b", texts_b)
    if len(texts_b) != len(texts_a):
      raise ValueError(f"texts_a and texts_b differ in length: {len(texts_a)} vs "
                       f"{len(texts_b)}")
  specials = 3 if texts_b is not None else 2
  if max_seq_length < specials:
    raise ValueError(f"max_seq_length {max_seq_length} leaves no room for the "
                     f"{specials} special tokens")
  ids = special_token_ids(tokenizer)
  tok = plain_tokenizer(tokenizer)
  enc_a = tok.encode_batch(texts_a, add_special_tokens=False)
  enc_b = tok.encode_batch(texts_b, add_special_tokens=False) if texts_b is not None else None

  n = len(texts_a)
  input_ids = np.full((n, max_seq_length), ids["pad"], dtype=np.int32)
  token_type_ids = np.zeros((n, max_seq_length), dtype=np.int32)
  attention_mask = np.zeros((n, max_seq_length), dtype=np.int32)
  budget = max_seq_length - specials
  for i in range(n):
    a = enc_a[i].ids
    b = enc_b[i].ids if enc_b is not None else []
    la, lb = truncated_lengths(len(a), len(b), budget)
    row = [ids["cls"], *a[:la], ids["sep"]]
    first_len = len(row)
    if enc_b is not None:
      row += [*b[:lb], ids["sep"]]
    input_ids[i, :len(row)] = row
    token_type_ids[i, first_len:len(row)] = 1
    attention_mask[i, :len(row)] = 1
  return {"input_ids": input_ids, "token_type_ids": token_type_ids,
          "attention_mask": attention_mask}


def encode_glue(task: str | GlueTask, dataset: Any, tokenizer, max_seq_length: int = 128
                ) -> dict[str, np.ndarray]:
  """`encode_pairs` over a canonical GLUE split (`load_glue`), plus `labels`
  (int32 class ids, float32 for STS-B; -1 where unlabelled) and `idx`."""
  spec = get_task(task)
  columns = {c: list(dataset[c]) for c in (*spec.text_fields, "label", "idx")}
  texts_b = columns[spec.text_fields[1]] if spec.is_pair else None
  batch = encode_pairs(tokenizer, columns[spec.text_fields[0]], texts_b, max_seq_length)
  batch["labels"] = np.asarray(columns["label"],
                               dtype=np.float32 if spec.is_regression else np.int32)
  batch["idx"] = np.asarray(columns["idx"], dtype=np.int64)
  return batch
