"""How sources are read and what of them reaches the examples: `auto` sentence splitting, token
accounting and its warning, binary input, and building without forking a JAX process."""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest

from mbert_jax.data import accounting, build_pipeline, default_data_config
from mbert_jax.data import readers
from mbert_jax.data import text as text_lib
from mbert_jax.data.builtin_corpus import iter_builtin_documents
from mbert_jax.data.text import sentences_of

datasets.disable_progress_bars()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 128
DOCS, PER_DOC = 40, 25


@pytest.fixture(scope="module")
def documents() -> list[list[str]]:
  """Real English sentences (Python's help topics), short enough that BERT's pairing at
  SEQ tokens cuts little: DOCS documents of PER_DOC sentences."""
  sents = [s for d in iter_builtin_documents("topics*") for s in sentences_of(d.text, "regex")
           if 30 <= len(s) <= 110 and s[-1] in ".?!"]
  assert len(sents) >= DOCS * PER_DOC
  return [sents[i:i + PER_DOC] for i in range(0, DOCS * PER_DOC, PER_DOC)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, documents) -> dict[str, str]:
  d = tmp_path_factory.mktemp("reading")
  per_line = d / "articles.txt"  # one document per line, blank line between (most dumps)
  per_line.write_text("\n\n".join(" ".join(doc) for doc in documents) + "\n")
  bert = d / "sentences.txt"  # BERT's format: one sentence per line
  bert.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n")
  return {"articles": str(per_line), "sentences": str(bert)}


def cfg(source: str, **overrides):
  c = default_data_config()
  c.source, c.vocab, c.num_proc, c.eval_fraction = source, "train:600", 1, 0.0
  c.max_seq_length, c.max_predictions_per_seq, c.batch_size = SEQ, 20, 8
  for k, v in overrides.items():
    c[k] = v
  return c


def brute_force_used(pipe) -> int:
  mask = np.zeros(len(pipe.corpus.tokens), dtype=bool)
  for a0, a1, b0, b1, _ in pipe.instances(0).tolist():
    mask[a0:a1] = True
    mask[b0:b1] = True
  return int(mask.sum())


def drop_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if "DATA WARNING" in r.getMessage()]


@pytest.fixture(scope="module")
def built(files, tmp_path_factory):
  work = tmp_path_factory.mktemp("work")
  return {name: build_pipeline(cfg(path), str(work)) for name, path in files.items()}


def test_auto_splits_documents_per_line_and_keeps_sentences_per_line(built, documents):
  articles, sentences = (built[k].stats for k in ("articles", "sentences"))
  (a,), (s,) = articles["sentence_splitters"], sentences["sentence_splitters"]
  assert a["setting"] == s["setting"] == "auto"
  assert a["splitter"] == text_lib.splitting_splitter() and s["splitter"] == "lines"
  assert a["evidence"]["mean_sentences_per_line"] > 10 > s["evidence"]["mean_sentences_per_line"]
  assert sentences["sentences"] == DOCS * PER_DOC
  # The splitter finds nearly all the sentences joined into each line (the regex fallback
  # misses those followed by one that starts in lower case, e.g. with an identifier).
  assert abs(articles["sentences"] - DOCS * PER_DOC) <= 0.1 * DOCS * PER_DOC
  assert articles["tokens_read"] == sentences["tokens_read"]


def test_example_counts_follow_the_token_counts(built):
  for pipe in built.values():
    acc = pipe.stats["token_accounting"]
    assert acc["tokens_used"] == brute_force_used(pipe)
    assert acc["tokens_used"] + sum(acc["tokens_dropped"].values()) == acc["tokens_read"]
    assert acc["tokens_dropped"]["one_sentence_documents"] == 0
    # Truncation is all that is lost, and little of it with these short sentences ...
    assert acc["dropped_fraction"] < accounting.DROP_WARNING_FRACTION
    # ... so the examples hold the text: at most SEQ - 3 tokens of it each.
    assert acc["tokens_used"] <= acc["examples"] * (SEQ - 3)
    assert acc["examples_per_million_tokens"] >= 0.9e6 / (SEQ - 3)
  per_m = [p.stats["token_accounting"]["examples_per_million_tokens"] for p in built.values()]
  assert max(per_m) / min(per_m) < 1.15  # the same text, read two ways


def test_lines_on_documents_per_line_loses_the_text_and_warns(files, tmp_path, caplog, built):
  with caplog.at_level(logging.WARNING):
    lines = build_pipeline(cfg(files["articles"], sentence_splitter="lines"), str(tmp_path))
  acc = lines.stats["token_accounting"]
  assert lines.stats["flagged_documents"]["one_sentence"] == DOCS
  assert lines.stats["nsp_random_rate"] == 1.0
  assert acc["dropped_fraction"] > 0.8
  assert acc["tokens_dropped"]["one_sentence_documents"] > 0.8 * acc["tokens_read"]
  assert lines.num_examples < 0.2 * built["articles"].num_examples
  (message,) = drop_warnings(caplog)
  assert "data.sentence_splitter=auto" in message and f"{acc['tokens_read']:,}" in message


def test_no_warning_when_little_is_lost(files, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    pipe = build_pipeline(cfg(files["articles"]), str(tmp_path))
  assert pipe.stats["token_accounting"]["dropped_fraction"] < accounting.DROP_WARNING_FRACTION
  assert drop_warnings(caplog) == []


def test_skipped_documents_are_counted_and_named(documents, tmp_path, caplog):
  # Half the documents keep 4 sentences: under min_document_sentences=5 they are dropped whole.
  docs = [doc if k % 2 else doc[:4] for k, doc in enumerate(documents)]
  path = tmp_path / "mixed.txt"
  path.write_text("\n\n".join("\n".join(doc) for doc in docs) + "\n")
  with caplog.at_level(logging.WARNING):
    pipe = build_pipeline(cfg(str(path), min_document_sentences=5), str(tmp_path / "w"))
  acc = pipe.stats["token_accounting"]
  assert pipe.stats["skipped_documents"] == {"too_few_sentences": DOCS // 2}
  skipped = pipe.stats["skipped_tokens"]["too_few_sentences"]
  assert acc["tokens_dropped"]["skipped_documents"] == skipped > 0.1 * acc["tokens_read"]
  assert acc["tokens_read"] == pipe.stats["tokens"] + skipped
  (message,) = drop_warnings(caplog)
  assert "data.min_document_sentences=1" in message


def test_accounting_is_in_the_cache_metadata(built):
  import json
  pipe = built["articles"]
  with open(os.path.join(pipe.corpus.directory, "stats.json")) as f:
    stats = json.load(f)
  assert stats["tokens_read"] == pipe.stats["token_accounting"]["tokens_read"]
  assert stats["sentence_splitters"][0]["evidence"]["lines"] == DOCS
  saved = [f for f in os.listdir(pipe.corpus.directory) if f.endswith(".accounting.json")]
  with open(os.path.join(pipe.corpus.directory, saved[0])) as f:
    assert json.load(f) == pipe.stats["token_accounting"]


def test_covered_tokens_per_document_equals_a_token_mask():
  rng = np.random.default_rng(0)
  doc_lengths = rng.integers(1, 40, size=30)
  sentence_offsets = np.concatenate([[0], np.cumsum(doc_lengths)])  # one sentence per document
  document_offsets = np.arange(31)
  rows = []
  for _ in range(60):
    d = int(rng.integers(0, 30))
    lo = int(sentence_offsets[d])
    a0, a1 = sorted(rng.integers(lo, lo + doc_lengths[d] + 1, size=2).tolist())
    e = int(rng.integers(0, 30))
    b0, b1 = sorted(rng.integers(sentence_offsets[e], sentence_offsets[e + 1] + 1, size=2).tolist())
    rows.append((a0, a1, b0, b1, int(d != e)))
  table = np.asarray(rows, dtype=np.int64)
  got = accounting.covered_tokens_per_document(table, sentence_offsets, document_offsets)
  mask = np.zeros(int(sentence_offsets[-1]), dtype=bool)
  for a0, a1, b0, b1, _ in rows:
    mask[a0:a1] = mask[b0:b1] = True
  want = [int(mask[sentence_offsets[d]:sentence_offsets[d + 1]].sum()) for d in range(30)]
  assert got.tolist() == want


def test_reading_evidence_on_shapes():
  sentence_lines = ["The parser reads the file.", "Each line is one sentence.", "Dr. No is a film."]
  assert text_lib.choose_reading(text_lib.line_evidence(sentence_lines)) == "lines"
  paragraphs = ["It starts here. Then it goes on. And it ends there."] * 5
  assert text_lib.choose_reading(text_lib.line_evidence(paragraphs)) != "lines"
  one_long_sentence_each = ["word " * 400] * 5  # no sentence ends at all, but far too long
  assert text_lib.choose_reading(text_lib.line_evidence(one_long_sentence_each)) != "lines"
  assert text_lib.choose_reading(text_lib.line_evidence([])) == "lines"


def test_explicit_library_splitter_needs_the_package(monkeypatch):
  monkeypatch.setattr(text_lib, "_blingfire", lambda: None)
  assert text_lib.splitting_splitter() == "regex"
  with pytest.raises(ValueError, match="pip install blingfire"):
    text_lib.sentences_of("One. Two.", "blingfire")


def test_blingfire_splits_where_the_regex_splitter_fails():
  pytest.importorskip("blingfire")
  text = "He works at Apple Inc. The company makes phones. It is 5 p.m. Please be on time."
  assert text_lib.sentences_of(text, "blingfire") == [
      "He works at Apple Inc.", "The company makes phones.", "It is 5 p.m.",
      "Please be on time."]
  assert len(text_lib.sentences_of(text, "regex")) < 4


# --------------------------------------------------------------------------- not text
def random_bytes(n: int, seed: int = 0) -> bytes:
  return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.bin", "corpus.jsonl"])
def test_random_bytes_are_refused_before_caching(tmp_path, name):
  (tmp_path / name).write_bytes(random_bytes(200_000))
  with pytest.raises(ValueError, match=r"is not text: .*undecodable bytes or control"):
    build_pipeline(cfg(str(tmp_path / name)), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "data_cache") or not os.listdir(
      tmp_path / "w" / "data_cache")


def test_compressed_files_are_named(tmp_path, files):
  with open(files["sentences"], "rb") as f:
    packed = gzip.compress(f.read())
  (tmp_path / "wiki.txt").write_bytes(packed)
  with pytest.raises(ValueError, match="gzip-compressed"):
    build_pipeline(cfg(str(tmp_path / "wiki.txt")), str(tmp_path / "w"))
  (tmp_path / "wiki.txt.gz").write_bytes(packed)  # named as what it is, it is read
  pipe = build_pipeline(cfg(str(tmp_path / "wiki.txt.gz")), str(tmp_path / "w"))
  assert pipe.stats["sentences"] == DOCS * PER_DOC
  (tmp_path / "fake.txt.gz").write_text("plain text")
  assert readers.sniff_file(str(tmp_path / "fake.txt.gz")) == "named .gz but not gzip-compressed"
  (tmp_path / "u16.txt").write_bytes("Some text.".encode("utf-16"))
  assert "UTF-16" in readers.sniff_file(str(tmp_path / "u16.txt"))


def test_binary_files_and_documents_inside_a_corpus_are_skipped_and_counted(tmp_path, files):
  with open(files["sentences"], "rb") as f:
    good = f.read()
  (tmp_path / "a.txt").write_bytes(good)
  (tmp_path / "b.dat").write_bytes(random_bytes(50_000))
  # A text file with one binary document between two good ones.
  (tmp_path / "c.txt").write_bytes(good[:8000] + b"\n\n" + random_bytes(3000, 1).replace(
      b"\n", b" ") + b"\n\n" + good[:8000])
  pipe = build_pipeline(cfg(f"{tmp_path}/*"), str(tmp_path / "w"))
  assert pipe.stats["skipped_documents"] == {"binary": 1, "binary_file": 1}
  assert pipe.stats["documents"] >= DOCS + 2


# --------------------------------------------------------------------------- no fork
FORK_CHECK = """
import concurrent.futures
import jax, jax.numpy as jnp
jnp.ones(3).block_until_ready()  # JAX's threads are running from here on
from mbert_jax.data import build_pipeline, default_data_config, corpus, pairing
# Worker processes even for this small corpus: tokenization in ranges of 8 documents,
# pairing in shards of 8 documents.
corpus.PARALLEL_MIN_DOCUMENTS, corpus.BATCH_DOCUMENTS = 0, 8
pairing.PARALLEL_MIN_SENTENCES, pairing.SHARD_DOCUMENTS = 0, 8
pools = []
real = concurrent.futures.ProcessPoolExecutor
def recording(*args, **kwargs):
  pools.append(kwargs["mp_context"].get_start_method())
  return real(*args, **kwargs)
concurrent.futures.ProcessPoolExecutor = recording
c = default_data_config()
c.source, c.vocab, c.num_proc, c.max_seq_length = {source!r}, "train:300", 2, 64
pipe = build_pipeline(c, {workdir!r})
print("pools", pools, "examples", pipe.num_examples, pipe.batch_at(0)["input_ids"].shape)
"""


def test_building_after_jax_started_never_forks(tmp_path, files):
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  script = FORK_CHECK.format(source=files["articles"], workdir=str(tmp_path))
  result = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True,
                          text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "pools ['spawn', 'spawn'] examples" in result.stdout, result.stdout
  assert "fork" not in result.stderr, result.stderr[-3000:]
