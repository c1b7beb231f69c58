"""Where documents come from: parse `data.source`, read every source into one Arrow dataset of
rows, split train/eval.

A source list is comma-separated. Each item is one of

* `builtin` or `builtin:<module glob>`: the stdlib documentation corpus (see builtin_corpus),
* a local file, directory or glob (`~`, `*`, `**` allowed; `file:` forces a local reading):
  `.txt`/`.text` (and any unknown extension) = plain text, a blank line between documents,
  lines being sentences (BERT's format) or paragraphs / whole articles (`auto` tells);
  `.jsonl`/`.json`/`.ndjson` = one JSON object per line; `.parquet`; a trailing `.gz` is
  decompressed,
* anything else is a Hugging Face hub dataset `path[:config][@split]` (needs network or a
  populated HF cache), e.g. `wikitext:wikitext-103-raw-v1@train` or
  `wikimedia/wikipedia:20231101.en`.

Every source becomes rows (text, splitter, flags, skip, hash). A bad document never stops the
build: it becomes a row with `skip` set to the reason (a binary document or file: `binary`,
`binary_file`), or is repaired and gets a flag (the file readers are in readers.py). Missing
files, sources whose content is not text (a compressed or binary file named by mistake) and
sources without a usable document are errors raised before anything is cached.

`data.sentence_splitter=auto` is resolved per source from a sample of its documents
(`resolve_splitter`): BERT's one-sentence-per-line reading where the lines look like sentences,
a sentence splitter otherwise; the choice and its evidence go to the log and the cache.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import logging
import os
from typing import Any, Iterator

import datasets
import numpy as np

from mbert_jax.data import text as text_lib
from mbert_jax.data.builtin_corpus import iter_builtin_documents, stdlib_fingerprint
from mbert_jax.data.readers import (RawDoc, bound_document, group_rows, iter_jsonl_records,
                                    iter_text_file, sniff_file, value_to_doc)

log = logging.getLogger(__name__)

KIND_BY_EXTENSION = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl",
                     ".ndjson": "jsonl", ".parquet": "parquet"}
LOCAL_KINDS = ("text", "jsonl", "parquet")

RAW_FEATURES = datasets.Features({
    "text": datasets.Value("string"),
    "splitter": datasets.Value("string"),
    "flags": datasets.List(datasets.Value("string")),
    "skip": datasets.Value("string"),
    "hash": datasets.Value("int64"),
})


@dataclasses.dataclass(frozen=True)
class Source:
  """One resolved item of a source list."""
  spec: str  # as written by the user
  kind: str  # builtin | text | jsonl | parquet | hub
  paths: tuple[str, ...] = ()
  pattern: str = "*"  # builtin module glob
  hub_path: str = ""
  hub_config: str | None = None
  hub_split: str = "train"


# --------------------------------------------------------------------------- parsing
def _kind_of_path(path: str) -> str:
  stem = path[:-3] if path.endswith(".gz") else path
  return KIND_BY_EXTENSION.get(os.path.splitext(stem)[1].lower(), "text")


def _has_known_extension(path: str) -> bool:
  stem = path[:-3] if path.endswith(".gz") else path
  return os.path.splitext(stem)[1].lower() in KIND_BY_EXTENSION


def _looks_local(item: str) -> bool:
  return (item.startswith(("/", "./", "../", "~")) or any(c in item for c in "*?[")
          or _has_known_extension(item) or os.path.exists(item))


def _local_files(item: str) -> list[str]:
  path = os.path.expanduser(item)
  if any(c in path for c in "*?["):
    files = sorted(p for p in globlib.glob(path, recursive=True) if os.path.isfile(p))
    if not files:
      raise FileNotFoundError(f"data source {item!r}: the pattern matches no file")
    return files
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if os.path.isfile(os.path.join(path, f)) and _has_known_extension(f))
    if not files:
      raise FileNotFoundError(f"data source {item!r}: the directory holds no .txt, .jsonl or "
                              f".parquet file")
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data source {item!r}: no such file")
  return [path]


def parse_sources(spec: str) -> list[Source]:
  """Resolve a comma-separated source list; missing local files raise FileNotFoundError."""
  items = [s.strip() for s in str(spec).split(",") if s.strip()]
  if not items:
    raise ValueError(f"data source {spec!r} names no source")
  out: list[Source] = []
  for item in items:
    if item == "builtin" or item.startswith("builtin:"):
      out.append(Source(item, "builtin", pattern=item[len("builtin:"):] or "*"))
      continue
    local = item.startswith("file:")
    path = item[len("file:"):] if local else item
    if local or _looks_local(path):
      by_kind: dict[str, list[str]] = {}
      for f in _local_files(path):
        by_kind.setdefault(_kind_of_path(f), []).append(os.path.abspath(f))
      out.extend(Source(item, kind, paths=tuple(files)) for kind, files in sorted(by_kind.items()))
      continue
    name, _, split = item.partition("@")
    hub_path, _, config = name.partition(":")
    out.append(Source(item, "hub", hub_path=hub_path, hub_config=config or None,
                      hub_split=split or "train"))
  return out


def check_local_sources_not_empty(sources: list[Source]) -> None:
  """A corpus made only of empty files is an error up front, before any reading or caching."""
  if sources and all(s.kind in LOCAL_KINDS for s in sources):
    paths = [p for s in sources for p in s.paths]
    if all(os.path.getsize(p) == 0 for p in paths):
      raise ValueError(f"empty corpus: every source file is empty ({', '.join(paths)})")


def check_sources_are_text(sources: list[Source]) -> None:
  """Refuse a `data.source` item none of whose files is text; warn about (and later skip and
  count) binary files inside an item that also has text files."""
  by_item: dict[str, list[tuple[str, str]]] = {}
  for source in sources:
    if source.kind in ("text", "jsonl"):
      by_item.setdefault(source.spec, []).extend((p, sniff_file(p)) for p in source.paths)
  for item, files in by_item.items():
    bad = [(p, why) for p, why in files if why]
    if bad and len(bad) == len(files):
      path, why = bad[0]
      more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
      raise ValueError(f"data source {item!r} is not text: {path} is {why}{more}; give "
                       f"UTF-8 text, JSON lines or Parquet")
    for path, why in bad:
      log.warning("data source %r: skipping %s, which is not text (%s)", item, path, why)


def load_hub_dataset(source: Source) -> datasets.Dataset:
  try:
    return datasets.load_dataset(source.hub_path, source.hub_config, split=source.hub_split)
  except (FileNotFoundError, ConnectionError) as e:
    # Same exception type, with the config field named and the offline alternatives.
    raise type(e)(
        f"data source {source.spec!r}: hub dataset {source.hub_path!r} is neither in the local "
        f"Hugging Face cache nor reachable (offline? use local files or `builtin`): {e}") from e


def source_fingerprint(source: Source) -> str:
  """Identity of a source's content for cache keys (files: path, size, mtime)."""
  if source.kind == "builtin":
    return f"builtin:{source.pattern}:{stdlib_fingerprint()}"
  if source.kind in LOCAL_KINDS:
    parts = []
    for p in source.paths:
      st = os.stat(p)
      parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return f"{source.kind}:" + "|".join(parts)
  ds = load_hub_dataset(source)
  return f"hub:{source.hub_path}:{source.hub_config}:{source.hub_split}:{ds._fingerprint}"


# Enough lines to judge a source's shape, few enough to read in well under a second.
SAMPLE_LINES = 2000
SAMPLE_CHARS = 2_000_000
SAMPLE_DOCUMENTS = 500


def sample_lines(source: Source, settings: dict[str, Any]) -> list[str]:
  """Non-blank lines of the first documents of a source (deterministic: always the start)."""
  lines: list[str] = []
  chars = 0
  for k, doc in enumerate(iter_source_documents(source, settings)):
    if k >= SAMPLE_DOCUMENTS or len(lines) >= SAMPLE_LINES or chars >= SAMPLE_CHARS:
      break
    if doc.skip or text_lib.looks_binary(doc.text):
      continue
    for line in doc.text.split("\n"):
      if line.strip():
        lines.append(line)
        chars += len(line)
  return lines[:SAMPLE_LINES]


def resolve_splitter(source: Source, settings: dict[str, Any]) -> dict[str, Any]:
  """{"splitter", "setting", "evidence"}: the splitter a source is read with. An explicit
  setting is used as given; `auto` samples the source's lines (see text.choose_reading)."""
  setting = str(settings["sentence_splitter"])
  if setting != "auto":
    text_lib.splitter_function(setting)  # a library splitter that is missing fails here
    return {"source": source.spec, "setting": setting, "splitter": setting, "evidence": {}}
  evidence = text_lib.line_evidence(sample_lines(source, settings))
  chosen = text_lib.choose_reading(evidence)
  return {"source": source.spec, "setting": setting, "splitter": chosen, "evidence": evidence}


def describe_splitter_choice(choice: dict[str, Any]) -> str:
  ev = choice["evidence"]
  if choice["setting"] != "auto":
    return f"data source {choice['source']!r}: sentence splitter {choice['splitter']!r} (as set)"
  if not ev.get("lines"):
    return (f"data source {choice['source']!r}: no lines to sample; reading "
            f"{choice['splitter']!r}")
  shape = (f"{ev['lines']} sampled lines: median {ev['median_chars']:.0f} chars, "
           f"{ev['mean_sentences_per_line']:.2f} sentence ends per line, "
           f"{ev['multi_sentence_line_fraction']:.0%} with several, "
           f"{ev['long_line_fraction']:.0%} over {text_lib.LONG_LINE_CHARS} chars")
  if choice["splitter"] == "lines":
    return (f"data source {choice['source']!r}: lines look like sentences ({shape}); "
            f"one sentence per line (BERT's format)")
  fallback = ("" if choice["splitter"] == text_lib.LIBRARY_SPLITTER else
              f" ({text_lib.LIBRARY_SPLITTER} is not installed: the regex splitter is the "
              f"fallback; pip install {text_lib.LIBRARY_SPLITTER} for better boundaries)")
  return (f"data source {choice['source']!r}: lines are not sentences ({shape}); splitting "
          f"them with {choice['splitter']!r}{fallback}")


def resolve_splitters(sources: list[Source], settings: dict[str, Any]) -> list[dict[str, Any]]:
  choices = [resolve_splitter(s, settings) for s in sources]
  for choice in choices:
    log.info("%s", describe_splitter_choice(choice))
  return choices


def grouping_for(source: Source, document_grouping: str) -> str:
  if document_grouping != "auto":
    return document_grouping
  return "wikitext" if source.kind == "hub" and "wikitext" in source.hub_path.lower() else "row"


# --------------------------------------------------------------------------- rows for datasets
def document_hash(text: str) -> int:
  """Stable 63-bit content hash (fits Arrow's int64): decides the eval hold-out independently
  of document order and of the seed."""
  digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
  return int.from_bytes(digest, "little") >> 1


def _row(doc: RawDoc, splitter: str) -> dict[str, Any]:
  if not doc.skip and text_lib.looks_binary(doc.text):
    doc = RawDoc("", doc.flags, skip="binary")  # undecodable bytes or control characters
  return {"text": doc.text, "splitter": splitter, "flags": list(doc.flags), "skip": doc.skip,
          "hash": document_hash(doc.text) if not doc.skip else 0}


def iter_source_documents(source: Source, settings: dict[str, Any]) -> Iterator[RawDoc]:
  """Documents of one source, bounded in line and document size."""
  max_line, max_doc = settings["max_line_chars"], settings["max_document_chars"]
  if source.kind == "builtin":
    for doc in iter_builtin_documents(source.pattern):
      yield from bound_document(RawDoc(doc.text), max_line, max_doc)
  elif source.kind == "text":
    for path in source.paths:
      yield from iter_text_file(path, max_line, max_doc)
  elif source.kind == "jsonl":
    grouping = grouping_for(source, settings["document_grouping"])
    for path in source.paths:
      rows = iter_jsonl_records(path, settings["text_field"], max_doc)
      for doc in group_rows(rows, grouping):
        yield from bound_document(doc, max_line, max_doc)
  elif source.kind in ("parquet", "hub"):
    field = settings["text_field"]
    ds = arrow_dataset(source, field, settings.get("arrow_cache_dir"))
    rows = (value_to_doc(v) for batch in ds.iter(batch_size=1000) for v in batch[field])
    for doc in group_rows(rows, grouping_for(source, settings["document_grouping"])):
      yield from bound_document(doc, max_line, max_doc)
  else:
    raise ValueError(f"unknown source kind {source.kind!r}")


def generate_rows(sources: list[dict[str, Any]], splitters: list[str], settings: dict[str, Any]
                  ) -> Iterator[dict]:
  """datasets.Dataset.from_generator entry point (plain arguments, so it pickles and hashes)."""
  for spec, splitter in zip(sources, splitters):
    source = Source(**{**spec, "paths": tuple(spec["paths"])})
    for doc in iter_source_documents(source, settings):
      yield _row(doc, splitter)


def arrow_dataset(source: Source, text_field: str, cache_dir: str | None = None
                  ) -> datasets.Dataset:
  """A Parquet or hub source as a datasets.Dataset. Local Parquet is prepared in `cache_dir`
  (the build's staging area) rather than in the user's global HF cache."""
  if source.kind == "parquet":
    ds = datasets.load_dataset("parquet", data_files=list(source.paths), split="train",
                               cache_dir=cache_dir)
  else:
    ds = load_hub_dataset(source)
  if text_field not in ds.column_names:
    raise ValueError(f"data source {source.spec!r} has no column {text_field!r} "
                     f"(data.text_field); columns: {ds.column_names}")
  return ds


def _rows_from_arrow_batch(batch: dict[str, list], text_field: str, splitter: str,
                           max_line_chars: int, max_document_chars: int) -> dict[str, list]:
  out: dict[str, list] = {k: [] for k in RAW_FEATURES}
  for value in batch[text_field]:
    for doc in bound_document(value_to_doc(value), max_line_chars, max_document_chars):
      for k, v in _row(doc, splitter).items():
        out[k].append(v)
  return out


def load_raw_documents(sources: list[Source], settings: dict[str, Any], staging_dir: str,
                       splitters: list[str] | None = None) -> datasets.Dataset:
  """All sources' documents as one Arrow dataset (columns of RAW_FEATURES), in source order.

  `splitters`: the resolved splitter of each source (resolve_splitters); None resolves here.
  One process: reading is a small share of the build next to tokenization (corpus.py), and a
  forked reader could deadlock a process that has started JAX.
  """
  os.makedirs(staging_dir, exist_ok=True)
  # Local Parquet is prepared once per build: the splitter's sample may already have done it.
  arrow_cache = settings.get("arrow_cache_dir") or os.path.join(staging_dir, "arrow")
  settings = {**settings, "arrow_cache_dir": arrow_cache}
  if splitters is None:
    splitters = [c["splitter"] for c in resolve_splitters(sources, settings)]
  parts = []
  for source, splitter in zip(sources, splitters):
    if source.kind in ("parquet", "hub") and grouping_for(
        source, settings["document_grouping"]) == "row":
      # Row-per-document Arrow data stays in Arrow: a batched map, no Python generator.
      ds = arrow_dataset(source, settings["text_field"], arrow_cache)
      parts.append(ds.map(
          _rows_from_arrow_batch, batched=True, remove_columns=ds.column_names,
          features=RAW_FEATURES,
          fn_kwargs=dict(text_field=settings["text_field"], splitter=splitter,
                         max_line_chars=settings["max_line_chars"],
                         max_document_chars=settings["max_document_chars"]),
          cache_file_name=os.path.join(staging_dir, f"raw-{len(parts)}.arrow"),
          desc=f"reading {source.spec}"))
    else:
      spec = dataclasses.asdict(source)
      spec["paths"] = list(source.paths)
      parts.append(datasets.Dataset.from_generator(
          generate_rows, features=RAW_FEATURES, cache_dir=os.path.join(staging_dir, "gen"),
          gen_kwargs={"sources": [spec], "splitters": [splitter], "settings": settings}))
  return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --------------------------------------------------------------------------- train / eval split
def eval_mask(hashes: np.ndarray, usable: np.ndarray, eval_fraction: float) -> np.ndarray:
  """Which documents are held out: content hash below the fraction of the 63-bit range. At
  least one usable document is held out whenever the fraction is positive."""
  hashes = np.asarray(hashes, dtype=np.int64)
  usable = np.asarray(usable, dtype=bool)
  if eval_fraction <= 0 or not usable.any():
    return np.zeros(len(hashes), dtype=bool)
  threshold = np.int64(min(int(eval_fraction * 2.0**63), 2**63 - 1))
  held = usable & (hashes < threshold)
  if not held.any():
    candidates = np.flatnonzero(usable)
    held[candidates[np.argmin(hashes[candidates])]] = True
  return held


def split_rows(ds: datasets.Dataset, split: str, eval_fraction: float) -> np.ndarray:
  """Row indices of the train or eval part of a source's documents. Skipped rows stay in train
  (counted once)."""
  table = ds.with_format("arrow")
  hashes = table["hash"].to_numpy()
  usable = (table["skip"].to_numpy(zero_copy_only=False) == "")
  held = eval_mask(hashes, usable, eval_fraction)
  return np.flatnonzero(held if split == "eval" else ~held)
