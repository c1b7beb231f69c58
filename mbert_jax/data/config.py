"""The `data` section every training preset carries, and its validation.

Defaults follow BERT's `create_pretraining_data.py` except where noted: masking is
dynamic by default (fresh masks every epoch, as RoBERTa showed helps) and the demo vocabulary
is trained from the corpus because no pretrained vocabulary can be downloaded offline.
"""

from __future__ import annotations

import ml_collections

SENTENCE_SPLITTERS = ("auto", "lines", "regex", "blingfire")
DOCUMENT_GROUPINGS = ("auto", "row", "blank_row", "wikitext")


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Comma-separated: `builtin` (optionally `builtin:<module glob>`), local paths or globs
  # (.txt/.text: a blank line between documents, lines are sentences (BERT's format) or
  # paragraphs / whole articles (see sentence_splitter); .jsonl/.json
  # = one JSON object per line; .parquet), or hub datasets `path[:config][@split]`.
  c.source = "builtin"
  c.text_field = "text"  # JSONL / Parquet / hub column holding a document's text
  # Held-out text for evaluation, same syntax as `source`; empty = hold out `eval_fraction` of
  # `source`'s documents (chosen by a content hash, so the split never depends on the seed).
  c.eval_source = ""
  c.eval_fraction = 0.05
  # A vocab.txt, a tokenizer.json, a directory holding either, `train:<size>` to train an
  # uncased WordPiece vocabulary of that size on the training documents, or
  # `bpe:<modernbert|eurobert>:<size>` to train a byte-level BPE in that family's layout.
  c.vocab = "train:8192"
  c.max_seq_length = 128
  c.max_predictions_per_seq = 20
  c.masked_lm_prob = 0.15  # the masking rate (BERT 0.15; ModernBERT was trained with 0.30)
  # BERT's [CLS] A [SEP] B [SEP] pairs with next-sentence labels; False: [CLS] A [SEP] single
  # segments without token types (teachers without an NSP head: ModernBERT, EuroBERT), and a
  # distillation schedule then needs schedule.nsp_factor=0.
  c.next_sentence = True
  c.short_seq_prob = 0.1
  c.whole_word_mask = False
  c.batch_size = 32  # global; every process builds batch_size // process_count rows
  c.eval_batch_size = 0  # 0 = batch_size
  c.seed = 12345  # BERT's random_seed
  # Eval pairing and masks use their own seed so eval numbers compare across training seeds.
  c.eval_seed = 12345
  c.dynamic_masking = True
  c.dupe_factor = 10  # static masking only: distinct (pairing, mask) copies, cycled per epoch
  # Dynamic masking re-pairs segments each epoch; > 0 cycles through that many pairings instead
  # (bounds the cache at very large scale). Masks stay fresh every epoch either way.
  c.pairing_rounds = 0
  # "auto" looks at a sample of each source: BERT's one-sentence-per-line reading (`lines`) when
  # its lines look like sentences, else lines (paragraphs, whole articles) are split into
  # sentences with `blingfire` (if installed) or `regex` (no dependency). The choice and its
  # evidence are logged and kept in the cache's stats.json.
  c.sentence_splitter = "auto"
  # How rows of JSONL/Parquet/hub sources become documents. "auto": `wikitext` for hub names
  # containing "wikitext" (rows are lines, ` = Title = ` starts an article), else `row`.
  c.document_grouping = "auto"
  c.min_document_sentences = 1  # BERT keeps one-sentence documents (their B is always random)
  # The share of the corpus's tokens this config knowingly leaves out of every example (e.g. a
  # short max_seq_length on purpose, as the demo does); the DATA WARNING fires only for a drop
  # above both this and 10% (mbert_jax/data/accounting.py).
  c.expected_drop_fraction = 0.0
  c.max_line_chars = 100_000  # longer lines are split at whitespace (counted)
  c.max_document_chars = 10_000_000  # longer documents are split (counted)
  c.num_proc = 2  # spawned processes for tokenization and large-corpus pairing (never forked)
  c.cache_dir = ""  # empty = <workdir>/data_cache
  return c


def _bad(field: str, value, why: str) -> ValueError:
  return ValueError(f"data.{field}={value!r}: {why}")


def validate_data_config(cfg) -> None:
  """Raise ValueError naming the first field whose value cannot work."""
  missing = [k for k in default_data_config().keys() if k not in cfg]
  if missing:
    raise ValueError(f"data config lacks fields {missing}; start from default_data_config()")
  if not str(cfg.source).strip():
    raise _bad("source", cfg.source, "empty; use `builtin`, file paths or a hub name")
  if not str(cfg.vocab).strip():
    raise _bad("vocab", cfg.vocab, "empty; use a vocab.txt, tokenizer.json or train:<size>")
  if cfg.max_seq_length < 5:
    raise _bad("max_seq_length", cfg.max_seq_length,
               "needs at least 5 positions: [CLS] A [SEP] B [SEP]")
  if cfg.max_predictions_per_seq < 1:
    raise _bad("max_predictions_per_seq", cfg.max_predictions_per_seq, "must be >= 1")
  if not 0.0 < cfg.masked_lm_prob < 1.0:
    raise _bad("masked_lm_prob", cfg.masked_lm_prob, "must lie in (0, 1)")
  if not 0.0 <= cfg.short_seq_prob <= 1.0:
    raise _bad("short_seq_prob", cfg.short_seq_prob, "must lie in [0, 1]")
  for name in ("batch_size", "dupe_factor", "num_proc", "min_document_sentences"):
    if int(cfg[name]) < 1:
      raise _bad(name, cfg[name], "must be >= 1")
  for name in ("eval_batch_size", "pairing_rounds"):
    if int(cfg[name]) < 0:
      raise _bad(name, cfg[name], "must be >= 0")
  if not 0.0 <= cfg.expected_drop_fraction < 1.0:
    raise _bad("expected_drop_fraction", cfg.expected_drop_fraction, "must lie in [0, 1)")
  if not 0.0 <= cfg.eval_fraction < 1.0:
    raise _bad("eval_fraction", cfg.eval_fraction, "must lie in [0, 1)")
  if cfg.sentence_splitter not in SENTENCE_SPLITTERS:
    raise _bad("sentence_splitter", cfg.sentence_splitter, f"choose one of {SENTENCE_SPLITTERS}")
  if cfg.document_grouping not in DOCUMENT_GROUPINGS:
    raise _bad("document_grouping", cfg.document_grouping, f"choose one of {DOCUMENT_GROUPINGS}")
  if cfg.max_line_chars < 16:
    raise _bad("max_line_chars", cfg.max_line_chars, "must be >= 16")
  if cfg.max_document_chars < cfg.max_line_chars:
    raise _bad("max_document_chars", cfg.max_document_chars, "must be >= max_line_chars")
  if not isinstance(cfg.next_sentence, bool):
    raise _bad("next_sentence", cfg.next_sentence, "must be True or False")
  if not str(cfg.text_field).strip():
    raise _bad("text_field", cfg.text_field, "empty")
