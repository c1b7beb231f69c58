"""Reading files robustly: bytes in, documents (`RawDoc`) out, whatever the files hold.

A bad document never stops a build: it becomes a document with `skip` set to the reason
(`binary_file`, `invalid_json`, `oversized_record`, `empty_file`, ...) or is repaired and gets
a flag (`non_utf8`, `long_line_split`, `long_document_split`). Memory stays bounded by the
configured line and document sizes however long a line or record is. Which files to read and
how they become the build's rows is sources.py's business.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from typing import Any, Iterator

from mbert_jax.data import text as text_lib
from mbert_jax.data.text import split_long_line


@dataclasses.dataclass(frozen=True)
class RawDoc:
  """One document as read, before it becomes a row of the build."""
  text: str
  flags: tuple[str, ...] = ()
  skip: str = ""  # empty = usable; otherwise the reason it is skipped


# --------------------------------------------------------------------------- bytes and text
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


# --------------------------------------------------------------------------- text files
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


# --------------------------------------------------------------------------- JSON lines
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


# --------------------------------------------------------------------------- documents
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


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")
_WIKITEXT_HEADING = re.compile(r"^ (= )+.*( =)+ $")


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
