"""Plain-text helpers: sentence splitting, bounded lines, prose detection.

BERT's input format is one sentence per line with blank lines between documents; running text
(Wikipedia paragraphs, docstrings) must first be cut into sentences. No sentence-splitting
package ships offline, so `split_sentences` is a small rule-based splitter: good enough for NSP
segment boundaries, which only need to fall between sentences most of the time.
"""

from __future__ import annotations

import re

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


def sentences_of(text: str, splitter: str) -> list[str]:
  """A document's sentences. `lines`: each non-blank line is one; `regex`: lines are paragraphs."""
  lines = [ln for ln in text.split("\n") if ln.strip()]
  if splitter == "lines":
    return [normalize_spaces(ln) for ln in lines]
  if splitter == "regex":
    return [s for ln in lines for s in split_sentences(ln)]
  raise ValueError(f"unknown sentence splitter {splitter!r}; expected 'lines' or 'regex'")


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
