"""Plain-text helpers: sentence splitting, reading detection, binary detection, prose detection.

BERT's input format is one sentence per line with blank lines between documents; running text
(Wikipedia paragraphs, one article per line) must first be cut into sentences. Splitters:

* `blingfire` (Microsoft Bling Fire, a compiled finite-state splitter; optional package): the
  best boundaries of the splitters compared (`benchmarks/data_pipeline.py --compare_splitters`)
  at about the regex splitter's speed, and it never cuts inside a token (`ASP.NET`, `os.path`),
* `regex`: `split_sentences` below, dependency-free, the fallback when blingfire is missing,
* `lines`: every non-blank line is one sentence (BERT's format, as given).

`auto` looks at a sample of the data (`line_evidence`, `choose_reading`): lines that look like
sentences keep BERT's reading, anything else (long lines, several sentence ends per line) is
split.
"""

from __future__ import annotations

import functools
import re
import statistics
from typing import Any, Callable, Iterable

# Lower-cased tokens that end with a period without ending a sentence. "etc." is deliberately
# absent: followed by a capital it nearly always closes the sentence.
ABBREVIATIONS = frozenset("""
  e.g. i.e. cf. vs. viz. al. approx. resp. mr. mrs. ms. dr. prof. st. jr. sr. no. nos. fig.
  figs. eq. eqs. sec. ch. vol. pp. p. ca. inc. ltd. co. corp. dept. jan. feb. mar. apr. jun.
  jul. aug. sep. sept. oct. nov. dec. mt. gen. col. lt. sgt. capt. u.s. u.k. a.m. p.m.
""".split())

# Sentence end: terminal punctuation, optional closing quotes/brackets, whitespace, then
# something that can start a sentence.
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]*[A-Z0-9])")
_SPACES = re.compile(r"\s+")


def normalize_spaces(text: str) -> str:
  return _SPACES.sub(" ", text).strip()


def _ends_with_abbreviation(text: str, end: int) -> bool:
  """Whether the word ending at `end` (just past its period) is an abbreviation or an initial."""
  start = text.rfind(" ", 0, end) + 1
  word = text[start:end].lstrip("\"'([\u201c\u2018").lower()
  if word in ABBREVIATIONS:
    return True
  # Single-letter initials ("J. R. R. Tolkien") and dotted acronyms ("U.S.").
  return bool(re.fullmatch(r"(?:[a-z]\.)+", word))


def split_sentences(text: str) -> list[str]:
  """Rule-based split of running text into sentences (whitespace-normalised, none empty)."""
  text = normalize_spaces(text)
  if not text:
    return []
  sentences, start = [], 0
  for m in _BOUNDARY.finditer(text):
    if text[m.start()] == "." and _ends_with_abbreviation(text, m.start() + 1):
      continue
    punct_end = m.start() + len(m.group(0).rstrip())
    piece = text[start:punct_end].strip()
    if piece:
      sentences.append(piece)
    start = m.end()
  tail = text[start:].strip()
  if tail:
    sentences.append(tail)
  return sentences


def split_long_line(line: str, max_chars: int) -> list[str]:
  """Cut a line into pieces of at most `max_chars`, at the last whitespace where possible."""
  pieces = []
  while len(line) > max_chars:
    cut = line.rfind(" ", max_chars // 2, max_chars + 1)
    if cut <= 0:
      cut = max_chars  # one enormous "word": a hard cut is the only option
    pieces.append(line[:cut].strip())
    line = line[cut:].lstrip()
  if line.strip():
    pieces.append(line.strip())
  return [p for p in pieces if p]


# --------------------------------------------------------------------------- splitters
SPLITTERS = ("lines", "regex", "blingfire")
LIBRARY_SPLITTER = "blingfire"


@functools.lru_cache(maxsize=None)
def _blingfire() -> Any:
  try:
    import blingfire
  except (ImportError, OSError):  # OSError: its shared library does not load on this platform
    return None
  return blingfire


def library_splitter_available() -> bool:
  return _blingfire() is not None


def split_sentences_blingfire(text: str) -> list[str]:
  bf = _blingfire()
  if bf is None:
    raise ValueError("data.sentence_splitter='blingfire' needs the blingfire package "
                     "(pip install blingfire); 'regex' needs nothing")
  if not text.strip():
    return []
  # Sentences come back trimmed, one per line; inner whitespace is left as it was (the BERT
  # pre-tokenizer splits on any of it), which keeps this at the library's speed.
  return [x for x in bf.text_to_sentences(text.replace("\n", " ")).split("\n") if x.strip()]


def splitter_function(splitter: str) -> Callable[[str], list[str]]:
  """The function that cuts one line (a paragraph or a whole article) into sentences."""
  if splitter == "lines":
    return lambda line: [normalize_spaces(line)] if line.strip() else []
  if splitter == "regex":
    return split_sentences
  if splitter == "blingfire":
    return split_sentences_blingfire
  raise ValueError(f"unknown sentence splitter {splitter!r}; expected one of {SPLITTERS}")


def splitting_splitter() -> str:
  """What `auto` splits with: blingfire where installed, else the regex splitter."""
  return LIBRARY_SPLITTER if library_splitter_available() else "regex"


def sentences_of(text: str, splitter: str) -> list[str]:
  """A document's sentences. `lines`: each non-blank line is one; otherwise lines are
  paragraphs (or whole articles) cut into sentences by the named splitter."""
  split = splitter_function(splitter)
  return [s for ln in text.split("\n") if ln.strip() for s in split(ln)]


# --------------------------------------------------------------------------- reading detection
# A BERT-format line is one sentence: Wikipedia's sentences average ~25 words (~150 chars) and
# few pass 400 chars, while its paragraphs hold 4-6 sentences and its articles hundreds.
SENTENCE_LINE_MAX_MEDIAN_CHARS = 400
SENTENCE_LINE_MAX_MULTI_FRACTION = 0.25  # some real sentence lines hold "Dr. No." or a quote
SENTENCE_LINE_MAX_LONG_FRACTION = 0.1
LONG_LINE_CHARS = 1000


def line_evidence(lines: Iterable[str]) -> dict[str, Any]:
  """Shape statistics of non-blank lines: length, and sentence ends per line (regex splitter,
  fast and dependency-free: only the count matters here)."""
  lengths, ends = [], []
  for line in lines:
    if not line.strip():
      continue
    lengths.append(len(line))
    ends.append(len(split_sentences(line[:20_000])))
  if not lengths:
    return {"lines": 0}
  ordered = sorted(lengths)
  return {
      "lines": len(lengths),
      "median_chars": float(statistics.median(ordered)),
      "p90_chars": float(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]),
      "mean_sentences_per_line": sum(ends) / len(ends),
      "multi_sentence_line_fraction": sum(e > 1 for e in ends) / len(ends),
      "long_line_fraction": sum(n > LONG_LINE_CHARS for n in lengths) / len(lengths),
  }


def lines_look_like_sentences(evidence: dict[str, Any]) -> bool:
  if not evidence.get("lines"):
    return True  # nothing to judge; BERT's reading loses nothing on an empty sample
  return (evidence["median_chars"] <= SENTENCE_LINE_MAX_MEDIAN_CHARS
          and evidence["multi_sentence_line_fraction"] <= SENTENCE_LINE_MAX_MULTI_FRACTION
          and evidence["long_line_fraction"] <= SENTENCE_LINE_MAX_LONG_FRACTION)


def choose_reading(evidence: dict[str, Any]) -> str:
  """`lines` when the sampled lines look like sentences, else the splitting splitter."""
  return "lines" if lines_look_like_sentences(evidence) else splitting_splitter()


# --------------------------------------------------------------------------- binary detection
# Share of characters that no text holds (undecodable bytes, NUL and other C0 controls) above
# which a document is binary. Real text with a stray bad byte stays far below it; a file is
# refused only above FILE_BINARY_CHAR_FRACTION (random or compressed bytes give 50-60%), so a
# text file with a binary document inside loses that document, not the file.
BINARY_CHAR_FRACTION = 0.1
FILE_BINARY_CHAR_FRACTION = 0.3
_BAD_CHARS = re.compile("[\ufffd\x00-\x08\x0e-\x1f\x7f]")


def bad_char_fraction(text: str) -> float:
  """Fraction of non-whitespace characters that are U+FFFD or control characters."""
  visible = len(text) - sum(text.count(c) for c in " \t\n\r\x0b\x0c")
  return len(_BAD_CHARS.findall(text)) / visible if visible > 0 else 0.0


def looks_binary(text: str) -> bool:
  return bad_char_fraction(text) > BINARY_CHAR_FRACTION


_CODE_CHARS = frozenset("()[]{}=<>_*/\\|@;:$%^~`#+")


def looks_like_prose(text: str, min_words: int = 3) -> bool:
  """Heuristic: mostly letters, few code symbols, several words. Used on docstrings/comments."""
  words = text.split()
  if len(words) < min_words:
    return False
  chars = [c for c in text if not c.isspace()]
  letters = sum(c.isalpha() for c in chars)
  code = sum(c in _CODE_CHARS for c in chars)
  return letters >= 0.7 * len(chars) and code <= 0.08 * len(chars)


_REST_ROLE = re.compile(r":[\w.:+-]+:`(?:[^`<]*<)?([^`>]*)>?`")
_BACKTICKS = re.compile(r"`+([^`]+)`+_{0,2}")


def strip_rest_markup(text: str) -> str:
  """`:func:\\`os.path.join\\`` -> `os.path.join`, ``x`` -> x: keeps the words, drops markup."""
  text = _REST_ROLE.sub(r"\1", text)
  return _BACKTICKS.sub(r"\1", text)
