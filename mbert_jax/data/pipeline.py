"""build_pipeline: sources -> tokenizer -> cached tokenized corpus -> step-indexed batches.

Global example g of the train stream lives in epoch e = g // N at position j = g % N, where N
(`num_examples`) is the instance count of pairing round 0. Epoch e reads pairing round r(e)
through a Feistel permutation keyed by (seed, e) and masks with the Philox stream of
(instance, masking round). Later rounds differ from N by a fraction of a percent; position j
wraps modulo the round's size, so a few instances of a smaller round appear twice and a few of
a larger one are skipped. Nothing here depends on earlier steps: the batch of step s is a pure
function of (config, s), resuming needs no replay, and every process computes exactly its rows.

Rounds: dynamic masking (default) re-pairs every epoch (or cycles `pairing_rounds` pairings)
and masks afresh every epoch; static masking cycles `dupe_factor` (pairing, masks) copies like
BERT's pre-generated data; eval is one fixed copy with its own seed.

Building never forks: tokenization and large pairings run in spawned processes, so a trainer
that has started JAX can build its data without risking a deadlock. What the build used is
reported (`stats["token_accounting"]`, the log, `inspect`, the cache's JSON files), and more
than 10% of the tokens reaching no example is warned about before training starts.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import datasets
import ml_collections
import numpy as np
from tokenizers import Tokenizer

from mbert_jax.data import accounting, bpe, pairing, permutation, sources as sources_lib
from mbert_jax.data import corpus as corpus_lib
from mbert_jax.data import tokenizer as tokenizer_lib
from mbert_jax.data.config import default_data_config, validate_data_config
from mbert_jax.data.masking import ExampleRandom, MaskingRules, mask_tokens

log = logging.getLogger(__name__)

# Bump when tokenization, corpus layout or pairing changes meaning: invalidates old caches.
CACHE_VERSION = 3  # 3: tokenizer.json files load without their own padding/truncation
SPLITS = ("train", "eval")
BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions",
              "masked_lm_ids", "masked_lm_weights", "next_sentence_labels")


def _digest(material: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]


def resolve_cache_dir(cfg, workdir: str | None) -> str:
  if str(cfg.cache_dir or "").strip():
    path = os.path.expanduser(str(cfg.cache_dir))
  elif workdir:
    path = os.path.join(os.path.expanduser(str(workdir)), "data_cache")
  else:
    raise ValueError("no place for the data cache: pass a workdir or set data.cache_dir")
  os.makedirs(path, exist_ok=True)
  return path


def reading_settings(cfg) -> dict[str, Any]:
  return {k: cfg[k] for k in ("text_field", "sentence_splitter", "document_grouping",
                              "max_line_chars", "max_document_chars")}


def _usable_texts(raw: datasets.Dataset, rows: np.ndarray) -> Iterator[str]:
  part = raw.select(rows) if len(rows) != len(raw) else raw
  for batch in part.select_columns(["text", "skip"]).iter(batch_size=1000):
    yield from (t for t, s in zip(batch["text"], batch["skip"]) if not s)


def _require_usable(raw: datasets.Dataset, rows: np.ndarray, what: str) -> None:
  skips = raw.with_format("arrow")["skip"].to_numpy(zero_copy_only=False)[rows]
  if not (skips == "").any():
    reasons = dict(collections.Counter(skips.tolist()))
    raise ValueError(f"empty corpus: {what} has no usable document (skipped by reason: {reasons})")


class _RawCorpus:
  """Raw documents of one source list, read once on first use, in a staging directory."""

  def __init__(self, srcs: list[sources_lib.Source], settings: dict[str, Any], staging: str,
               what: str, splitters: list[str]):
    self._sources, self._settings, self._staging, self._what = srcs, settings, staging, what
    self._splitters = splitters
    self._ds: datasets.Dataset | None = None

  def dataset(self) -> datasets.Dataset:
    if self._ds is None:
      self._ds = sources_lib.load_raw_documents(self._sources, self._settings,
                                                self._staging, self._splitters)
      _require_usable(self._ds, np.arange(len(self._ds)), self._what)
    return self._ds

  def split(self, split: str, eval_fraction: float | None) -> tuple[datasets.Dataset, np.ndarray]:
    """(all raw documents, rows of `split`)."""
    ds = self.dataset()
    if eval_fraction is None:
      return ds, np.arange(len(ds))
    rows = sources_lib.split_rows(ds, split, eval_fraction)
    _require_usable(ds, rows, f"the {split} part of {self._what}")
    return ds, rows


def _trained_tokenizer(cache_dir: str, size: int, key_material: dict[str, Any],
                       texts: Callable[[], Iterator[str]], bpe_layout: str | None = None
                       ) -> Tokenizer:
  """A WordPiece vocabulary (`train:<size>`), or with `bpe_layout` a byte-level BPE of that
  layout (`bpe:<layout>:<size>`), trained once on `texts` and cached."""
  if bpe_layout is not None:
    key_material = {**key_material, "trainer": bpe.TRAINER_VERSION, "layout": bpe_layout}
  directory = os.path.join(cache_dir, f"vocab-{_digest({**key_material, 'size': size})}")
  if os.path.isfile(os.path.join(directory, "tokenizer.json")):
    return tokenizer_lib.load_tokenizer(os.path.join(directory, "tokenizer.json"))
  log.info("training a %d-token %s vocabulary (cached in %s)", size,
           f"{bpe_layout} BPE" if bpe_layout else "WordPiece", directory)
  tok = (bpe.train_bpe(texts(), size, bpe_layout) if bpe_layout
         else tokenizer_lib.train_wordpiece(texts(), size))
  tmp = tempfile.mkdtemp(prefix=".vocab-", dir=cache_dir)
  tokenizer_lib.save_tokenizer(tok, tmp)
  try:
    os.rename(tmp, directory)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)  # a concurrent builder won; its vocab is identical
  return tok


def complete_data_config(data_cfg) -> ml_collections.ConfigDict:
  """A validated copy of `data_cfg` (ConfigDict or mapping) with defaults for absent fields."""
  given = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  cfg = default_data_config()
  unknown = sorted(set(given) - set(cfg.keys()))
  if unknown:
    log.warning("data config fields %s are not pipeline settings; ignored here", unknown)
  for key in set(given) & set(cfg.keys()):
    cfg[key] = given[key]
  validate_data_config(cfg)
  return cfg


def build_pipeline(data_cfg, workdir: str | None, split: str = "train") -> "Pipeline":
  """Build (or load from cache) the pretraining data of `split` ("train" or "eval")."""
  cfg = complete_data_config(data_cfg)
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  train_sources = sources_lib.parse_sources(cfg.source)
  eval_sources = sources_lib.parse_sources(cfg.eval_source) if str(cfg.eval_source).strip() else None
  if split == "eval" and eval_sources is None and float(cfg.eval_fraction) <= 0:
    raise ValueError("no eval data: set data.eval_source or a positive data.eval_fraction")
  for srcs in (train_sources, eval_sources or []):
    sources_lib.check_local_sources_not_empty(srcs)
    sources_lib.check_sources_are_text(srcs)
  vocab_size_to_train = tokenizer_lib.parse_trained_vocab_size(str(cfg.vocab))
  bpe_layout = None
  if bpe.parse_spec(str(cfg.vocab)) is not None:
    bpe_layout, vocab_size_to_train = bpe.parse_spec(str(cfg.vocab))
  tokenizer = None
  if vocab_size_to_train is None:
    tokenizer = tokenizer_lib.load_tokenizer(str(cfg.vocab))  # bad vocab: fail before caching
  cache_dir = resolve_cache_dir(cfg, workdir)

  reading = reading_settings(cfg)
  train_fps = [sources_lib.source_fingerprint(s) for s in train_sources]
  # Hold-out fraction applies only when eval documents come out of `source`.
  holdout = None if eval_sources is not None else float(cfg.eval_fraction)
  train_identity = {"sources": train_fps, "holdout": holdout, "reading": reading}

  staging = tempfile.mkdtemp(prefix=".staging-", dir=cache_dir)
  try:
    settings = {**reading, "arrow_cache_dir": os.path.join(staging, "arrow")}
    train_choices = sources_lib.resolve_splitters(train_sources, settings)
    train_raw = _RawCorpus(train_sources, settings, os.path.join(staging, "train"),
                           f"data.source={cfg.source!r}", [c["splitter"] for c in train_choices])
    if tokenizer is None:
      # The splitter does not change which words the vocabulary sees: not part of its key.
      tokenizer = _trained_tokenizer(
          cache_dir, vocab_size_to_train,
          {"version": CACHE_VERSION, "trainer": tokenizer_lib.TRAINER_VERSION, **train_identity},
          lambda: _usable_texts(*train_raw.split("train", holdout)), bpe_layout)
    if split == "train" or eval_sources is None:
      identity, raw, raw_holdout, choices = train_identity, train_raw, holdout, train_choices
    else:
      identity = {"sources": [sources_lib.source_fingerprint(s) for s in eval_sources],
                  "holdout": None, "reading": reading}
      choices = sources_lib.resolve_splitters(eval_sources, settings)
      raw = _RawCorpus(eval_sources, settings, os.path.join(staging, "eval"),
                       f"data.eval_source={cfg.eval_source!r}", [c["splitter"] for c in choices])
      raw_holdout = None
    # The resolved splitters are part of the key: installing blingfire changes what `auto` reads.
    key_material = {"version": CACHE_VERSION, "split": split, **identity,
                    "splitters": [c["splitter"] for c in choices],
                    "min_document_sentences": int(cfg.min_document_sentences),
                    "tokenizer": hashlib.sha256(tokenizer.to_str().encode()).hexdigest()}
    if not tokenizer_lib.is_wordpiece(tokenizer):
      key_material["word_starts"] = True  # corpora built before they were stored lack them
    directory = os.path.join(cache_dir, f"corpus-{split}-{_digest(key_material)}")
    if os.path.isfile(os.path.join(directory, "stats.json")):
      corpus = corpus_lib.CorpusArrays.load(directory)
      log.info("reusing tokenized %s corpus %s", split, directory)
    else:
      specials = tokenizer_lib.special_ids(tokenizer)
      raw_ds, rows = raw.split(split, raw_holdout)
      corpus = corpus_lib.build_corpus(
          directory, raw_ds, rows, tokenizer, specials["unk"], int(cfg.min_document_sentences),
          int(cfg.num_proc), key_material, {"sentence_splitters": choices})
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return Pipeline(cfg, split, tokenizer, corpus)


class Pipeline:
  """Step-indexed pretraining batches of one split. See the module docstring for the order.

  One object serves one thread at a time (it reuses a random generator and keeps the current
  pairing tables in memory); a prefetching thread should own its own object.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer,
               corpus: corpus_lib.CorpusArrays):
    self.config = cfg
    self.split = split
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.special_ids = tokenizer_lib.special_ids(tokenizer)
    self.max_seq_length = int(cfg.max_seq_length)
    self.max_predictions_per_seq = int(cfg.max_predictions_per_seq)
    # False: single-segment examples, no token types, next_sentence_labels all 0 (unused).
    self.next_sentence = bool(cfg.next_sentence)
    self._corpus = corpus
    is_eval = split == "eval"
    self.batch_size = int(cfg.eval_batch_size or cfg.batch_size) if is_eval else int(cfg.batch_size)
    self.seed = int(cfg.eval_seed if is_eval else cfg.seed)
    self.static_masking = is_eval or not cfg.dynamic_masking
    self._copies = 1 if is_eval else int(cfg.dupe_factor)
    maskable = np.ones(self.vocab_size, dtype=bool)
    for name in ("cls", "sep", "pad"):
      maskable[self.special_ids[name]] = False
    self._rules = MaskingRules(
        max_predictions=self.max_predictions_per_seq, masked_lm_prob=float(cfg.masked_lm_prob),
        whole_word=bool(cfg.whole_word_mask), mask_id=self.special_ids["mask"],
        maskable=maskable, is_continuation=tokenizer_lib.continuation_mask(tokenizer),
        replacement_ids=tokenizer_lib.replacement_ids(tokenizer))
    self._random = ExampleRandom(self.seed)
    self._tables: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    first = self.instances(0)
    if len(first) == 0:
      raise ValueError(f"the {split} corpus yields no training example")
    self.num_examples = len(first)
    self.stats = self._summary(first)
    log.info("%s pipeline: %s", split, json.dumps(self.stats))
    self._warn_about_drops()

  @property
  def corpus(self) -> corpus_lib.CorpusArrays:
    """The memory-mapped tokenized corpus (tokens, sentence and document offsets)."""
    return self._corpus

  @property
  def masking_rules(self) -> MaskingRules:
    return self._rules

  # ------------------------------------------------------------------ instances
  def _pairing_file(self, pairing_round: int) -> str:
    key = _digest({"version": CACHE_VERSION, "seed": self.seed, "round": pairing_round,
                   "max_seq_length": self.max_seq_length,
                   "short_seq_prob": float(self.config.short_seq_prob),
                   "shard_documents": pairing.SHARD_DOCUMENTS,
                   **({} if self.next_sentence else {"next_sentence": False})})
    return os.path.join(self._corpus.directory, f"pairs-{key}.npy")

  def instances(self, pairing_round: int) -> np.ndarray:
    """The [N, 5] instance table of a pairing round (memory, then disk cache, then built)."""
    if pairing_round in self._tables:
      self._tables.move_to_end(pairing_round)
      return self._tables[pairing_round]
    path = self._pairing_file(pairing_round)
    if os.path.isfile(path):
      table = np.asarray(np.load(path, mmap_mode="r"))
    else:
      table = pairing.build_instances(
          self._corpus.sentence_offsets, self._corpus.document_offsets, self.max_seq_length,
          float(self.config.short_seq_prob), self.seed, pairing_round,
          num_proc=int(self.config.num_proc), directory=self._corpus.directory,
          next_sentence=self.next_sentence)
      tmp = f"{path}.tmp-{os.getpid()}.npy"
      np.save(tmp, table)
      os.replace(tmp, path)  # atomic: concurrent processes write identical tables
    self._tables[pairing_round] = table
    while len(self._tables) > 2:  # the current epoch's round and the next one
      self._tables.popitem(last=False)
    return table

  def _rounds(self, epoch: int) -> tuple[int, int]:
    """(pairing round, masking round) of an epoch."""
    if self.static_masking:
      copy = epoch % self._copies
      return copy, copy
    k = int(self.config.pairing_rounds)
    return (epoch % k if k else epoch), epoch

  def locate(self, global_indices) -> list[tuple[int, int, int]]:
    """(pairing round, instance index, masking round) of global example indices."""
    g = np.asarray(global_indices, dtype=np.int64)
    # Eval cycles over one fixed copy; train moves to a new epoch every num_examples.
    epochs = np.zeros_like(g) if self.split == "eval" else g // self.num_examples
    positions = g % self.num_examples
    out: list[tuple[int, int, int]] = [(0, 0, 0)] * len(g)
    for epoch in np.unique(epochs).tolist():
      rows = np.flatnonzero(epochs == epoch)
      pairing_round, masking_round = self._rounds(epoch)
      n = len(self.instances(pairing_round))
      idx = permutation.permute(positions[rows] % n, n, permutation.permutation_keys(self.seed, epoch))
      for r, i in zip(rows.tolist(), idx.tolist()):
        out[r] = (pairing_round, i, masking_round)
    return out

  # ------------------------------------------------------------------ examples and batches
  def example(self, pairing_round: int, index: int, masking_round: int) -> dict[str, Any]:
    """One unpadded example: real tokens, masked ids, positions, labels, segment A length."""
    a0, a1, b0, b1, is_random = self.instances(pairing_round)[index].tolist()
    tok = self._corpus.tokens
    cls, sep = self.special_ids["cls"], self.special_ids["sep"]
    pair = b1 > b0 or self.next_sentence
    parts = [[cls], tok[a0:a1], [sep]] + ([tok[b0:b1], [sep]] if pair else [])
    tokens = np.concatenate(parts).astype(np.int32)
    continues = None
    starts = self._corpus.word_starts
    if starts is not None:
      no = np.zeros(1, bool)
      pieces = [no, ~starts[a0:a1], no] + ([~starts[b0:b1], no] if pair else [])
      continues = np.concatenate(pieces)
    masked, positions, labels = mask_tokens(tokens, self._rules,
                                            self._random.for_example(index, masking_round),
                                            continues)
    return {"tokens": tokens, "input_ids": masked, "positions": positions, "labels": labels,
            "len_a": a1 - a0, "is_random_next": is_random}

  def example_at(self, global_index: int) -> dict[str, Any]:
    return self.example(*self.locate([global_index])[0])

  def batch_at(self, step: int, process_index: int = 0, process_count: int = 1
               ) -> dict[str, np.ndarray]:
    """This process' rows [pi*B/pc, (pi+1)*B/pc) of the global batch of `step`."""
    step, process_index, process_count = int(step), int(process_index), int(process_count)
    if step < 0:
      raise ValueError(f"step={step}: steps start at 0")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
    if self.batch_size % process_count:
      raise ValueError(f"global batch size {self.batch_size} is not divisible by "
                       f"process_count={process_count}")
    rows = self.batch_size // process_count
    first = step * self.batch_size + process_index * rows
    return self._assemble(self.locate(np.arange(first, first + rows)))

  def _assemble(self, located: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
    n, T, P = len(located), self.max_seq_length, self.max_predictions_per_seq
    batch = {
        "input_ids": np.full((n, T), self.special_ids["pad"], dtype=np.int32),
        "token_type_ids": np.zeros((n, T), dtype=np.int32),
        "attention_mask": np.zeros((n, T), dtype=np.int32),
        "masked_lm_positions": np.zeros((n, P), dtype=np.int32),
        "masked_lm_ids": np.zeros((n, P), dtype=np.int32),
        "masked_lm_weights": np.zeros((n, P), dtype=np.float32),
        "next_sentence_labels": np.zeros((n,), dtype=np.int32),
    }
    for row, where in enumerate(located):
      ex = self.example(*where)
      length, k = len(ex["tokens"]), len(ex["positions"])
      batch["input_ids"][row, :length] = ex["input_ids"]
      batch["token_type_ids"][row, ex["len_a"] + 2:length] = 1
      batch["attention_mask"][row, :length] = 1
      batch["masked_lm_positions"][row, :k] = ex["positions"]
      batch["masked_lm_ids"][row, :k] = ex["labels"]
      batch["masked_lm_weights"][row, :k] = 1.0
      batch["next_sentence_labels"][row] = ex["is_random_next"]
    return batch

  # ------------------------------------------------------------------ reporting and export
  @property
  def steps_per_epoch(self) -> int:
    """Train: full batches per epoch. Eval: batches covering every example once (the last
    one wraps around to the first examples)."""
    if self.split == "eval":
      return -(-self.num_examples // self.batch_size)
    return max(1, self.num_examples // self.batch_size)

  def _token_accounting(self, table: np.ndarray) -> dict[str, Any]:
    """Round 0's accounting, cached beside its instance table (the argsort is not free)."""
    path = self._pairing_file(0)[:-len(".npy")] + ".accounting.json"
    if os.path.isfile(path):
      with open(path) as f:
        return json.load(f)
    result = accounting.token_accounting(table, self._corpus.sentence_offsets,
                                         self._corpus.document_offsets, self._corpus.stats)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, path)
    return result

  def _warn_about_drops(self) -> None:
    splitters = [c["splitter"] for c in self._corpus.stats.get("sentence_splitters", [])]
    message = accounting.drop_warning(
        self.stats["token_accounting"], splitters, self.max_seq_length,
        int(self.config.min_document_sentences), what=f"the {self.split} corpus",
        expected_fraction=float(self.config.expected_drop_fraction))
    # A held-out eval split is read from `source` and loses what its train split loses.
    cfg = self.config
    text = cfg.eval_source if self.split == "eval" and str(cfg.eval_source).strip() else cfg.source
    accounting.warn_once(log, message, (str(text), self.max_seq_length, float(cfg.short_seq_prob),
                                        int(cfg.min_document_sentences), tuple(splitters)))

  def _summary(self, table: np.ndarray) -> dict[str, Any]:
    stats = json.loads(json.dumps(self._corpus.stats))
    short = int((self._corpus.document_token_counts() < self.max_seq_length - 3).sum())
    stats["flagged_documents"] = dict(sorted(
        {**stats["flagged_documents"], "shorter_than_max_seq_length": short}.items()))
    lengths = (table[:, 1] - table[:, 0]) + (table[:, 3] - table[:, 2]) + 3
    stats.update({
        "split": self.split,
        "vocab_size": self.vocab_size,
        "examples": self.num_examples,
        "nsp_random_rate": float(np.mean(table[:, 4])),
        "mean_real_tokens": float(np.mean(lengths)),
        "static_masking": self.static_masking,
        "token_accounting": self._token_accounting(table),
    })
    return stats

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def save_vocab(self, directory: str) -> None:
    """vocab.txt + tokenizer.json (+ HF tokenizer config files) for export."""
    tokenizer_lib.save_tokenizer(self.tokenizer, directory)
