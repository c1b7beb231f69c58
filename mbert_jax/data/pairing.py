"""Segment A/B pairing exactly as BERT's `create_instances_from_document`, as an index table.

An instance is five int64 numbers: token ranges [a_start, a_end) and [b_start, b_end) into the
corpus' flat token array, and is_random_next. Building the table is one pass over sentence
lengths per pairing round; batches then read instances by random access, and masking happens
later, per example, on the fly.

Faithful to BERT, including its quirks:
* the target length is drawn once per document (short_seq_prob -> uniform in [2, max]),
* a chunk closes at the document end or when it reaches the target length,
* A takes a random number of the chunk's sentences; B continues with the rest, or (always for
  one-sentence chunks, else with probability 1/2) comes from a random other document (10 draws
  to avoid the same one) starting at a random sentence, and the chunk's unused sentences are
  put back,
* truncate_seq_pair removes tokens from the longer segment, front or back with probability 1/2.
  BERT flips a coin per removed token; here the number of front removals is drawn as the
  binomial those flips add up to (same distribution, O(1) instead of O(excess)).

Randomness: documents are cut into fixed shards with one Philox stream each (seeded by
(seed, round, shard)), so the table does not depend on how many processes build it.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

import numpy as np

PAIRING_STREAM = 2  # SeedSequence tag separating pairing randomness from masking and order
SHARD_DOCUMENTS = 4096
PARALLEL_MIN_SENTENCES = 1_000_000
INSTANCE_COLUMNS = ("a_start", "a_end", "b_start", "b_end", "is_random_next")


class _Uniforms:
  """Python-speed access to a numpy Philox stream: uniforms drawn in blocks."""

  def __init__(self, rng: np.random.Generator, block: int = 4096):
    self._rng, self._block = rng, block
    self._buf: list[float] = []
    self._pos = 0

  def random(self) -> float:
    if self._pos == len(self._buf):
      self._buf, self._pos = self._rng.random(self._block).tolist(), 0
    self._pos += 1
    return self._buf[self._pos - 1]

  def integers(self, low: int, high: int) -> int:
    """Uniform integer in [low, high)."""
    return low + min(int(self.random() * (high - low)), high - low - 1)

  def binomial_half(self, n: int) -> int:
    return int(self._rng.binomial(n, 0.5)) if n > 0 else 0


def truncation_counts(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
  """How many tokens BERT's truncate_seq_pair removes from A and from B.

  It always trims the longer segment (B on ties): first the longer down to the shorter's
  length, then alternately B, A, B, ...
  """
  excess = len_a + len_b - max_tokens
  if excess <= 0:
    return 0, 0
  cut_a = cut_b = 0
  gap = abs(len_a - len_b)
  first = min(excess, gap)
  if len_a > len_b:
    cut_a += first
  else:
    cut_b += first
  excess -= first
  cut_b += (excess + 1) // 2
  cut_a += excess // 2
  return cut_a, cut_b


def shard_rng(seed: int, pairing_round: int, shard: int) -> np.random.Generator:
  return np.random.Generator(np.random.Philox(
      np.random.SeedSequence([seed, PAIRING_STREAM, pairing_round, shard])))


def shard_instances(sentence_offsets: np.ndarray, document_offsets: np.ndarray, doc_lo: int,
                    doc_hi: int, max_seq_length: int, short_seq_prob: float,
                    rng: np.random.Generator) -> np.ndarray:
  """Instances of documents [doc_lo, doc_hi); random B segments may come from any document."""
  so = np.asarray(sentence_offsets)
  do = np.asarray(document_offsets)
  num_docs = len(do) - 1
  max_num_tokens = max_seq_length - 3  # [CLS] A [SEP] B [SEP]
  u = _Uniforms(rng)
  out: list[tuple[int, int, int, int, int]] = []
  for d in range(doc_lo, doc_hi):
    s0, s1 = int(do[d]), int(do[d + 1])
    sent = so[s0:s1 + 1].tolist()  # token offsets of this document's sentence boundaries
    target = max_num_tokens
    if u.random() < short_seq_prob:
      target = u.integers(2, max_num_tokens + 1)
    chunk_start, current_length, i = 0, 0, 0
    n = s1 - s0
    while i < n:
      current_length += sent[i + 1] - sent[i]
      if i == n - 1 or current_length >= target:
        chunk_end = i + 1
        chunk_len = chunk_end - chunk_start
        a_end = chunk_start + (u.integers(1, chunk_len) if chunk_len >= 2 else 1)
        a_lo, a_hi = sent[chunk_start], sent[a_end]
        if chunk_len == 1 or u.random() < 0.5:
          is_random = 1
          target_b = target - (a_hi - a_lo)
          other = d
          for _ in range(10):
            other = u.integers(0, num_docs)
            if other != d:
              break
          r0, r1 = int(do[other]), int(do[other + 1])
          j = u.integers(r0, r1)
          b_lo = int(so[j])
          j += 1
          while j < r1 and int(so[j]) - b_lo < target_b:
            j += 1
          b_hi = int(so[j])
          i -= chunk_end - a_end  # put the unused sentences back
        else:
          is_random = 0
          b_lo, b_hi = a_hi, sent[chunk_end]
        cut_a, cut_b = truncation_counts(a_hi - a_lo, b_hi - b_lo, max_num_tokens)
        front_a, front_b = u.binomial_half(cut_a), u.binomial_half(cut_b)
        out.append((a_lo + front_a, a_hi - (cut_a - front_a),
                    b_lo + front_b, b_hi - (cut_b - front_b), is_random))
        chunk_start, current_length = i + 1, 0
      i += 1
  return np.asarray(out, dtype=np.int64).reshape(-1, len(INSTANCE_COLUMNS))


def shard_single_segments(sentence_offsets: np.ndarray, document_offsets: np.ndarray,
                          doc_lo: int, doc_hi: int, max_seq_length: int, short_seq_prob: float,
                          rng: np.random.Generator) -> np.ndarray:
  """Instances without a B segment ([CLS] A [SEP], for models trained without NSP): each
  document's sentences are packed into chunks up to the target length (drawn as BERT draws
  it), a chunk too long trimmed front and back like a pair's longer segment. B is empty
  (b_start = b_end = a_end) and is_random_next 0."""
  so = np.asarray(sentence_offsets)
  do = np.asarray(document_offsets)
  max_num_tokens = max_seq_length - 2  # [CLS] A [SEP]
  u = _Uniforms(rng)
  out: list[tuple[int, int, int, int, int]] = []
  for d in range(doc_lo, doc_hi):
    s0, s1 = int(do[d]), int(do[d + 1])
    target = max_num_tokens
    if u.random() < short_seq_prob:
      target = u.integers(2, max_num_tokens + 1)
    start = s0
    for i in range(s0, s1):
      if i == s1 - 1 or int(so[i + 1]) - int(so[start]) >= target:
        lo, hi = int(so[start]), int(so[i + 1])
        cut = max(0, hi - lo - max_num_tokens)
        front = u.binomial_half(cut)
        lo, hi = lo + front, hi - (cut - front)
        out.append((lo, hi, hi, hi, 0))
        start = i + 1
  return np.asarray(out, dtype=np.int64).reshape(-1, len(INSTANCE_COLUMNS))


def _shard_from_files(directory: str, doc_lo: int, doc_hi: int, max_seq_length: int,
                      short_seq_prob: float, seed: int, pairing_round: int, shard: int,
                      next_sentence: bool = True) -> np.ndarray:
  so = np.load(os.path.join(directory, "sentence_offsets.npy"), mmap_mode="r")
  do = np.load(os.path.join(directory, "document_offsets.npy"), mmap_mode="r")
  build = shard_instances if next_sentence else shard_single_segments
  return build(so, do, doc_lo, doc_hi, max_seq_length, short_seq_prob,
               shard_rng(seed, pairing_round, shard))


def build_instances(sentence_offsets: np.ndarray, document_offsets: np.ndarray,
                    max_seq_length: int, short_seq_prob: float, seed: int, pairing_round: int,
                    num_proc: int = 1, directory: str | None = None,
                    parallel_min_sentences: int | None = None,
                    next_sentence: bool = True) -> np.ndarray:
  """The instance table [N, 5] of one pairing round over the whole corpus (`next_sentence`
  False: single segments, `shard_single_segments`).

  Large corpora (>= parallel_min_sentences sentences, arrays on disk in `directory`) are
  paired by `num_proc` spawned processes; the result is identical to the sequential one.
  """
  num_docs = len(document_offsets) - 1
  if num_docs < 1:
    raise ValueError("cannot pair segments of an empty corpus")
  if parallel_min_sentences is None:
    parallel_min_sentences = PARALLEL_MIN_SENTENCES
  shards = [(lo, min(lo + SHARD_DOCUMENTS, num_docs))
            for lo in range(0, num_docs, SHARD_DOCUMENTS)]
  parallel = (num_proc > 1 and len(shards) > 1 and directory is not None
              and len(sentence_offsets) - 1 >= parallel_min_sentences)
  if not parallel:
    build = shard_instances if next_sentence else shard_single_segments
    parts = [build(sentence_offsets, document_offsets, lo, hi, max_seq_length,
                   short_seq_prob, shard_rng(seed, pairing_round, k))
             for k, (lo, hi) in enumerate(shards)]
  else:
    # spawn, not fork: the caller may be a JAX trainer whose threads make fork unsafe.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(num_proc, len(shards)), mp_context=ctx) as ex:
      futures = [ex.submit(_shard_from_files, directory, lo, hi, max_seq_length, short_seq_prob,
                           seed, pairing_round, k, next_sentence)
                 for k, (lo, hi) in enumerate(shards)]
      parts = [f.result() for f in futures]
  return np.concatenate(parts, axis=0)
