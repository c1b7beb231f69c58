"""WordPiece tokenizers with BERT's uncased rules, loaded from files or trained on the corpus.

BERT uncased = BertNormalizer (clean control characters, space out CJK, strip accents,
lowercase) + BertPreTokenizer (split on whitespace and punctuation) + WordPiece with `##`
continuation pieces and words over 100 characters mapped to [UNK].
"""

from __future__ import annotations

import collections
import heapq
import json
import os
import re
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
# Trained vocabularies put [PAD] at id 0 as every BERT vocabulary does.
TRAINING_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MIN_TRAINED_VOCAB = 64
CONTINUATION_PREFIX = "##"
_BRACKETED = re.compile(r"^\[[^\]]+\]$")


def _bert_pipeline(tok: Tokenizer) -> Tokenizer:
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=True, lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
  return tok


def _add_post_processor(tok: Tokenizer) -> Tokenizer:
  """[CLS] A [SEP] B [SEP] with type ids, so an exported tokenizer.json encodes pairs like BERT."""
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
  return tok


def bert_uncased_tokenizer(vocab: dict[str, int], where: str = "the vocabulary") -> Tokenizer:
  """An uncased BERT WordPiece tokenizer around a token -> id mapping."""
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100,
                                   continuing_subword_prefix=CONTINUATION_PREFIX))
  _bert_pipeline(tok)
  check_special_tokens(tok, where)
  return _add_post_processor(tok)


def read_vocab_txt(path: str) -> dict[str, int]:
  """vocab.txt: one token per line, id = line number (BERT's format)."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"vocabulary {path}: not UTF-8 ({e})") from e
  tokens = text.split("\n")
  if tokens and tokens[-1] == "":
    tokens.pop()
  tokens = [t.rstrip("\r") for t in tokens]
  if not tokens:
    raise ValueError(f"vocabulary {path} is empty")
  vocab: dict[str, int] = {}
  duplicates = []
  for i, t in enumerate(tokens):
    if t in vocab:
      duplicates.append(t)
    vocab[t] = i
  if duplicates:
    raise ValueError(f"vocabulary {path}: duplicate tokens {duplicates[:5]}; ids would be ambiguous")
  return vocab


def check_special_tokens(tok: Tokenizer, where: str) -> dict[str, int]:
  """The ids of [PAD]/[UNK]/[CLS]/[SEP]/[MASK]; ValueError naming any that are missing."""
  ids = {name: tok.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
  missing = [SPECIAL_TOKENS[n] for n, i in ids.items() if i is None]
  if missing:
    raise ValueError(f"{where} lacks the special tokens {missing}; pretraining needs all of "
                     f"{list(SPECIAL_TOKENS.values())}")
  return ids


def tokenizer_file(spec: str) -> str:
  """The tokenizer.json or vocab.txt a `data.vocab` spec names (a directory: tokenizer.json
  preferred); FileNotFoundError naming the spec otherwise."""
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    for name in ("tokenizer.json", "vocab.txt"):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"data.vocab={spec!r}: directory holds neither tokenizer.json nor "
                            f"vocab.txt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.vocab={spec!r}: no such file")
  return path


def read_tokenizer_json(path: str, spec: str) -> Tokenizer:
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
    raise ValueError(f"data.vocab={spec!r}: not a tokenizers JSON file ({e})") from e


def load_tokenizer(spec: str) -> Tokenizer:
  """A vocab.txt, a tokenizer.json, or a directory holding either (tokenizer.json preferred)."""
  path = tokenizer_file(spec)
  if path.endswith(".json"):
    tok = read_tokenizer_json(path, spec)
    check_special_tokens(tok, f"tokenizer {path}")
    return tok
  return bert_uncased_tokenizer(read_vocab_txt(path), f"vocabulary {path}")


def parse_trained_vocab_size(spec: str) -> int | None:
  """`train:<size>` -> size; anything else -> None (a path)."""
  if not spec.startswith("train:"):
    return None
  value = spec[len("train:"):]
  try:
    size = int(value)
  except ValueError:
    raise ValueError(f"data.vocab={spec!r}: expected train:<integer size>") from None
  if size < MIN_TRAINED_VOCAB:
    raise ValueError(f"data.vocab={spec!r}: a trained vocabulary needs at least "
                     f"{MIN_TRAINED_VOCAB} tokens")
  return size


def count_words(tok: Tokenizer, texts: Iterable[str]) -> collections.Counter:
  """Word frequencies after BERT normalisation and pre-tokenisation."""
  counts: collections.Counter = collections.Counter()
  for text in texts:
    normalized = tok.normalizer.normalize_str(text)
    counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(normalized))
  return counts


def _alphabet(word_counts: dict[str, int], limit: int) -> list[str]:
  """The `limit` most frequent characters (ties by character, so the result is unique)."""
  chars: collections.Counter = collections.Counter()
  for w, c in word_counts.items():
    for ch in w:
      chars[ch] += c
  return sorted(sorted(chars), key=lambda ch: -chars[ch])[:limit]


def _merged(a: str, b: str) -> str:
  return a + b[len(CONTINUATION_PREFIX):]


def learn_wordpiece_vocab(word_counts: dict[str, int], vocab_size: int,
                          min_frequency: int = 2) -> list[str]:
  """A WordPiece vocabulary learned by frequency-driven pair merges (as HF's WordPieceTrainer,
  which is BPE underneath), with every tie broken lexicographically.

  HF's trainer breaks ties through hash-map order, so two runs on the same corpus can give
  different vocabularies; processes that each train their own must agree, hence this.
  """
  limit = max(1, min(max(48, vocab_size // 10), (vocab_size - len(TRAINING_SPECIALS)) // 2))
  alphabet = set(_alphabet(word_counts, limit))
  # Words with a character outside the alphabet would be [UNK]: they take no part in merges.
  words = sorted(w for w in word_counts if all(ch in alphabet for ch in w))
  counts = [word_counts[w] for w in words]
  symbols = [[w[0]] + [CONTINUATION_PREFIX + ch for ch in w[1:]] for w in words]

  vocab = list(TRAINING_SPECIALS)
  vocab += sorted(alphabet) + sorted(CONTINUATION_PREFIX + ch for ch in alphabet)
  known = set(vocab)

  pair_counts: collections.Counter = collections.Counter()
  where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
  for i, syms in enumerate(symbols):
    for pair in zip(syms, syms[1:]):
      pair_counts[pair] += counts[i]
      where[pair].add(i)
  # Max-heap by count, then smallest pair: entries go stale and are skipped when popped.
  heap = [(-c, pair) for pair, c in pair_counts.items()]
  heapq.heapify(heap)

  while len(vocab) < vocab_size and heap:
    neg, pair = heapq.heappop(heap)
    if pair_counts.get(pair, 0) != -neg:
      continue
    if -neg < min_frequency:
      break
    new = _merged(*pair)
    if new not in known:
      known.add(new)
      vocab.append(new)
    touched: set[tuple[str, str]] = set()
    for i in sorted(where.pop(pair, ())):
      syms = symbols[i]
      for old in zip(syms, syms[1:]):
        pair_counts[old] -= counts[i]
        touched.add(old)
      out, j = [], 0
      while j < len(syms):
        if j + 1 < len(syms) and (syms[j], syms[j + 1]) == pair:
          out.append(new)
          j += 2
        else:
          out.append(syms[j])
          j += 1
      symbols[i] = out
      for p in zip(out, out[1:]):
        pair_counts[p] += counts[i]
        where[p].add(i)
        touched.add(p)
    pair_counts.pop(pair, None)
    for p in touched:
      c = pair_counts.get(p, 0)
      if c > 0:
        heapq.heappush(heap, (-c, p))
      else:
        pair_counts.pop(p, None)
  return vocab


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Train an uncased WordPiece vocabulary (special tokens first, [PAD] = 0), deterministically."""
  counter = _bert_pipeline(Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")))
  word_counts = count_words(counter, texts)
  if not word_counts:
    raise ValueError("cannot train a vocabulary: the training documents contain no words")
  vocab = learn_wordpiece_vocab(word_counts, vocab_size)
  return bert_uncased_tokenizer({t: i for i, t in enumerate(vocab)}, "the trained vocabulary")


def vocab_in_id_order(tok: Tokenizer) -> list[str]:
  vocab = tok.get_vocab(with_added_tokens=True)
  tokens = [""] * len(vocab)
  for t, i in vocab.items():
    if i >= len(tokens):
      raise ValueError(f"tokenizer ids are not contiguous (id {i} >= size {len(tokens)})")
    tokens[i] = t
  return tokens


def save_tokenizer(tok: Tokenizer, directory: str) -> None:
  """vocab.txt + tokenizer.json (+ the small JSON files HF's BertTokenizer(Fast) reads)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("".join(t + "\n" for t in vocab_in_id_order(tok)))
  tok.save(os.path.join(directory, "tokenizer.json"))
  specials = {f"{name}_token": token for name, token in SPECIAL_TOKENS.items()}
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump(specials, f, indent=2)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
               "strip_accents": None, "tokenize_chinese_chars": True, **specials}, f, indent=2)


def special_ids(tok: Tokenizer) -> dict[str, int]:
  return check_special_tokens(tok, "the tokenizer")


def continuation_mask(tok: Tokenizer) -> np.ndarray:
  """bool[vocab]: True for `##` pieces (continue the previous word; whole-word masking)."""
  out = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=bool)
  for t, i in tok.get_vocab(with_added_tokens=True).items():
    out[i] = t.startswith(CONTINUATION_PREFIX) and len(t) > len(CONTINUATION_PREFIX)
  return out


def replacement_ids(tok: Tokenizer) -> np.ndarray:
  """Ids a masked token may be replaced by (the 10% random case): real word pieces only.

  BERT draws from the whole vocabulary, [CLS]/[PAD]/[unusedN] included; drawing those
  teaches nothing, so bracketed specials and added special tokens are left out.
  """
  vocab = tok.get_vocab(with_added_tokens=True)
  added = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
  ids = sorted(i for t, i in vocab.items() if t not in added and not _BRACKETED.match(t))
  if not ids:
    raise ValueError("the vocabulary has no ordinary tokens to use as random replacements")
  return np.asarray(ids, dtype=np.int32)
