"""A real English corpus present on every machine: the documentation inside Python's stdlib.

Sources, all read from the standard library's own files (nothing is imported except the pure
data module `pydoc_data.topics`, so no module's import side effects can run):

* docstrings of modules, classes and functions (parsed with `ast`, never imported),
* block comments (developer prose next to the code),
* the language-reference topics that `help()` shows (`pydoc_data.topics`).

A module's text (module docstring and top-level comments, then each top-level class or
function's docstrings and comments, in source order) is cut into documents of at least
MIN_DOCUMENT_CHARS at definition boundaries; each help topic is one document. Code, doctests
and markup are filtered out so what remains is prose. The result depends only on the stdlib
files, so it is identical across runs on the same Python install (about 4 MB of text in 2,100
documents on CPython 3.11; a held-out split comes from the pipeline's eval_fraction).
"""

from __future__ import annotations

import ast
import bisect
import fnmatch
import hashlib
import importlib
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from typing import Iterator

from mbert_jax.data.text import looks_like_prose, normalize_spaces, strip_rest_markup

# Bump when extraction rules change: the value is part of every cache key built on this corpus.
BUILTIN_CORPUS_VERSION = 1

# Documents are at least this long (about 4 segments of 128 tokens) unless a module has less.
MIN_DOCUMENT_CHARS = 2000
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload"})
_COMMENT_NOISE = ("!", "-*-", " -*-", "noqa", " noqa", "type:", " type:", "pragma", " pragma",
                  " fmt:", "fmt:", " pylint", "pylint")


@dataclass(frozen=True)
class BuiltinDocument:
  name: str  # e.g. "json.decoder.JSONDecoder" or "topics.assignment"
  text: str  # paragraphs separated by "\n"


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _module_name(root: str, path: str) -> str:
  rel = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def iter_stdlib_files(root: str | None = None) -> Iterator[tuple[str, str]]:
  """(module name, path) of every stdlib .py file, in a fixed (sorted) order."""
  root = root or stdlib_root()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
    for fn in sorted(filenames):
      if fn.endswith(".py"):
        path = os.path.join(dirpath, fn)
        yield _module_name(root, path), path


def stdlib_fingerprint(root: str | None = None) -> str:
  """Cheap identity of the stdlib tree (names, sizes, mtimes) for cache keys."""
  h = hashlib.sha256(f"{sys.version}|{BUILTIN_CORPUS_VERSION}".encode())
  for name, path in iter_stdlib_files(root):
    st = os.stat(path)
    h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
  return h.hexdigest()[:24]


def clean_docstring(doc: str) -> list[str]:
  """Prose paragraphs of a (cleandoc'ed) docstring: no doctests, code blocks or markup."""
  paragraphs, current = [], []
  for line in doc.split("\n") + [""]:
    if line.strip():
      current.append(line)
      continue
    if current:
      paragraphs.append(current)
      current = []
  kept = []
  for para in paragraphs:
    if any(ln.lstrip().startswith((">>>", "...")) for ln in para):
      continue  # doctest: code and its output
    # Judge whole paragraphs: dropping single lines would cut sentences in half.
    text = normalize_spaces(strip_rest_markup(" ".join(para))).replace("::", ":")
    if looks_like_prose(text):
      kept.append(text)
  return kept


def scan_tree(tree: ast.AST) -> tuple[list[tuple[int, str]], set[int]]:
  """One pass over the syntax tree (the expensive part): docstring paragraphs with their line
  numbers, and the lines inside multi-line string literals (where '#' starts no comment)."""
  docstrings, string_lines = [], set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant):
      if isinstance(node.value, str) and node.end_lineno and node.end_lineno > node.lineno:
        string_lines.update(range(node.lineno, node.end_lineno + 1))
    elif isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc:
        line = node.body[0].lineno
        docstrings.extend((line, p) for p in clean_docstring(doc))
  return docstrings, string_lines


def comment_blocks(source_lines: list[str], string_lines: set[int]) -> list[tuple[int, str]]:
  """(first line number, prose) of each block of consecutive full-line comments."""
  blocks, current, start = [], [], 0

  def close():
    if current:
      text = normalize_spaces(" ".join(current))
      if looks_like_prose(text, min_words=4):
        blocks.append((start, strip_rest_markup(text)))

  for lineno, line in enumerate(source_lines, start=1):
    stripped = line.strip()
    if stripped.startswith("#") and lineno not in string_lines:
      body = stripped.lstrip("#")
      if body.startswith(_COMMENT_NOISE) or not body.strip():
        close()  # an empty "#" line ends a paragraph just like a blank line
        current = []
        continue
      if not current:
        start = lineno
      current.append(body.strip())
    else:
      close()
      current = []
  close()
  return blocks


def module_documents(name: str, source: bytes, min_chars: int = MIN_DOCUMENT_CHARS
                     ) -> list[BuiltinDocument]:
  """Documents of one module; an unparsable file (the stdlib has a few on purpose) gives none."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # invalid escape sequences in old test files
      tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  source_lines = source.decode("utf-8", errors="replace").split("\n")
  docstrings, string_lines = scan_tree(tree)
  pieces = docstrings + comment_blocks(source_lines, string_lines)

  # (first line, last line, qualified name, node) of each top-level definition, in line order.
  spans = []
  for node in tree.body:
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      first = min([node.lineno] + [d.lineno for d in node.decorator_list])
      spans.append((first, node.end_lineno or node.lineno, f"{name}.{node.name}", node))
  starts = [span[0] for span in spans]

  def owner(line: int) -> int:
    """Index of the top-level definition containing `line`, or -1 for module level."""
    i = bisect.bisect_right(starts, line) - 1
    return i if i >= 0 and line <= spans[i][1] else -1

  grouped: dict[int, list[tuple[int, str]]] = {}
  for line, piece in pieces:
    grouped.setdefault(owner(line), []).append((line, piece))

  units = []
  for i in sorted(grouped):
    # Stable sort by line only: a docstring's paragraphs share a line and keep their order.
    ordered = sorted(grouped[i], key=lambda piece: piece[0])
    units.append((name if i < 0 else spans[i][2], [t for _, t in ordered]))
  return merge_units(units, min_chars)


def merge_units(units: list[tuple[str, list[str]]], min_chars: int) -> list[BuiltinDocument]:
  """Join consecutive units (module header, definitions) of one module into documents of at
  least `min_chars`, so documents hold several segments' worth of consecutive text: BERT gives
  every one-sentence chunk a random next segment, and a corpus of tiny documents would push
  the NSP random rate far above 50%. A short remainder joins the previous document."""
  docs: list[tuple[str, list[str]]] = []
  current_name, current, size = "", [], 0
  for unit_name, paragraphs in units:
    if not current:
      current_name = unit_name
    current.extend(paragraphs)
    size += sum(len(p) + 1 for p in paragraphs)
    if size >= min_chars:
      docs.append((current_name, current))
      current, size = [], 0
  if current:
    if docs:
      docs[-1][1].extend(current)
    else:
      docs.append((current_name, current))
  return [BuiltinDocument(n, "\n".join(ps)) for n, ps in docs]


def topic_documents() -> list[BuiltinDocument]:
  """The help() topics of the language reference (pure data module; absent in minimal installs)."""
  try:
    topics = importlib.import_module("pydoc_data.topics").topics
  except ImportError:
    return []
  docs = []
  for key in sorted(topics):
    paragraphs, current = [], []
    for line in topics[key].split("\n") + [""]:
      # Code examples are indented further than the prose (3 spaces); drop them.
      indented_code = line.startswith("      ") or line.lstrip().startswith((">>>", "..."))
      if line.strip() and not indented_code:
        current.append(line.strip())
      elif current:
        paragraphs.append(normalize_spaces(" ".join(current)))
        current = []
    prose = [strip_rest_markup(p) for p in paragraphs if looks_like_prose(p)]
    if prose:
      docs.append(BuiltinDocument(f"topics.{key}", "\n".join(prose)))
  return docs


def iter_builtin_documents(pattern: str = "*", root: str | None = None,
                           min_chars: int = MIN_DOCUMENT_CHARS) -> Iterator[BuiltinDocument]:
  """Builtin documents of modules (and help topics, named `topics.<key>`) matching a glob."""
  for name, path in iter_stdlib_files(root):
    # "email.*" should take the package itself (email/__init__.py) along with its modules.
    if not (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name + ".", pattern)):
      continue
    with open(path, "rb") as f:
      source = f.read()
    yield from module_documents(name, source, min_chars)
  for doc in topic_documents():
    if fnmatch.fnmatchcase(doc.name, pattern):
      yield doc


if __name__ == "__main__":  # pragma: no cover
  docs = list(iter_builtin_documents())
  print(len(docs), "documents", sum(len(d.text) for d in docs) / 1e6, "M characters")
