"""WordPiece vocabularies: deterministic training, BERT uncased rules, loading and validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mbert_jax.data import tokenizer as T
from mbert_jax.data.builtin_corpus import iter_builtin_documents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def texts():
  return [d.text for d in iter_builtin_documents("json*")] + \
         [d.text for d in iter_builtin_documents("argparse*")]


@pytest.fixture(scope="module")
def trained(texts):
  return T.train_wordpiece(texts, 400)


def test_training_is_deterministic_and_sized(texts, trained):
  again = T.train_wordpiece(texts, 400)
  assert T.vocab_in_id_order(again) == T.vocab_in_id_order(trained)
  assert trained.get_vocab_size() == 400
  assert T.vocab_in_id_order(trained)[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert T.special_ids(trained) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def test_bert_uncased_rules(trained):
  enc = trained.encode("Héllo, JSON Decoder!", "Second part")
  # Lower-cased, accents stripped, punctuation split off, pair template with type ids.
  assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
  assert "," in enc.tokens and "json" in enc.tokens
  assert all(t == t.lower() for t in enc.tokens if not t.startswith("["))
  assert enc.type_ids[:enc.tokens.index("[SEP]") + 1] == [0] * (enc.tokens.index("[SEP]") + 1)
  assert enc.type_ids[-1] == 1
  assert T.continuation_mask(trained).sum() > 50
  words = trained.encode("decoder").tokens[1:-1]
  assert "".join(w.removeprefix("##") for w in words) == "decoder"


TRAIN_IN_A_PROCESS = """
import hashlib, sys
from mbert_jax.data import tokenizer as T
from mbert_jax.data.builtin_corpus import iter_builtin_documents
texts = [d.text for d in iter_builtin_documents("email*")]
vocab = T.vocab_in_id_order(T.train_wordpiece(texts, 1500))
print(hashlib.sha256("\\n".join(vocab).encode()).hexdigest())
"""


def test_training_is_deterministic_across_processes():
  # The Rust trainer's hash maps are seeded per process: unpinned, two runs differ in both
  # the order and the set of tokens. Three fresh processes must agree exactly.
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  digests = {subprocess.run([sys.executable, "-c", TRAIN_IN_A_PROCESS], capture_output=True,
                            text=True, env=env, check=True, timeout=300).stdout.strip()
             for _ in range(3)}
  assert len(digests) == 1 and len(next(iter(digests))) == 64


def test_alphabet_is_most_frequent_characters_with_ties_by_character(texts):
  assert T._alphabet({"b": 3, "a": 3, "c": 5, "d": 1}, 3) == ["c", "a", "b"]
  tok = T.train_wordpiece(texts, 400)
  vocab = T.vocab_in_id_order(tok)
  alphabet = vocab[5:5 + T.alphabet_limit(400)]
  assert alphabet == sorted(alphabet) and all(len(ch) == 1 for ch in alphabet)
  assert vocab[5 + len(alphabet):5 + 2 * len(alphabet)] == ["##" + ch for ch in alphabet]


def test_alphabet_comes_from_the_sample_and_training_from_everything(texts):
  head = texts[:5]
  late = ["жук " * 40 + "xylophone xylophone " * 40]
  tok = T.train_wordpiece(head + late, 400, sample_chars=sum(map(len, head)))
  vocab = tok.get_vocab()
  assert "ж" not in vocab and "##ж" not in vocab  # only after the sample: [UNK]
  assert tok.encode("жук").tokens[1:-1] == ["[UNK]"]
  assert "xylophone" in vocab  # frequent only in the late text, learned all the same


def test_save_and_load_every_form(trained, tmp_path):
  T.save_tokenizer(trained, str(tmp_path))
  with open(tmp_path / "tokenizer_config.json") as f:
    assert json.load(f)["do_lower_case"] is True
  text = "The parser returns a namespace."
  for spec in (tmp_path / "vocab.txt", tmp_path / "tokenizer.json", tmp_path):
    assert T.load_tokenizer(str(spec)).encode(text).ids == trained.encode(text).ids


def test_vocabulary_errors(tmp_path):
  (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n")
  with pytest.raises(ValueError, match=r"lacks the special tokens \['\[MASK\]'\]"):
    T.load_tokenizer(str(tmp_path / "v.txt"))
  (tmp_path / "dup.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nthe\n")
  with pytest.raises(ValueError, match="duplicate"):
    T.load_tokenizer(str(tmp_path / "dup.txt"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="empty"):
    T.load_tokenizer(str(tmp_path / "empty.txt"))
  with pytest.raises(FileNotFoundError):
    T.load_tokenizer(str(tmp_path / "missing.txt"))
  (tmp_path / "d").mkdir()
  with pytest.raises(FileNotFoundError, match="neither"):
    T.load_tokenizer(str(tmp_path / "d"))
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ValueError, match="not a tokenizers JSON"):
    T.load_tokenizer(str(tmp_path / "bad.json"))


def test_trained_size_spec():
  assert T.parse_trained_vocab_size("train:512") == 512
  assert T.parse_trained_vocab_size("/path/vocab.txt") is None
  with pytest.raises(ValueError, match="integer"):
    T.parse_trained_vocab_size("train:big")
  with pytest.raises(ValueError, match="at least"):
    T.parse_trained_vocab_size("train:10")
  with pytest.raises(ValueError, match="no words"):
    T.train_wordpiece(["", "   "], 100)


def test_replacement_ids_exclude_specials(trained):
  ids = set(T.replacement_ids(trained).tolist())
  assert not ids & set(T.special_ids(trained).values())
  assert len(ids) == trained.get_vocab_size() - 5


def test_tokenizer_json_loads_without_its_own_padding_or_truncation(tmp_path):
  """Hugging Face tokenizer.json files often pad/truncate to a fixed length; pretraining must
  see each sentence's real tokens (the packaged MiniLM teacher pads to 128)."""
  trained = T.train_wordpiece(["alpha beta gamma delta", "epsilon zeta eta theta"] * 20, 64)
  trained.enable_padding(length=16, pad_id=trained.token_to_id("[PAD]"), pad_token="[PAD]")
  trained.enable_truncation(max_length=3)
  path = tmp_path / "tokenizer.json"
  trained.save(str(path))
  loaded = T.load_tokenizer(str(path))
  ids = loaded.encode("alpha beta gamma delta", add_special_tokens=False).ids
  assert len(ids) >= 4 and loaded.token_to_id("[PAD]") not in ids
