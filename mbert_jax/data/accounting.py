"""Where the corpus's tokens go: read, used by examples, or dropped (and why).

BERT's pairing drops text in one way only: truncate_seq_pair cuts segments longer than the
sequence allows. A chunk's unused sentences are put back, so what truncation cuts is all that
is lost beyond documents skipped whole. A document whose lines are not sentences (one article
per line read as one sentence per line) is one enormous "sentence": every one of its chunks is
that sentence, truncated to a single example, and nearly all its text is lost. These functions
measure that from a pairing round's instance table, and name the setting that would keep it.

A config that loses text on purpose (the demo's sequence length of 64 cuts a quarter of the
built-in corpus) says so in `data.expected_drop_fraction`, and only a larger drop is warned
about. A warning is given once per process for a corpus and its settings: a pipeline of runs
(configs/demo.py) builds the same text for every run, and its held-out eval part loses as much.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Hashable

import numpy as np

# More than this share of the corpus's tokens missing from every example is warned about,
# unless the config expects a larger drop (data.expected_drop_fraction).
DROP_WARNING_FRACTION = 0.10

_warned: set[Hashable] = set()


def covered_tokens_per_document(instances: np.ndarray, sentence_offsets: np.ndarray,
                                document_offsets: np.ndarray) -> np.ndarray:
  """int64[num_documents]: tokens of each document inside at least one example's A or B.

  Segments never span documents, so after sorting them by start, the part of each segment
  not already covered by an earlier one ([max(start, running max end), end)) lies in the
  segment's own document; those parts add up to the union without a per-token mask.
  """
  table = np.asarray(instances, dtype=np.int64).reshape(-1, 5)
  doc_starts = np.asarray(sentence_offsets)[np.asarray(document_offsets)[:-1]]
  starts = np.concatenate([table[:, 0], table[:, 2]])
  ends = np.concatenate([table[:, 1], table[:, 3]])
  nonempty = ends > starts
  starts, ends = starts[nonempty], ends[nonempty]
  order = np.argsort(starts, kind="stable")
  starts, ends = starts[order], ends[order]
  reach = np.maximum.accumulate(ends)
  covered_from = np.maximum(starts, np.concatenate([[0], reach[:-1]]))
  new = np.clip(ends - covered_from, 0, None)
  owner = np.searchsorted(doc_starts, starts, side="right") - 1
  return np.bincount(owner, weights=new, minlength=len(doc_starts)).astype(np.int64)


def token_accounting(instances: np.ndarray, sentence_offsets: np.ndarray,
                     document_offsets: np.ndarray, corpus_stats: dict[str, Any]
                     ) -> dict[str, Any]:
  """Tokens read, used and dropped by cause, for one pairing round (JSON-ready)."""
  table = np.asarray(instances, dtype=np.int64).reshape(-1, 5)
  so, do = np.asarray(sentence_offsets), np.asarray(document_offsets)
  doc_tokens = so[do[1:]] - so[do[:-1]]
  one_sentence = np.diff(do) == 1
  covered = covered_tokens_per_document(table, so, do)
  lost = doc_tokens - covered
  skipped = {k: int(v) for k, v in corpus_stats.get("skipped_tokens", {}).items()}
  read = int(corpus_stats.get("tokens_read", int(doc_tokens.sum()) + sum(skipped.values())))
  dropped = {
      "truncation": int(lost[~one_sentence].sum()),
      "one_sentence_documents": int(lost[one_sentence].sum()),
      "skipped_documents": sum(skipped.values()),
  }
  examples = len(table)
  in_examples = int((table[:, 1] - table[:, 0]).sum() + (table[:, 3] - table[:, 2]).sum())
  return {
      "tokens_read": read,
      "tokens_used": int(covered.sum()),
      "tokens_in_examples": in_examples,  # random B segments repeat text used elsewhere
      "tokens_dropped": dropped,
      "skipped_document_tokens": skipped,
      "dropped_fraction": sum(dropped.values()) / read if read else 0.0,
      "examples": examples,
      "examples_per_million_tokens": examples / read * 1e6 if read else 0.0,
      "one_sentence_documents": int(one_sentence.sum()),
      "one_sentence_document_tokens": int(doc_tokens[one_sentence].sum()),
      "mean_sentence_tokens": float(doc_tokens.sum() / max(1, len(so) - 1)),
  }


def drop_advice(accounting: dict[str, Any], splitters: list[str], max_seq_length: int,
                min_document_sentences: int) -> str:
  """The setting that would keep the largest share of the dropped tokens."""
  dropped = accounting["tokens_dropped"]
  cause = max(dropped, key=lambda k: dropped[k])
  if cause == "skipped_documents":
    return (f"documents with fewer than data.min_document_sentences={min_document_sentences} "
            f"sentences are skipped: set data.min_document_sentences=1 to keep them")
  room = max_seq_length - 3
  mean = accounting["mean_sentence_tokens"]
  lines_too_long = cause == "one_sentence_documents" or mean > room / 2
  if "lines" in splitters and lines_too_long:
    return (f"lines are read as sentences (data.sentence_splitter='lines') but average "
            f"{mean:.0f} tokens, against {room} per example: set data.sentence_splitter=auto "
            f"(or blingfire / regex) to split them into sentences")
  if cause == "one_sentence_documents":
    return (f"{accounting['one_sentence_documents']:,} documents are a single sentence "
            f"({accounting['one_sentence_document_tokens']:,} tokens) even after sentence "
            f"splitting: check that the text has sentence punctuation, or raise "
            f"data.max_seq_length (now {max_seq_length})")
  return (f"BERT's pairing cuts what a chunk of whole sentences overshoots the {room} tokens "
          f"of an example, and sentences here average {mean:.0f} tokens; pairs are re-drawn "
          f"every epoch with dynamic masking, so the cuts move, but each epoch misses this "
          f"share: raise data.max_seq_length (now {max_seq_length}) to keep more of it")


def drop_warning(accounting: dict[str, Any], splitters: list[str], max_seq_length: int,
                 min_document_sentences: int, what: str = "the corpus",
                 expected_fraction: float = 0.0) -> str | None:
  """A loud warning when more of the tokens are lost than both DROP_WARNING_FRACTION and the
  config's `expected_fraction` (data.expected_drop_fraction)."""
  fraction = accounting["dropped_fraction"]
  if fraction <= max(DROP_WARNING_FRACTION, expected_fraction):
    return None
  read = accounting["tokens_read"]
  parts = ", ".join(f"{k.replace('_', ' ')} {v:,} ({v / read:.1%})"
                    for k, v in accounting["tokens_dropped"].items() if v)
  expected = (f", more than the {expected_fraction:.1%} this config expects"
              if expected_fraction > DROP_WARNING_FRACTION else "")
  declare = math.ceil(fraction * 100) / 100  # the field must stay below 1
  intended = (f" If this loss is intended, set data.expected_drop_fraction={declare:.2f}."
              if declare < 1 else "")
  return (f"DATA WARNING: {fraction:.1%} of {what}'s {read:,} tokens reach no "
          f"example ({parts}{expected}); {accounting['examples']:,} examples = "
          f"{accounting['examples_per_million_tokens']:,.0f} per million tokens. "
          f"{drop_advice(accounting, splitters, max_seq_length, min_document_sentences)}."
          f"{intended}")


def warn_once(log: logging.Logger, message: str | None, corpus_key: Hashable) -> None:
  """Log `message` unless this process has already warned about `corpus_key` (the text read
  and the settings that decide what is dropped)."""
  if message and corpus_key not in _warned:
    _warned.add(corpus_key)
    log.warning("%s", message)
