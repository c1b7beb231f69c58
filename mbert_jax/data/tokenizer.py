"""WordPiece tokenizers with BERT's rules: the one place that builds, loads and trains them.

BERT uncased = BertNormalizer (clean control characters, space out CJK, strip accents,
lowercase) + BertPreTokenizer (split on whitespace and punctuation) + WordPiece with `##`
continuation pieces and words over 100 characters mapped to [UNK]; cased keeps case and accents.
Pretraining and fine-tuning both load through `load_tokenizer` and build through
`build_wordpiece`; `train_wordpiece` trains with the tokenizers library's Rust trainer, pinned
down so that every run on the same text gives the same vocabulary.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import shutil
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
PRETRAINING_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Fine-tuning never masks: a vocabulary without [MASK] is fine there.
FINETUNE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
# Trained vocabularies put [PAD] at id 0 as every BERT vocabulary does.
TRAINING_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MIN_TRAINED_VOCAB = 64
CONTINUATION_PREFIX = "##"
# Part of vocabulary cache keys: bump when training would give a different vocabulary.
TRAINER_VERSION = "hf-wordpiece-pinned-v1"
_BRACKETED = re.compile(r"^\[[^\]]+\]$")
# A tokenizer directory's files, as `save_tokenizer` writes them and Hugging Face reads them.
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def _bert_pipeline(tok: Tokenizer, lower_case: bool = True) -> Tokenizer:
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=lower_case, lowercase=lower_case)
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


def _vocab_mapping(vocab: str | os.PathLike | Sequence[str] | Mapping[str, int]
                   ) -> tuple[dict[str, int], str]:
  if isinstance(vocab, (str, os.PathLike)):
    return read_vocab_txt(os.fspath(vocab)), f"vocabulary {os.fspath(vocab)}"
  if isinstance(vocab, Mapping):
    return {str(k): int(v) for k, v in vocab.items()}, "the vocabulary"
  mapping: dict[str, int] = {}
  for i, token in enumerate(vocab):
    if token in mapping:
      raise ValueError(f"the vocabulary has duplicate tokens [{token!r}]; ids would be ambiguous")
    mapping[token] = i
  return mapping, "the vocabulary"


def build_wordpiece(vocab: str | os.PathLike | Sequence[str] | Mapping[str, int], *,
                    lower_case: bool = True,
                    require: Sequence[str] = PRETRAINING_SPECIAL_TOKENS,
                    where: str | None = None) -> Tokenizer:
  """A BERT WordPiece tokenizer from a vocab.txt path, a token list (id = position) or a
  token -> id mapping; ValueError naming any `require`d special token that is missing."""
  mapping, default_where = _vocab_mapping(vocab)
  tok = Tokenizer(models.WordPiece(mapping, unk_token="[UNK]", max_input_chars_per_word=100,
                                   continuing_subword_prefix=CONTINUATION_PREFIX))
  _bert_pipeline(tok, lower_case)
  require_tokens(tok, require, where or default_where)
  return _add_post_processor(tok)


def bert_uncased_tokenizer(vocab: dict[str, int], where: str = "the vocabulary") -> Tokenizer:
  """An uncased BERT WordPiece tokenizer around a token -> id mapping."""
  return build_wordpiece(vocab, lower_case=True, where=where)


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


def require_tokens(tok: Tokenizer, require: Sequence[str], where: str) -> None:
  """A WordPiece vocabulary's BERT special tokens, or (any other tokenizer) the roles they
  stand for: a BPE tokenizer names them its own way."""
  if not is_wordpiece(tok):
    roles = [r for r, t in SPECIAL_TOKENS.items() if t in require and r != "unk"]
    special_ids(tok, where, roles)
    return
  missing = [t for t in require if tok.token_to_id(t) is None]
  if missing:
    raise ValueError(f"{where} lacks the special tokens {missing}; it needs all of "
                     f"{list(require)}")


# What each special role is called in the tokenizers people ship, in order of preference:
# BERT's (and ModernBERT's), RoBERTa's, Llama 3's (EuroBERT's), others'. `sep` doubles as
# `pad` where a tokenizer has none (EuroBERT pads with <|end_of_text|>).
ROLE_NAMES = {
    "cls": ("[CLS]", "<s>", "<|begin_of_text|>", "<bos>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<|end_of_text|>", "<eos>", "<sep>"),
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "unk": ("[UNK]", "<unk>"),
}


def is_wordpiece(tok: Tokenizer) -> bool:
  return isinstance(tok.model, models.WordPiece)


def _template_specials(tok: Tokenizer) -> list[str]:
  """The special tokens of the post-processor's single-sequence template, in order (a
  tokenizer.json's `[CLS] $A [SEP]` or `<|begin_of_text|> $A <|end_of_text|>`)."""
  post = json.loads(tok.to_str()).get("post_processor") or {}
  steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
  for step in steps:
    if step.get("type") == "TemplateProcessing":
      return [item["SpecialToken"]["id"] for item in step.get("single", [])
              if "SpecialToken" in item]
    if step.get("type") in ("BertProcessing", "RobertaProcessing"):
      return [step["cls"][0], step["sep"][0]]
  return []


def role_id(tok: Tokenizer, role: str) -> int | None:
  """The id of a special role ('cls', 'sep', 'pad', 'mask', 'unk'), found by name: the known
  names, then (cls, sep) the post-processor's template, then (pad) the separator."""
  for name in ROLE_NAMES[role]:
    if tok.token_to_id(name) is not None:
      return int(tok.token_to_id(name))
  template = _template_specials(tok)
  if role in ("cls", "sep") and template:
    found = tok.token_to_id(template[0] if role == "cls" else template[-1])
    if found is not None:
      return int(found)
  if role == "pad":
    return role_id(tok, "sep")
  return None


def special_ids(tok: Tokenizer, where: str = "the tokenizer",
                roles: Sequence[str] = ("cls", "sep", "pad", "mask")) -> dict[str, int]:
  """Ids of CLS, SEP, PAD, MASK (and UNK, -1 when the tokenizer has none: byte-level BPE
  never needs one) by name; ValueError in one line for a required role it lacks. A WordPiece
  vocabulary must have BERT's own tokens."""
  if is_wordpiece(tok):
    require_tokens(tok, [SPECIAL_TOKENS[r] for r in roles], where)
  ids = {}
  for role in ("cls", "sep", "pad", "mask", "unk"):
    found = role_id(tok, role)
    if found is None and role in roles:
      raise ValueError(
          f"{where} has no {role} token (none of {', '.join(ROLE_NAMES[role])}"
          + (", nor a post-processor template" if role in ("cls", "sep") else "")
          + ")" + ("; masked-LM pretraining needs one: use a tokenizer with a mask token"
                   if role == "mask" else ""))
    ids[role] = -1 if found is None else found
  return ids


def check_special_tokens(tok: Tokenizer, where: str) -> dict[str, int]:
  """The ids of the special roles pretraining needs; ValueError naming any that is missing."""
  return special_ids(tok, where)


def token_ids(tok: Tokenizer, names: Sequence[str] = ("cls", "sep", "pad")) -> dict[str, int]:
  """Ids of the named special roles; ValueError if one is missing."""
  ids = special_ids(tok, "the tokenizer's vocabulary", names)
  return {name: ids[name] for name in names}


def tokenizer_file(spec: str, setting: str = "data.vocab") -> str:
  """The tokenizer.json or vocab.txt a `data.vocab` spec names (a directory: tokenizer.json
  preferred); FileNotFoundError naming the spec (as `setting`) otherwise."""
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    for name in ("tokenizer.json", "vocab.txt"):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"{setting}={spec!r}: directory holds neither tokenizer.json nor "
                            f"vocab.txt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{setting}={spec!r}: no such file")
  return path


def read_tokenizer_json(path: str, spec: str, setting: str = "data.vocab") -> Tokenizer:
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
    raise ValueError(f"{setting}={spec!r}: not a tokenizers JSON file ({e})") from e


def saved_lower_case(vocab_path: str) -> bool | None:
  """`do_lower_case` from a tokenizer_config.json beside a vocab.txt (HF's layout), if any."""
  config = os.path.join(os.path.dirname(vocab_path), "tokenizer_config.json")
  try:
    with open(config) as f:
      value = json.load(f).get("do_lower_case")
  except (OSError, ValueError, AttributeError):
    return None
  return value if isinstance(value, bool) else None


def load_tokenizer(spec: str, *, lower_case: bool | None = None,
                   require: Sequence[str] = PRETRAINING_SPECIAL_TOKENS,
                   setting: str = "data.vocab") -> Tokenizer:
  """A vocab.txt, a tokenizer.json, or a directory holding either (tokenizer.json preferred):
  the one tokenizer loader of pretraining, fine-tuning and `predict`.

  A tokenizer.json carries its own normalisation and is used as written. A vocab.txt becomes a
  BERT WordPiece tokenizer: cased or uncased per `lower_case`, or when None per the
  `do_lower_case` of a tokenizer_config.json beside it, else uncased. `require`: the special
  tokens that must exist (pretraining needs [MASK], fine-tuning FINETUNE_SPECIAL_TOKENS).
  `setting`: the config field or flag that named `spec`, for the error messages.
  """
  path = tokenizer_file(spec, setting)
  if path.endswith(".json"):
    # Its own padding/truncation (HF ships e.g. pad-to-128) would turn every sentence into a
    # fixed-length row before our pairing and truncation: always off.
    tok = plain_tokenizer(read_tokenizer_json(path, spec, setting))
    require_tokens(tok, require, f"tokenizer {path}")
    return tok
  if lower_case is None:
    lower_case = saved_lower_case(path)
  return build_wordpiece(path, lower_case=True if lower_case is None else lower_case,
                         require=require)


def plain_tokenizer(tok: Tokenizer) -> Tokenizer:
  """The tokenizer without its own truncation/padding, which would cut text before a caller's
  pair-aware truncation (a copy; the given tokenizer is left unchanged)."""
  if tok.truncation is None and tok.padding is None:
    return tok
  copy = Tokenizer.from_str(tok.to_str())
  copy.no_truncation()
  copy.no_padding()
  return copy


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


# Characters sampled for the alphabet: the first 50M characters of the training text.
ALPHABET_SAMPLE_CHARS = 50_000_000


def _alphabet(char_counts: Mapping[str, int], limit: int) -> list[str]:
  """The `limit` most frequent characters (ties by character, so the result is unique)."""
  return sorted(sorted(char_counts), key=lambda ch: -char_counts[ch])[:limit]


def alphabet_limit(vocab_size: int) -> int:
  return max(1, min(max(48, vocab_size // 10), (vocab_size - len(TRAINING_SPECIALS)) // 2))


def _sample_alphabet(texts: Iterator[str], normalizer, sample_chars: int
                     ) -> tuple[collections.Counter, list[str]]:
  """Character counts of normalised text from the start of `texts`, and the texts read.

  BertNormalizer works character by character (clean, space out CJK, strip accents,
  lowercase), so raw characters are counted (at C speed) and each distinct one is normalised
  once: five times faster than normalising the text.
  """
  raw: collections.Counter = collections.Counter()
  taken: list[str] = []
  seen = 0
  for text in texts:
    taken.append(text)
    raw.update(text)
    seen += len(text)
    if seen >= sample_chars:
      break
  counts: collections.Counter = collections.Counter()
  for ch, n in raw.items():
    for out in normalizer.normalize_str(ch):
      if not out.isspace():
        counts[out] += n
  return counts, taken


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
  it = iter(texts)
  while batch := list(itertools.islice(it, size)):
    yield batch


def train_wordpiece(texts: Iterable[str], vocab_size: int, *,
                    sample_chars: int = ALPHABET_SAMPLE_CHARS) -> Tokenizer:
  """Train an uncased WordPiece vocabulary (special tokens first, [PAD] = 0), deterministically.

  The tokenizers library's WordPiece trainer (Rust: word counting in parallel, then BPE-style
  merges) breaks ties between equally frequent pairs by token id, and gives ids to the alphabet
  and its `##` forms in hash-map order, so two runs could differ. Pinning every id before any
  merge removes that: the alphabet (the most frequent characters of the first `sample_chars`
  characters, ties by character) is passed as the initial alphabet with exactly its size as
  the limit, and the `##` forms are listed, sorted, after the special tokens.
  """
  counter = _bert_pipeline(Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")))
  it = iter(texts)
  char_counts, head = _sample_alphabet(it, counter.normalizer, sample_chars)
  if not char_counts:
    raise ValueError("cannot train a vocabulary: the training documents contain no words")
  alphabet = sorted(_alphabet(char_counts, alphabet_limit(vocab_size)))
  continuations = [CONTINUATION_PREFIX + ch for ch in alphabet]
  trainer = trainers.WordPieceTrainer(
      vocab_size=vocab_size, min_frequency=2, show_progress=False,
      special_tokens=TRAINING_SPECIALS + continuations, initial_alphabet=alphabet,
      limit_alphabet=len(alphabet), continuing_subword_prefix=CONTINUATION_PREFIX)
  counter.train_from_iterator(_batches(itertools.chain(head, it)), trainer)
  learned = counter.get_vocab(with_added_tokens=False)
  by_id = sorted(learned, key=lambda t: learned[t])
  # Specials, the alphabet, its `##` forms, then merges in the order they were learned.
  merged = [t for t in by_id if t not in set(TRAINING_SPECIALS + alphabet + continuations)]
  vocab = TRAINING_SPECIALS + alphabet + continuations + merged
  return bert_uncased_tokenizer({t: i for i, t in enumerate(vocab)}, "the trained vocabulary")


def vocab_in_id_order(tok: Tokenizer) -> list[str]:
  vocab = tok.get_vocab(with_added_tokens=True)
  tokens = [""] * len(vocab)
  for t, i in vocab.items():
    if i >= len(tokens):
      raise ValueError(f"tokenizer ids are not contiguous (id {i} >= size {len(tokens)})")
    tokens[i] = t
  return tokens


# What the exported student reads: MobileBERT takes token types (zeros for a single segment),
# which transformers' generic fast tokenizer would otherwise leave out.
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


def _save_fast_tokenizer(tok: Tokenizer, directory: str) -> None:
  """tokenizer.json + the config transformers' AutoTokenizer reads for a tokenizer that is not
  BERT's WordPiece (a teacher's BPE): its special tokens by role, named as it names them. No
  vocab.txt: a byte-level BPE vocabulary read as WordPiece would encode wrongly."""
  tok.save(os.path.join(directory, "tokenizer.json"))
  ids = special_ids(tok, f"tokenizer to save in {directory}", ("cls", "sep", "pad"))
  specials = {f"{role}_token": tok.id_to_token(i) for role, i in ids.items() if i >= 0}
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump(specials, f, indent=2)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names":
               MODEL_INPUT_NAMES, "clean_up_tokenization_spaces": False, **specials}, f, indent=2)


def save_tokenizer(tok: Tokenizer, directory: str) -> None:
  """vocab.txt + tokenizer.json (+ the small JSON files HF's BertTokenizer(Fast) reads); a
  non-WordPiece tokenizer as a tokenizer.json-based fast tokenizer (`_save_fast_tokenizer`)."""
  os.makedirs(directory, exist_ok=True)
  if not is_wordpiece(tok):
    _save_fast_tokenizer(tok, directory)
    return
  with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("".join(t + "\n" for t in vocab_in_id_order(tok)))
  tok.save(os.path.join(directory, "tokenizer.json"))
  specials = {f"{name}_token": token for name, token in SPECIAL_TOKENS.items()}
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump(specials, f, indent=2)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
               "strip_accents": None, "tokenize_chinese_chars": True, **specials}, f, indent=2)


def export_tokenizer(tokenizer_dir: str, out: str) -> None:
  """A run's tokenizer files into an export directory: a WordPiece vocabulary's as they are, a
  BPE tokenizer.json re-saved by `save_tokenizer` (a run saved before BPE had its own config
  holds a BertTokenizer one beside it, which transformers would misread)."""
  path = tokenizer_file(tokenizer_dir, "the run's tokenizer")
  if path.endswith(".json"):
    tok = plain_tokenizer(read_tokenizer_json(path, tokenizer_dir, "the run's tokenizer"))
    if not is_wordpiece(tok):
      save_tokenizer(tok, out)
      return
  os.makedirs(out, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(tokenizer_dir, name)):
      shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out, name))


def continuation_mask(tok: Tokenizer) -> np.ndarray:
  """bool[vocab]: True for `##` pieces (continue the previous word; whole-word masking).
  All False for other tokenizers: their word boundaries are the pre-tokenizer's, stored per
  token with the corpus (`word_starts`)."""
  out = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=bool)
  if not is_wordpiece(tok):
    return out
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
