"""Tokenized corpus: sentences of token ids, cached on disk and memory-mapped.

Tokenization runs as a `datasets.map` over the raw documents (several processes). Its Arrow
output stays in the cache as the per-document record; for O(1) random access the ids are also
laid out flat in three .npy files:

  tokens.npy              every kept sentence's ids back to back (uint16 when the vocab fits)
  sentence_offsets.npy    int64 [num_sentences + 1]: sentence s = tokens[off[s]:off[s+1]]
  document_offsets.npy    int64 [num_documents + 1]: document d = sentences doc[d]..doc[d+1]-1

A sentence never spans documents and a document's sentences are contiguous, so any run of
consecutive sentences of one document (a BERT segment) is one slice of tokens.npy.
"""

from __future__ import annotations

import collections
import glob as globlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from tokenizers import Tokenizer

from mbert_jax.data.text import sentences_of

log = logging.getLogger(__name__)

TOKENIZED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "sentence_lengths": datasets.List(datasets.Value("int32")),
    "n_tokens": datasets.Value("int64"),
    "n_unk": datasets.Value("int64"),
    "skip": datasets.Value("string"),
    "flags": datasets.List(datasets.Value("string")),
})
ARRAY_FILES = ("tokens.npy", "sentence_offsets.npy", "document_offsets.npy")


def tokenize_documents(batch: dict[str, list], tokenizer: Tokenizer, unk_id: int,
                       min_sentences: int) -> dict[str, list]:
  """datasets.map function: documents -> sentences -> WordPiece ids, with a skip reason."""
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
  out: dict[str, list] = {k: [] for k in TOKENIZED_FEATURES}
  for (skip, start, count), flags in zip(plans, batch["flags"]):
    ids_per_sentence = [e.ids for e in encodings[start:start + count]]
    ids_per_sentence = [ids for ids in ids_per_sentence if ids]  # e.g. only control characters
    flags = list(flags)
    if not skip:
      if not ids_per_sentence:
        skip = "no_tokens"
      elif len(ids_per_sentence) < min_sentences:
        skip = "too_few_sentences"
      elif len(ids_per_sentence) == 1:
        flags.append("one_sentence")
    if skip:
      ids_per_sentence = []
    flat = [i for ids in ids_per_sentence for i in ids]
    out["input_ids"].append(flat)
    out["sentence_lengths"].append([len(ids) for ids in ids_per_sentence])
    out["n_tokens"].append(len(flat))
    out["n_unk"].append(sum(1 for i in flat if i == unk_id))
    out["skip"].append(skip)
    out["flags"].append(flags)
  return out


@dataclass
class CorpusArrays:
  """A tokenized corpus on disk, memory-mapped (shared by every reader of the page cache)."""
  directory: str
  tokens: np.ndarray
  sentence_offsets: np.ndarray
  document_offsets: np.ndarray
  stats: dict[str, Any]

  @classmethod
  def load(cls, directory: str) -> "CorpusArrays":
    # Plain ndarray views of the maps: numpy's memmap subclass adds ~10 us to every slice.
    arrays = [np.asarray(np.load(os.path.join(directory, f), mmap_mode="r")) for f in ARRAY_FILES]
    with open(os.path.join(directory, "stats.json")) as f:
      stats = json.load(f)
    return cls(directory, *arrays, stats=stats)

  @property
  def num_documents(self) -> int:
    return len(self.document_offsets) - 1

  @property
  def num_sentences(self) -> int:
    return len(self.sentence_offsets) - 1

  def document_token_counts(self) -> np.ndarray:
    so, do = self.sentence_offsets, self.document_offsets
    return np.asarray(so[do[1:]] - so[do[:-1]])

  def tokenized_documents(self) -> datasets.Dataset:
    """The per-document Arrow record (input_ids, sentence_lengths, skip, flags, ...)."""
    files = sorted(globlib.glob(os.path.join(self.directory, "tokenized*.arrow")))
    return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _count(values) -> dict[str, int]:
  return dict(sorted(collections.Counter(v for v in values if v).items()))


def corpus_stats(tokenized: datasets.Dataset) -> dict[str, Any]:
  table = tokenized.with_format("arrow")
  skips = table["skip"].to_pylist()
  flags = pc.list_flatten(table["flags"]).to_pylist()
  kept = np.array([s == "" for s in skips], dtype=bool)
  n_tokens = table["n_tokens"].to_numpy()
  n_sentences = pc.list_value_length(table["sentence_lengths"]).to_numpy(zero_copy_only=False)
  tokens = int(n_tokens[kept].sum())
  unk = int(table["n_unk"].to_numpy()[kept].sum())
  return {
      "raw_documents": len(skips),
      "documents": int(kept.sum()),
      "skipped_documents": _count(skips),
      "flagged_documents": _count(flags),
      "sentences": int(n_sentences[kept].sum()),
      "tokens": tokens,
      "unk_rate": unk / tokens if tokens else 0.0,
  }


def _write_flat_arrays(kept: datasets.Dataset, directory: str, stats: dict[str, Any],
                       dtype: np.dtype) -> None:
  tokens = np.lib.format.open_memmap(os.path.join(directory, "tokens.npy"), mode="w+",
                                     dtype=dtype, shape=(stats["tokens"],))
  sentence_offsets = np.zeros(stats["sentences"] + 1, dtype=np.int64)
  document_offsets = np.zeros(stats["documents"] + 1, dtype=np.int64)
  t = s = d = 0
  for batch in kept.with_format("arrow").iter(batch_size=10_000):
    ids = pc.list_flatten(batch["input_ids"]).to_numpy()
    lengths = pc.list_flatten(batch["sentence_lengths"]).to_numpy()
    per_doc = pc.list_value_length(batch["sentence_lengths"]).to_numpy(zero_copy_only=False)
    tokens[t:t + len(ids)] = ids
    sentence_offsets[s + 1:s + 1 + len(lengths)] = t + np.cumsum(lengths)
    document_offsets[d + 1:d + 1 + len(per_doc)] = s + np.cumsum(per_doc)
    t, s, d = t + len(ids), s + len(lengths), d + len(per_doc)
  tokens.flush()
  del tokens
  np.save(os.path.join(directory, "sentence_offsets.npy"), sentence_offsets)
  np.save(os.path.join(directory, "document_offsets.npy"), document_offsets)


def log_preprocessing_report(name: str, stats: dict[str, Any]) -> None:
  log.info("%s: %d of %d documents kept, %d sentences, %d tokens (unk rate %.4f)", name,
           stats["documents"], stats["raw_documents"], stats["sentences"], stats["tokens"],
           stats["unk_rate"])
  if stats["skipped_documents"]:
    log.warning("%s: skipped documents by reason: %s", name, stats["skipped_documents"])
  if stats["flagged_documents"]:
    log.info("%s: repaired or notable documents: %s", name, stats["flagged_documents"])


def build_corpus(directory: str, raw: datasets.Dataset, tokenizer: Tokenizer, unk_id: int,
                 min_sentences: int, num_proc: int, key_material: dict[str, Any]
                 ) -> CorpusArrays:
  """Tokenize `raw` into `directory` (written under a temporary name, renamed when complete,
  so a crash or a concurrent builder never leaves a half-written corpus behind)."""
  tmp = f"{directory}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    if num_proc > 1:
      # Worker processes tokenize with their own Rust thread pool; forking one that already
      # ran would trip tokenizers' fork-safety switch on every call.
      os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenized = raw.map(
        tokenize_documents, batched=True, batch_size=256, remove_columns=raw.column_names,
        features=TOKENIZED_FEATURES, num_proc=num_proc if num_proc > 1 and len(raw) > 1 else None,
        fn_kwargs=dict(tokenizer=tokenizer, unk_id=unk_id, min_sentences=min_sentences),
        cache_file_name=os.path.join(tmp, "tokenized.arrow"), desc="tokenizing")
    stats = corpus_stats(tokenized)
    log_preprocessing_report(os.path.basename(directory), stats)
    if stats["documents"] == 0:
      raise ValueError(f"empty corpus: no usable document among {stats['raw_documents']} "
                       f"(skipped by reason: {stats['skipped_documents']})")
    keep = np.flatnonzero(np.asarray(tokenized.with_format("arrow")["skip"].to_pylist()) == "")
    _write_flat_arrays(tokenized.select(keep, keep_in_memory=True), tmp, stats,
                       token_dtype(tokenizer.get_vocab_size(with_added_tokens=True)))
    with open(os.path.join(tmp, "stats.json"), "w") as f:
      json.dump(stats, f, indent=2)
    with open(os.path.join(tmp, "key.json"), "w") as f:
      json.dump(key_material, f, indent=2, default=str)
    del tokenized  # release the Arrow memory map before the directory moves
    try:
      os.rename(tmp, directory)
    except OSError:
      if not os.path.isdir(directory):  # someone else finishing first is fine
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return CorpusArrays.load(directory)
