"""Byte-level BPE tokenizers in the two layouts the pre-norm teachers ship, trained offline
(tokenizers' Rust trainer) for micro teachers and tests.

  modernbert: [UNK] [CLS] [SEP] [PAD] [MASK], `[CLS] $A [SEP]` (ModernBERT's tokenizer.json);
  eurobert:   <|begin_of_text|> <|end_of_text|> <|pad|> <|mask|>, `<|begin_of_text|> $A
              <|end_of_text|>` (Llama 3's names, as EuroBERT's).

Neither has `##` pieces: a word is what the byte-level pre-tokenizer splits off (a leading
space belongs to the word it starts), which is where whole-word masking reads its boundaries
(`corpus.tokenize_documents` stores them per token).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = {
    "modernbert": ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"),
    "eurobert": ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|mask|>"),
}
# (cls, sep) of each layout's template.
_TEMPLATE = {"modernbert": ("[CLS]", "[SEP]"),
             "eurobert": ("<|begin_of_text|>", "<|end_of_text|>")}


# data.vocab = "bpe:<layout>:<size>": train a byte-level BPE of that layout on the corpus.
PREFIX = "bpe:"
# Part of vocabulary cache keys: bump when training would give a different vocabulary.
TRAINER_VERSION = "hf-bpe-bytelevel-v1"
_BYTE_ALPHABET = 256


def parse_spec(spec: str) -> tuple[str, int] | None:
  """`bpe:<layout>:<size>` -> (layout, size); anything else -> None. ValueError in one line
  for a malformed spec or a size that leaves no room for merges."""
  if not spec.startswith(PREFIX):
    return None
  layout, _, size = spec[len(PREFIX):].partition(":")
  if layout not in SPECIALS or not size.isdigit():
    raise ValueError(f"data.vocab={spec!r}: expected bpe:<layout>:<size> with layout one of "
                     f"{sorted(SPECIALS)}, e.g. bpe:modernbert:2048")
  smallest = _BYTE_ALPHABET + len(SPECIALS[layout]) + 1
  if int(size) < smallest:
    raise ValueError(f"data.vocab={spec!r}: a byte-level BPE needs at least {smallest} entries "
                     f"(256 bytes, the special tokens, one merge)")
  return layout, int(size)


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
  batch: list[str] = []
  for text in texts:
    batch.append(text)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def train_bpe(texts: Iterable[str], vocab_size: int, layout: str = "modernbert") -> Tokenizer:
  """A byte-level BPE of at most `vocab_size` entries (specials first) on `texts`."""
  if layout not in SPECIALS:
    raise ValueError(f"BPE layout {layout!r}: choose one of {sorted(SPECIALS)}")
  specials = list(SPECIALS[layout])
  tok = Tokenizer(models.BPE(unk_token="[UNK]" if "[UNK]" in specials else None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_batches(texts), trainer)
  cls, sep = _TEMPLATE[layout]
  tok.post_processor = processors.TemplateProcessing(
      single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
      special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
  return tok


__all__ = ["PREFIX", "SPECIALS", "TRAINER_VERSION", "parse_spec", "train_bpe"]
