"""Source parsing, robust readers, bad input end to end, the builtin corpus, train/eval split."""

from __future__ import annotations

import io
import json
import os

import datasets
import numpy as np
import pytest

from mbert_jax.data import build_pipeline, default_data_config
from mbert_jax.data import readers
from mbert_jax.data import sources as S
from mbert_jax.data.builtin_corpus import (clean_docstring, comment_blocks, iter_builtin_documents,
                                           merge_units, module_documents)
from mbert_jax.data.text import split_long_line, split_sentences, splitting_splitter

datasets.disable_progress_bars()

PROSE = [
    "The import statement combines two operations.",
    "It searches for the named module, then it binds the results of that search to a name.",
    "The search operation is defined as a call to the import function.",
    "A module's attributes can be read and written.",
    "Modules are imported only once per interpreter session.",
    "If you change your modules, you must restart the interpreter.",
    "Packages are a way of structuring the module namespace.",
    "Each package is a directory containing an initialisation file.",
]


def doc(i: int, n: int = 6) -> list[str]:
  return [f"Document {i} sentence {j}: " + PROSE[(i + j) % len(PROSE)] for j in range(n)]


def bert_text(docs) -> str:
  return "\n\n".join("\n".join(d) for d in docs) + "\n"


def cfg(source: str, **kw):
  c = default_data_config()
  c.source, c.vocab, c.num_proc = source, "train:200", 1
  c.max_seq_length, c.max_predictions_per_seq, c.batch_size = 48, 8, 4
  c.eval_fraction = 0.0
  for k, v in kw.items():
    c[k] = v
  return c


# --------------------------------------------------------------------------- parsing
def test_parse_sources_kinds(tmp_path):
  (tmp_path / "a.txt").write_text("x\n")
  (tmp_path / "b.jsonl").write_text("{}\n")
  got = S.parse_sources(f"builtin:json*, {tmp_path}/*, wikitext:wikitext-2-raw-v1@validation, bookcorpus")
  assert [s.kind for s in got] == ["builtin", "jsonl", "text", "hub", "hub"]
  assert got[0].pattern == "json*"
  assert got[3].hub_path == "wikitext" and got[3].hub_config == "wikitext-2-raw-v1"
  assert got[3].hub_split == "validation" and got[4].hub_split == "train"
  assert S.parse_sources(str(tmp_path))[0].kind == "jsonl"  # a directory: its known files


def test_missing_local_sources_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    S.parse_sources(str(tmp_path / "missing.txt"))
  with pytest.raises(FileNotFoundError, match="matches no file"):
    S.parse_sources(str(tmp_path / "*.jsonl"))
  with pytest.raises(ValueError, match="names no source"):
    S.parse_sources(" , ")


# --------------------------------------------------------------------------- readers
def test_text_reader_documents_and_flags(tmp_path):
  p = tmp_path / "c.txt"
  p.write_bytes(b"first line\nsecond line\n\n\n  \nbad \xff\xfe bytes here\nok\n\nlast")
  docs = list(readers.iter_text_file(str(p), 1000, 10_000))
  assert [d.text.split("\n") for d in docs] == [
      ["first line", "second line"], ["bad \ufffd\ufffd bytes here", "ok"], ["last"]]
  assert docs[1].flags == ("non_utf8",) and docs[0].flags == ()


def test_enormous_line_is_read_in_bounded_pieces(tmp_path):
  words = " ".join(f"w{i}" for i in range(20_000))  # one 128 kB line
  p = tmp_path / "big.txt"
  p.write_text("short line\n" + words + "\n")
  docs = list(readers.iter_text_file(str(p), 1000, 10_000_000))
  lines = docs[0].text.split("\n")
  assert docs[0].flags == ("long_line_split",)
  assert max(len(ln) for ln in lines) <= 1000
  assert " ".join(lines[1:]) == words  # split at whitespace: nothing lost or cut


def test_bounded_reader_never_splits_a_multibyte_character():
  text = ("é" * 700 + "\n") * 3  # 2-byte characters; 1000-byte reads cut inside them
  lines = list(readers.iter_bounded_lines(io.BytesIO(text.encode()), 1000))
  assert all(not bad for _, _, bad in lines)
  assert "".join(ln for ln, _, _ in lines) == "é" * 2100


def test_split_utf8_tail():
  data = "aé".encode()
  assert readers.split_utf8_tail(data[:-1]) == (b"a", b"\xc3")
  assert readers.split_utf8_tail(data) == (data, b"")


def test_long_documents_are_split(tmp_path):
  p = tmp_path / "c.txt"
  p.write_text("\n".join(f"sentence number {i} of a very long document" for i in range(100)))
  docs = list(readers.iter_text_file(str(p), 1000, 500))
  assert len(docs) > 5 and all(len(d.text) <= 500 for d in docs)
  assert all("long_document_split" in d.flags for d in docs[1:])


def test_jsonl_records_and_skip_reasons(tmp_path):
  p = tmp_path / "c.jsonl"
  lines = [json.dumps({"body": "Good text. More text."}).encode(), b"{not json",
           json.dumps([1, 2]).encode(), json.dumps({"other": "x"}).encode(),
           json.dumps({"body": 3}).encode(), json.dumps({"body": None}).encode(),
           b"", b'{"body": "caf\xc3\xa9 \xff"}']
  p.write_bytes(b"\n".join(lines) + b"\n")
  docs = list(readers.iter_jsonl_records(str(p), "body", 1000))
  assert [d.skip for d in docs] == ["", "invalid_json", "invalid_json", "missing_text_field",
                                    "invalid_text_field", "empty", ""]
  assert docs[0].text == "Good text. More text." and docs[-1].flags == ("non_utf8",)


def test_oversized_jsonl_record_is_skipped_without_reading_it_whole(tmp_path):
  p = tmp_path / "c.jsonl"
  p.write_text(json.dumps({"text": "x" * 50_000}) + "\n" + json.dumps({"text": "fine"}) + "\n")
  docs = list(readers.iter_jsonl_records(str(p), "text", 1000))
  assert [d.skip for d in docs] == ["oversized_record", ""]


def test_empty_file_yields_a_counted_skip(tmp_path):
  (tmp_path / "e.txt").write_text("\n\n  \n")
  assert [d.skip for d in readers.iter_text_file(str(tmp_path / "e.txt"), 100, 1000)] == ["empty_file"]


def test_row_grouping_modes():
  rows = [readers.RawDoc(t) for t in [" = Title A = \n", " = = Section = = \n", " Text one . \n", "\n",
                                " Text two . \n", " = Title B = \n", " Other . \n"]]
  wiki = list(readers.group_rows(iter(rows), "wikitext"))
  assert [d.text for d in wiki] == [" Text one . \n Text two . ", " Other . "]
  blank = list(readers.group_rows(iter([readers.RawDoc("a"), readers.RawDoc("b"), readers.RawDoc(""), readers.RawDoc("c")]),
                            "blank_row"))
  assert [d.text for d in blank] == ["a\nb", "c"]
  with pytest.raises(ValueError, match="grouping"):
    list(readers.group_rows(iter(rows), "paragraph"))


def test_sentence_splitter():
  text = ("Dr. Smith arrived at 3 p.m. today. He said: \"It works!\" Then he left (quietly). "
          "See e.g. the U.S. manual. Version 3.11 is out? Yes.")
  assert split_sentences(text) == [
      "Dr. Smith arrived at 3 p.m. today.", "He said: \"It works!\"", "Then he left (quietly).",
      "See e.g. the U.S. manual.", "Version 3.11 is out?", "Yes."]
  assert split_sentences("   ") == []


def test_split_long_line_prefers_whitespace():
  pieces = split_long_line("alpha beta gamma delta epsilon", 12)
  assert pieces == ["alpha beta", "gamma delta", "epsilon"]
  assert split_long_line("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


# --------------------------------------------------------------------------- train/eval split
def test_eval_mask_is_content_based_and_never_empty():
  rng = np.random.default_rng(0)
  hashes = rng.integers(0, 2**63 - 1, size=10_000, dtype=np.int64)
  usable = np.ones(10_000, dtype=bool)
  held = S.eval_mask(hashes, usable, 0.05)
  assert abs(held.mean() - 0.05) < 0.01
  tiny = S.eval_mask(hashes[:3], usable[:3], 0.01)  # expected 0.03 documents: still one
  assert tiny.sum() == 1 and tiny[np.argmin(hashes[:3])]
  assert not S.eval_mask(hashes, usable, 0.0).any()
  usable[:] = False
  assert not S.eval_mask(hashes, usable, 0.5).any()


def test_document_hash_is_stable():
  assert S.document_hash("abc") == S.document_hash("abc") != S.document_hash("abd")
  assert 0 <= S.document_hash("x") < 2**63


# --------------------------------------------------------------------------- bad input end to end
def test_bad_documents_are_counted_not_fatal(tmp_path):
  good = bert_text([doc(i) for i in range(12)])
  (tmp_path / "a_good.txt").write_text(good)
  (tmp_path / "b_empty.txt").write_text("")
  (tmp_path / "c_bad.txt").write_bytes(
      b"only \xff one sentence here\n\n\x00\x01\x02\n\n\xe2\x80\x8b\n\n"
      + good.encode()[:200] + b"\n")
  (tmp_path / "d_huge.txt").write_text(" ".join(f"word{i}" for i in range(5000)) + "\n")
  records = [{"text": "Another document. It has two sentences."}, {"text": None}, {"x": 1}]
  (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
  p = build_pipeline(cfg(f"{tmp_path}/*.txt,{tmp_path}/e.jsonl", max_line_chars=2000),
                     str(tmp_path / "w"))
  s = p.stats
  # \x00\x01\x02 is binary; a zero-width space alone has no tokens.
  assert s["skipped_documents"] == {"binary": 1, "empty": 1, "empty_file": 1, "invalid_json": 1,
                                    "missing_text_field": 1, "no_tokens": 1}
  assert s["flagged_documents"]["non_utf8"] == 1
  assert s["flagged_documents"]["long_line_split"] == 1
  assert s["flagged_documents"]["one_sentence"] == 1  # the \xff document
  assert s["flagged_documents"]["shorter_than_max_seq_length"] >= 1
  assert s["documents"] == 12 + 1 + 1 + 1 + 1  # good, c_bad (2 usable), huge, jsonl
  batch = p.batch_at(0)
  assert batch["input_ids"].shape == (4, 48)


def test_all_empty_corpus_is_an_error_before_caching(tmp_path):
  (tmp_path / "a.txt").write_text("")
  (tmp_path / "b.txt").write_text("")
  with pytest.raises(ValueError, match="empty corpus"):
    build_pipeline(cfg(f"{tmp_path}/*.txt"), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "data_cache")


def test_corpus_without_usable_documents_is_an_error_and_caches_nothing(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"x": 1}\n{bad\n{"text": null}\n')
  with pytest.raises(ValueError, match="empty corpus"):
    build_pipeline(cfg(str(tmp_path / "a.jsonl")), str(tmp_path / "w"))
  assert os.listdir(tmp_path / "w" / "data_cache") == []


def test_missing_file_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    build_pipeline(cfg(str(tmp_path / "nope.txt")), str(tmp_path / "w"))


def test_vocab_without_special_tokens_is_an_error_before_caching(tmp_path):
  (tmp_path / "c.txt").write_text(bert_text([doc(i) for i in range(4)]))
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\nthe\nimport\n")
  with pytest.raises(ValueError, match=r"\[SEP\].*\[MASK\]"):
    build_pipeline(cfg(str(tmp_path / "c.txt"), vocab=str(tmp_path / "vocab.txt")),
                   str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_partial_mapping_config_gets_defaults(tmp_path):
  from mbert_jax.data.pipeline import complete_data_config
  c = complete_data_config({"source": "builtin:json*", "batch_size": 4})
  assert c.batch_size == 4 and c.max_seq_length == default_data_config().max_seq_length
  with pytest.raises(TypeError, match="batch_size"):
    complete_data_config({"batch_size": "four"})


def test_bad_config_values_are_named(tmp_path):
  with pytest.raises(ValueError, match="masked_lm_prob"):
    build_pipeline(cfg("builtin", masked_lm_prob=1.5), str(tmp_path))
  with pytest.raises(ValueError, match="max_seq_length"):
    build_pipeline(cfg("builtin", max_seq_length=4), str(tmp_path))
  with pytest.raises(ValueError, match="split"):
    build_pipeline(cfg("builtin"), str(tmp_path), split="test")
  with pytest.raises(ValueError, match="eval"):
    build_pipeline(cfg("builtin:json*", eval_fraction=0.0), str(tmp_path), split="eval")


def test_jsonl_and_parquet_sources_with_a_text_field(tmp_path):
  rows = [{"body": " ".join(doc(i)), "id": i} for i in range(10)]
  (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
  a = build_pipeline(cfg(str(tmp_path / "c.jsonl"), text_field="body"), str(tmp_path / "w"))
  b = build_pipeline(cfg(str(tmp_path / "c.parquet"), text_field="body"), str(tmp_path / "w"))
  # Running text goes through the sentence splitter: six sentences per document.
  assert a.stats["sentences"] == b.stats["sentences"] == 60
  assert a.stats["tokens"] == b.stats["tokens"]
  with pytest.raises(ValueError, match="no column 'text'"):
    build_pipeline(cfg(str(tmp_path / "c.parquet")), str(tmp_path / "w2"))


def test_hub_path_with_wikitext_grouping(tmp_path):
  # A local dataset directory goes through the same datasets.load_dataset call as a hub name.
  repo = tmp_path / "my_wikitext_copy"
  repo.mkdir()
  rows = [" = Alpha = \n", " = = History = = \n", " Alpha began small . It grew . \n", "\n",
          " Later it spread . \n", " = Beta = \n", " Beta is another article . It ends . \n"]
  datasets.Dataset.from_dict({"text": rows}).to_parquet(str(repo / "train.parquet"))
  source = S.Source("my_wikitext_copy", "hub", hub_path=str(repo))
  assert S.grouping_for(source, "auto") == "wikitext"
  assert S.source_fingerprint(source).startswith("hub:")
  settings = dict(text_field="text", sentence_splitter="auto", document_grouping="auto",
                  max_line_chars=1000, max_document_chars=10_000)
  raw = S.load_raw_documents([source], settings, str(tmp_path / "staging"))
  assert [t.split("\n") for t in raw["text"]] == [
      [" Alpha began small . It grew . ", " Later it spread . "],
      [" Beta is another article . It ends . "]]
  # Paragraph lines with several sentences each: `auto` splits them.
  assert set(raw["splitter"]) == {splitting_splitter()}


def test_separate_eval_source(tmp_path):
  (tmp_path / "train.txt").write_text(bert_text([doc(i) for i in range(10)]))
  (tmp_path / "eval.txt").write_text(bert_text([doc(i) for i in range(50, 54)]))
  c = cfg(str(tmp_path / "train.txt"), eval_source=str(tmp_path / "eval.txt"), eval_fraction=0.5)
  train = build_pipeline(c, str(tmp_path / "w"))
  ev = build_pipeline(c, str(tmp_path / "w"), split="eval")
  assert train.stats["documents"] == 10 and ev.stats["documents"] == 4
  assert ev.vocab_size == train.vocab_size  # the vocabulary always comes from training data


def test_multiprocess_tokenization_gives_the_same_corpus(tmp_path, monkeypatch):
  from mbert_jax.data import corpus as corpus_lib
  (tmp_path / "c.txt").write_text(bert_text([doc(i, 8) for i in range(300)]))
  one = build_pipeline(cfg(str(tmp_path / "c.txt")), str(tmp_path / "a"))
  # Spawned workers even for this small corpus, over ranges smaller than a batch.
  monkeypatch.setattr(corpus_lib, "PARALLEL_MIN_DOCUMENTS", 0)
  monkeypatch.setattr(corpus_lib, "BATCH_DOCUMENTS", 16)
  spawned = []
  real_pool = corpus_lib.concurrent.futures.ProcessPoolExecutor
  monkeypatch.setattr(corpus_lib.concurrent.futures, "ProcessPoolExecutor",
                      lambda *a, **k: spawned.append(k["mp_context"].get_start_method())
                      or real_pool(*a, **k))
  two = build_pipeline(cfg(str(tmp_path / "c.txt"), num_proc=2), str(tmp_path / "b"))
  assert spawned == ["spawn"]
  np.testing.assert_array_equal(one.corpus.tokens, two.corpus.tokens)
  np.testing.assert_array_equal(one.batch_at(3)["input_ids"], two.batch_at(3)["input_ids"])


# --------------------------------------------------------------------------- builtin corpus
def test_builtin_documents_are_deterministic_prose():
  first = [(d.name, d.text) for d in iter_builtin_documents("json*")]
  again = [(d.name, d.text) for d in iter_builtin_documents("json*")]
  assert first == again and len(first) >= 2
  text = "\n".join(t for _, t in first)
  assert ">>>" not in text and "def " not in text
  assert "JSON" in text


def test_docstring_cleaning_keeps_prose_drops_code():
  doc = ("Return the sum of the values.\n\n>>> add(1, 2)\n3\n\n"
         "Use :func:`math.fsum` when precision matters.\n\n    x = [i ** 2 for i in y]\n")
  assert clean_docstring(doc) == ["Return the sum of the values.",
                                  "Use math.fsum when precision matters."]


def test_comment_blocks_skip_strings_and_pragmas():
  src = ['# -*- coding: utf-8 -*-', '# This module parses the input files quickly.',
         '# It keeps everything in memory.', 'x = 1', 's = """', '# not a comment inside',
         '"""', '# noqa: E501']
  blocks = comment_blocks(src, string_lines={5, 6, 7})
  assert blocks == [(2, "This module parses the input files quickly. It keeps everything in memory.")]


def test_module_documents_merge_definitions_into_longer_documents():
  src = b'"""Module docstring says what the module is for."""\n' + b"".join(
      f'def f{i}():\n  """Function number {i} does its work quietly and well."""\n'.encode()
      for i in range(40))
  docs = module_documents("m", src, min_chars=300)
  assert len(docs) >= 3 and all(len(d.text) >= 300 for d in docs)
  assert docs[0].name == "m" and docs[1].name.startswith("m.f")
  units = [("a", ["x" * 10]), ("b", ["y" * 10])]
  assert [d.text for d in merge_units(units, 100)] == ["x" * 10 + "\n" + "y" * 10]
