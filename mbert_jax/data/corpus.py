"""Tokenized corpus: sentences of token ids, cached on disk and memory-mapped.

Tokenization runs over contiguous ranges of the raw documents, in `num_proc` spawned worker
processes (never forked: the caller may be a trainer that has started JAX, whose threads make
fork unsafe) or in this process for small corpora. Each range becomes an Arrow shard; the
shards are then laid out, in order, as three flat .npy files for O(1) random access:

  tokens.npy              every kept sentence's ids back to back (uint16 when the vocab fits)
  sentence_offsets.npy    int64 [num_sentences + 1]: sentence s = tokens[off[s]:off[s+1]]
  document_offsets.npy    int64 [num_documents + 1]: document d = sentences doc[d]..doc[d+1]-1

A sentence never spans documents and a document's sentences are contiguous, so any run of
consecutive sentences of one document (a BERT segment) is one slice of tokens.npy. Memory stays
bounded whatever the corpus size: workers hold one batch of documents, the arrays are written
through memory maps, and the shards are deleted once the arrays are complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import multiprocessing
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets.arrow_writer import ArrowWriter
from tokenizers import Tokenizer, models

from mbert_jax.data.text import sentences_of

log = logging.getLogger(__name__)

TOKENIZED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "sentence_lengths": datasets.List(datasets.Value("int32")),
    "n_tokens": datasets.Value("int64"),  # tokens read, also for documents skipped after reading
    "n_unk": datasets.Value("int64"),
    "skip": datasets.Value("string"),
    "flags": datasets.List(datasets.Value("string")),
    # Per token: whether it starts a word of the tokenizer's pre-tokenizer (BPE tokenizers'
    # whole-word masking; empty for WordPiece, whose `##` pieces say it).
    "word_starts": datasets.List(datasets.Value("bool")),
})
ARRAY_FILES = ("tokens.npy", "sentence_offsets.npy", "document_offsets.npy")
WORD_STARTS_FILE = "word_starts.npy"
BATCH_DOCUMENTS = 256
# Below this many documents one process beats starting workers (each imports datasets and
# tokenizers, about a second).
PARALLEL_MIN_DOCUMENTS = 2048
MAX_RANGE_DOCUMENTS = 20_000


def tokenize_documents(batch: dict[str, list], tokenizer: Tokenizer, unk_id: int,
                       min_sentences: int) -> dict[str, list]:
  """Documents -> sentences -> WordPiece ids, with a skip reason and the tokens read."""
  plans, sentences = [], []
  for text, splitter, skip in zip(batch["text"], batch["splitter"], batch["skip"]):
    if skip:
      plans.append((skip, 0, 0))
    elif not text.strip():
      plans.append(("empty", 0, 0))
    else:
      sents = sentences_of(text, splitter)
      plans.append(("", len(sentences), len(sents)))
      sentences.extend(sents)
  # One call for the whole batch: the Rust side parallelises across sentences.
  encodings = tokenizer.encode_batch(sentences, add_special_tokens=False) if sentences else []
  boundaries = not isinstance(tokenizer.model, models.WordPiece)
  out: dict[str, list] = {k: [] for k in TOKENIZED_FEATURES}
  for (skip, start, count), flags in zip(plans, batch["flags"]):
    kept = [e for e in encodings[start:start + count] if e.ids]  # e.g. only control characters
    ids_per_sentence = [e.ids for e in kept]
    flags = list(flags)
    read = sum(len(ids) for ids in ids_per_sentence)
    if not skip:
      if not ids_per_sentence:
        skip = "no_tokens"
      elif len(ids_per_sentence) < min_sentences:
        skip = "too_few_sentences"
      elif len(ids_per_sentence) == 1:
        flags.append("one_sentence")
    if skip:
      ids_per_sentence, kept = [], []
    flat = [i for ids in ids_per_sentence for i in ids]
    out["word_starts"].append([w is None or j == 0 or w != e.word_ids[j - 1]
                               for e in kept for j, w in enumerate(e.word_ids)]
                              if boundaries else [])
    out["input_ids"].append(flat)
    out["sentence_lengths"].append([len(ids) for ids in ids_per_sentence])
    out["n_tokens"].append(read)
    out["n_unk"].append(sum(1 for i in flat if i == unk_id))
    out["skip"].append(skip)
    out["flags"].append(flags)
  return out


def tokenize_range(raw: datasets.Dataset, rows: np.ndarray, tokenizer: Tokenizer, unk_id: int,
                   min_sentences: int, path: str) -> int:
  """Tokenize raw documents `rows` (in that order) into the Arrow shard `path`."""
  part = raw.select(rows) if len(rows) else raw.select([])
  with ArrowWriter(features=TOKENIZED_FEATURES, path=path) as writer:
    for batch in part.iter(batch_size=BATCH_DOCUMENTS):
      writer.write_batch(tokenize_documents(batch, tokenizer, unk_id, min_sentences))
    writer.finalize()
  return len(rows)


# ----------------------------------------------------------------------------- worker processes
_WORKER: dict[str, Any] = {}


def _open_raw(files: list[str]) -> datasets.Dataset:
  parts = [datasets.Dataset.from_file(f) for f in files]
  return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _init_worker(raw_files: list[str], tokenizer_json: str) -> None:
  # One Rust thread per worker: the workers already use every core they were given.
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  datasets.disable_progress_bars()
  _WORKER["raw"] = _open_raw(raw_files)
  _WORKER["tokenizer"] = Tokenizer.from_str(tokenizer_json)


def _worker_tokenize(rows: np.ndarray, unk_id: int, min_sentences: int, path: str) -> int:
  return tokenize_range(_WORKER["raw"], rows, _WORKER["tokenizer"], unk_id, min_sentences, path)


def raw_files(raw: datasets.Dataset) -> list[str] | None:
  """The Arrow files holding `raw`'s rows in order, or None (in memory, or an indices map)."""
  files = [f["filename"] for f in raw.cache_files]
  if not files or raw._indices is not None:  # noqa: SLF001 (a selected view is not its files)
    return None
  return files


def row_ranges(num_rows: int, num_proc: int) -> list[tuple[int, int]]:
  """Contiguous ranges of about 8 per worker (balance), capped so each stays small."""
  size = max(BATCH_DOCUMENTS, min(MAX_RANGE_DOCUMENTS, -(-num_rows // (8 * max(1, num_proc)))))
  return [(lo, min(lo + size, num_rows)) for lo in range(0, num_rows, size)] or [(0, 0)]


def tokenize_shards(raw: datasets.Dataset, rows: np.ndarray, tokenizer: Tokenizer, unk_id: int,
                    min_sentences: int, num_proc: int, directory: str) -> list[str]:
  """Tokenize raw documents `rows` into ordered Arrow shards in `directory`."""
  ranges = row_ranges(len(rows), num_proc)
  paths = [os.path.join(directory, f"tokenized-{k:05d}.arrow") for k in range(len(ranges))]
  files = raw_files(raw)
  parallel = (num_proc > 1 and len(ranges) > 1 and files is not None
              and len(rows) >= PARALLEL_MIN_DOCUMENTS)
  if not parallel:
    for (lo, hi), path in zip(ranges, paths):
      tokenize_range(raw, rows[lo:hi], tokenizer, unk_id, min_sentences, path)
    return paths
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
      min(num_proc, len(ranges)), mp_context=ctx, initializer=_init_worker,
      initargs=(files, tokenizer.to_str())) as pool:
    futures = [pool.submit(_worker_tokenize, rows[lo:hi], unk_id, min_sentences, path)
               for (lo, hi), path in zip(ranges, paths)]
    for f in futures:
      f.result()
  return paths


# ----------------------------------------------------------------------------- arrays and stats
@dataclass
class CorpusArrays:
  """A tokenized corpus on disk, memory-mapped (shared by every reader of the page cache)."""
  directory: str
  tokens: np.ndarray
  sentence_offsets: np.ndarray
  document_offsets: np.ndarray
  stats: dict[str, Any]
  word_starts: np.ndarray | None = None  # bool per token (BPE tokenizers), else None

  @classmethod
  def load(cls, directory: str) -> "CorpusArrays":
    # Plain ndarray views of the maps: numpy's memmap subclass adds ~10 us to every slice.
    arrays = [np.asarray(np.load(os.path.join(directory, f), mmap_mode="r")) for f in ARRAY_FILES]
    with open(os.path.join(directory, "stats.json")) as f:
      stats = json.load(f)
    starts = os.path.join(directory, WORD_STARTS_FILE)
    word_starts = np.asarray(np.load(starts, mmap_mode="r")) if os.path.isfile(starts) else None
    return cls(directory, *arrays, stats=stats, word_starts=word_starts)

  @property
  def num_documents(self) -> int:
    return len(self.document_offsets) - 1

  @property
  def num_sentences(self) -> int:
    return len(self.sentence_offsets) - 1

  def document_token_counts(self) -> np.ndarray:
    so, do = self.sentence_offsets, self.document_offsets
    return np.asarray(so[do[1:]] - so[do[:-1]])

  def document_sentence_counts(self) -> np.ndarray:
    return np.diff(np.asarray(self.document_offsets))


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _iter_tables(paths: list[str], columns: list[str]) -> Iterator[Any]:
  for path in paths:
    ds = datasets.Dataset.from_file(path).select_columns(columns).with_format("arrow")
    for batch in ds.iter(batch_size=10_000):
      yield batch


def corpus_stats(paths: list[str]) -> dict[str, Any]:
  """Document, sentence and token counts of tokenized shards, skips and flags by reason."""
  skips: collections.Counter = collections.Counter()
  skipped_tokens: collections.Counter = collections.Counter()
  flags: collections.Counter = collections.Counter()
  docs = kept_docs = sentences = tokens = read = unk = 0
  for t in _iter_tables(paths, ["skip", "flags", "n_tokens", "n_unk", "sentence_lengths"]):
    skip = t["skip"].to_numpy(zero_copy_only=False)
    kept = skip == ""
    n_tokens = t["n_tokens"].to_numpy()
    docs += len(skip)
    kept_docs += int(kept.sum())
    read += int(n_tokens.sum())
    tokens += int(n_tokens[kept].sum())
    unk += int(t["n_unk"].to_numpy()[kept].sum())
    lengths = pc.list_value_length(t["sentence_lengths"]).to_numpy(zero_copy_only=False)
    sentences += int(lengths[kept].sum())
    for reason, n in zip(skip[~kept].tolist(), n_tokens[~kept].tolist()):
      skips[reason] += 1
      skipped_tokens[reason] += n
    flags.update(pc.list_flatten(t["flags"]).to_pylist())
  return {
      "raw_documents": docs,
      "documents": kept_docs,
      "skipped_documents": dict(sorted(skips.items())),
      "flagged_documents": dict(sorted(flags.items())),
      "sentences": sentences,
      "tokens": tokens,
      "tokens_read": read,
      # Tokens of documents dropped whole after tokenization (e.g. too_few_sentences); other
      # skips (binary, invalid JSON, ...) never reach the tokenizer and count 0.
      "skipped_tokens": {k: v for k, v in sorted(skipped_tokens.items()) if v},
      "unk_rate": unk / tokens if tokens else 0.0,
  }


def _write_flat_arrays(paths: list[str], directory: str, stats: dict[str, Any],
                       dtype: np.dtype, word_boundaries: bool = False) -> None:
  def array(name: str, dt, n: int) -> np.ndarray:
    return np.lib.format.open_memmap(os.path.join(directory, name), mode="w+", dtype=dt,
                                     shape=(n,))
  tokens = array("tokens.npy", dtype, stats["tokens"])
  sentence_offsets = array("sentence_offsets.npy", np.int64, stats["sentences"] + 1)
  document_offsets = array("document_offsets.npy", np.int64, stats["documents"] + 1)
  sentence_offsets[0] = document_offsets[0] = 0
  word_starts = array(WORD_STARTS_FILE, np.bool_, stats["tokens"]) if word_boundaries else None
  t = s = d = 0
  for batch in _iter_tables(paths, ["skip", "input_ids", "sentence_lengths", "word_starts"]):
    batch = batch.filter(pc.equal(batch["skip"], ""))
    ids = pc.list_flatten(batch["input_ids"]).to_numpy()
    if word_starts is not None:
      word_starts[t:t + len(ids)] = pc.list_flatten(batch["word_starts"]).to_numpy(
          zero_copy_only=False)
    lengths = pc.list_flatten(batch["sentence_lengths"]).to_numpy()
    per_doc = pc.list_value_length(batch["sentence_lengths"]).to_numpy(zero_copy_only=False)
    tokens[t:t + len(ids)] = ids
    sentence_offsets[s + 1:s + 1 + len(lengths)] = t + np.cumsum(lengths)
    document_offsets[d + 1:d + 1 + len(per_doc)] = s + np.cumsum(per_doc)
    t, s, d = t + len(ids), s + len(lengths), d + len(per_doc)
  for a in (tokens, sentence_offsets, document_offsets, word_starts):
    if a is not None:
      a.flush()


def log_preprocessing_report(name: str, stats: dict[str, Any]) -> None:
  log.info("%s: %d of %d documents kept, %d sentences, %d tokens of %d read (unk rate %.4f)",
           name, stats["documents"], stats["raw_documents"], stats["sentences"],
           stats["tokens"], stats["tokens_read"], stats["unk_rate"])
  if stats["skipped_documents"]:
    log.warning("%s: skipped documents by reason: %s", name, stats["skipped_documents"])
  if stats["flagged_documents"]:
    log.info("%s: repaired or notable documents: %s", name, stats["flagged_documents"])


def build_corpus(directory: str, raw: datasets.Dataset, rows: np.ndarray, tokenizer: Tokenizer,
                 unk_id: int, min_sentences: int, num_proc: int, key_material: dict[str, Any],
                 extra_stats: dict[str, Any] | None = None) -> CorpusArrays:
  """Tokenize raw documents `rows` into `directory` (written under a temporary name, renamed
  when complete, so a crash or a concurrent builder never leaves a half-written corpus)."""
  tmp = f"{directory}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    shards = tokenize_shards(raw, np.asarray(rows, dtype=np.int64), tokenizer, unk_id,
                             min_sentences, num_proc, tmp)
    stats = {**corpus_stats(shards), **(extra_stats or {})}
    log_preprocessing_report(os.path.basename(directory), stats)
    if stats["documents"] == 0:
      raise ValueError(f"empty corpus: no usable document among {stats['raw_documents']} "
                       f"(skipped by reason: {stats['skipped_documents']})")
    _write_flat_arrays(shards, tmp, stats,
                       token_dtype(tokenizer.get_vocab_size(with_added_tokens=True)),
                       word_boundaries=not isinstance(tokenizer.model, models.WordPiece))
    for path in shards:  # the flat arrays hold everything training reads
      os.remove(path)
    with open(os.path.join(tmp, "stats.json"), "w") as f:
      json.dump(stats, f, indent=2)
    with open(os.path.join(tmp, "key.json"), "w") as f:
      json.dump(key_material, f, indent=2, default=str)
    try:
      os.rename(tmp, directory)
    except OSError:
      if not os.path.isdir(directory):  # someone else finishing first is fine
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return CorpusArrays.load(directory)
