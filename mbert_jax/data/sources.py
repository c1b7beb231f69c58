"""Where documents come from: parse `data.source`, read every kind robustly, split train/eval.

A source list is comma-separated. Each item is one of

* `builtin` or `builtin:<module glob>`: the stdlib documentation corpus (see builtin_corpus),
* a local file, directory or glob (`~`, `*`, `**` allowed; `file:` forces a local reading):
  `.txt`/`.text` (and any unknown extension) = plain text, a blank line between documents,
  lines being sentences (BERT's format) or paragraphs / whole articles (`auto` tells);
  `.jsonl`/`.json`/`.ndjson` = one JSON object per line; `.parquet`; a trailing `.gz` is
  decompressed,
* anything else is a Hugging Face hub dataset `path[:config][@split]` (needs network or a
  populated HF cache), e.g. `wikitext:wikitext-103-raw-v1@train` or `wikimedia/wikipedia:20231101.en`.

Every reader yields rows (text, splitter, flags, skip, hash). A bad document never stops the
build: it becomes a row with `skip` set to the reason (a binary document or file: `binary`,
`binary_file`), or is repaired and gets a flag. Missing files, sources whose content is not
text (a compressed or binary file named by mistake) and sources without a usable document are
errors raised before anything is cached.

`data.sentence_splitter=auto` is resolved per source from a sample of its documents
(`resolve_splitter`): BERT's one-sentence-per-line reading where the lines look like sentences,
a sentence splitter otherwise; the choice and its evidence go to the log and the cache.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import gzip
import hashlib
import json
import logging
import os
import re
from typing import Any, Iterator

import datasets
import numpy as np

from mbert_jax.data.builtin_corpus import iter_builtin_documents, stdlib_fingerprint
from mbert_jax.data import text as text_lib
from mbert_jax.data.text import split_long_line

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

_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")
_WIKITEXT_HEADING = re.compile(r"^ (= )+.*( =)+ $")


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


@dataclasses.dataclass(frozen=True)
class RawDoc:
  text: str
  flags: tuple[str, ...] = ()
  skip: str = ""  # empty = usable; otherwise the reason it is skipped


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


# --------------------------------------------------------------------------- byte-level reading
def _open_binary(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


SNIFF_BYTES = 65536
# Leading bytes of formats that are never text: what a mistaken `data.source` usually names.
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed (only names ending in .gz are decompressed)"),
    (b"BZh", "bzip2-compressed"), (b"\xfd7zXZ\x00", "xz-compressed"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"), (b"PK\x03\x04", "a zip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"), (b"PAR1", "a Parquet file (name it .parquet)"),
    (b"%PDF-", "a PDF file"), (b"\x7fELF", "an executable"),
    (b"\xff\xfe", "UTF-16 text (convert it to UTF-8)"),
    (b"\xfe\xff", "UTF-16 text (convert it to UTF-8)"),
)


def sniff_file(path: str) -> str:
  """Why a file's content is not text ("" when it is): known binary formats by their leading
  bytes, then the share of undecodable bytes and control characters in the first 64 KiB."""
  with open(path, "rb") as f:
    head = f.read(SNIFF_BYTES)
  if path.endswith(".gz"):
    if not head.startswith(b"\x1f\x8b"):
      return "named .gz but not gzip-compressed"
    try:
      with gzip.open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    except (OSError, EOFError) as e:
      return f"not a readable gzip file ({e})"
  for magic, what in _MAGIC:
    if head.startswith(magic):
      return what
  data, _ = split_utf8_tail(head) if len(head) == SNIFF_BYTES else (head, b"")
  text, _ = _decode(data)
  fraction = text_lib.bad_char_fraction(text)
  if fraction > text_lib.FILE_BINARY_CHAR_FRACTION:
    return (f"{fraction:.0%} of its first {len(text):,} characters are undecodable bytes or "
            f"control characters")
  return ""


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


def _decode(data: bytes) -> tuple[str, bool]:
  """(text, had invalid UTF-8): invalid bytes become U+FFFD instead of failing the build."""
  try:
    return data.decode("utf-8"), False
  except UnicodeDecodeError:
    return data.decode("utf-8", errors="replace"), True


def split_utf8_tail(data: bytes) -> tuple[bytes, bytes]:
  """Split off an incomplete multi-byte character at the end (a bounded read can cut one)."""
  i = len(data) - 1
  while i >= 0 and len(data) - i < 4 and (data[i] & 0xC0) == 0x80:
    i -= 1
  if i < 0:
    return data, b""
  lead = data[i]
  need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
  return (data[:i], data[i:]) if len(data) - i < need else (data, b"")


def iter_bounded_lines(f, max_chars: int) -> Iterator[tuple[str, bool, bool]]:
  """(line, was split, had invalid UTF-8) for each line of a binary file.

  Memory stays bounded by `max_chars` whatever the file holds: an enormous line is read in
  pieces and cut at whitespace into lines of at most `max_chars` characters.
  """
  pending, parts, was_split, bad = b"", "", False, False
  while True:
    chunk = f.readline(max_chars)
    complete = chunk.endswith(b"\n") or not chunk  # end of file ends the last line
    data = pending + chunk
    if complete:
      pending = b""
    else:
      data, pending = split_utf8_tail(data)
    text, b = _decode(data)
    parts, bad = parts + text, bad or b
    if complete:
      parts = parts.rstrip("\r\n")
    while len(parts) > max_chars:
      # Cut at the last space; the remainder stays raw (its end may continue a word).
      cut = parts.rfind(" ", max_chars // 2, max_chars + 1)
      cut = cut if cut > 0 else max_chars
      piece, parts, was_split = parts[:cut].strip(), parts[cut:].lstrip(" "), True
      if piece:
        yield piece, True, bad
    if complete:
      # A split line's empty tail is not a blank line (which would end the document).
      if chunk or parts:
        if parts.strip() or not was_split:
          yield parts, was_split, bad
      if not chunk:
        return
      parts, was_split, bad = "", False, False


def iter_text_file(path: str, max_line_chars: int, max_document_chars: int) -> Iterator[RawDoc]:
  """BERT's format: one sentence per line, documents separated by blank lines."""
  if sniff_file(path):
    yield RawDoc("", skip="binary_file")
    return
  lines: list[str] = []
  size, flags, produced = 0, set(), False

  def emit():
    return RawDoc("\n".join(lines), tuple(sorted(flags)))

  with _open_binary(path) as f:
    for line, was_split, bad in iter_bounded_lines(f, max_line_chars):
      if not line.strip():
        if lines:
          yield emit()
          produced = True
        lines, size, flags = [], 0, set()
        continue
      if lines and size + len(line) > max_document_chars:
        flags.add("long_document_split")
        yield emit()
        produced = True
        lines, size, flags = [], 0, {"long_document_split"}
      if was_split:
        flags.add("long_line_split")
      if bad:
        flags.add("non_utf8")
      lines.append(line)
      size += len(line) + 1
  if lines:
    yield emit()
    produced = True
  if not produced:
    yield RawDoc("", skip="empty_file")


def _read_record_line(f, limit: int) -> tuple[bytes | None, bool]:
  """(line, oversized): one record of a JSONL file without ever holding more than `limit`."""
  line = f.readline(limit)
  if not line:
    return None, False
  if len(line) < limit or line.endswith(b"\n"):
    return line, False
  rest = f.readline(1 << 20)
  if not rest:
    return line, False  # exactly `limit` bytes at the end of the file
  while rest and not rest.endswith(b"\n"):
    rest = f.readline(1 << 20)
  return b"", True


def iter_jsonl_records(path: str, text_field: str, max_record_chars: int) -> Iterator[RawDoc]:
  """One RawDoc per JSON line; malformed records become skips with their reason."""
  if sniff_file(path):
    yield RawDoc("", skip="binary_file")
    return
  produced = False
  with _open_binary(path) as f:
    while True:
      line, oversized = _read_record_line(f, 4 * max_record_chars)
      if line is None:
        break
      if oversized:
        produced = True
        yield RawDoc("", skip="oversized_record")
        continue
      if not line.strip():
        continue
      produced = True
      text, bad = _decode(line)
      yield record_to_doc(text, text_field, ("non_utf8",) if bad else ())
  if not produced:
    yield RawDoc("", skip="empty_file")


def record_to_doc(line: str, text_field: str, flags: tuple[str, ...] = ()) -> RawDoc:
  try:
    obj = json.loads(line)
  except ValueError:
    return RawDoc("", skip="invalid_json")
  if not isinstance(obj, dict):
    return RawDoc("", skip="invalid_json")
  if text_field not in obj:
    return RawDoc("", skip="missing_text_field")
  return value_to_doc(obj[text_field], flags)


def value_to_doc(value: Any, flags: tuple[str, ...] = ()) -> RawDoc:
  if value is None:
    return RawDoc("", skip="empty")
  if not isinstance(value, str):
    return RawDoc("", skip="invalid_text_field")
  return RawDoc(value, flags)


def bound_document(doc: RawDoc, max_line_chars: int, max_document_chars: int) -> Iterator[RawDoc]:
  """Cap line and document length of text that did not come through the bounded reader."""
  if doc.skip:
    yield doc
    return
  flags = set(doc.flags)
  lines: list[str] = []
  for line in doc.text.split("\n"):
    if len(line) > max_line_chars:
      flags.add("long_line_split")
      lines.extend(split_long_line(line, max_line_chars))
    else:
      lines.append(line)
  chunk, size = [], 0
  for line in lines:
    if chunk and size + len(line) > max_document_chars:
      flags.add("long_document_split")
      yield RawDoc("\n".join(chunk), tuple(sorted(flags)))
      chunk, size = [], 0
    chunk.append(line)
    size += len(line) + 1
  yield RawDoc("\n".join(chunk), tuple(sorted(flags)))


def group_rows(rows: Iterator[RawDoc], mode: str) -> Iterator[RawDoc]:
  """Turn rows into documents. `row`: each row is one; `blank_row`: rows are lines and a blank
  row ends a document; `wikitext`: rows are lines and a ` = Title = ` heading starts an article
  (headings themselves are dropped, like BERT's Wikipedia extraction)."""
  if mode == "row":
    yield from rows
    return
  if mode not in ("blank_row", "wikitext"):
    raise ValueError(f"unknown document grouping {mode!r}")
  lines: list[str] = []
  flags: set[str] = set()
  for row in rows:
    if row.skip:
      yield row
      continue
    text = row.text.strip("\n")
    boundary = (not text.strip()) if mode == "blank_row" else bool(_WIKITEXT_TITLE.match(text))
    if boundary:
      if lines:
        yield RawDoc("\n".join(lines), tuple(sorted(flags)))
      lines, flags = [], set()
      continue
    if mode == "wikitext" and (not text.strip() or _WIKITEXT_HEADING.match(text)):
      continue
    lines.append(text)
    flags.update(row.flags)
  if lines:
    yield RawDoc("\n".join(lines), tuple(sorted(flags)))


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
