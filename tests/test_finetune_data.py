"""GLUE loading/encoding and SQuAD windowed features + span decoding, on a tiny WordPiece vocab."""

import json
import string

import numpy as np
import pytest

from mbert_jax.finetune import defaults, squad, glue as tasks
from mbert_jax.finetune.metrics import squad_metrics

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = """hello from cafe muller in zurich the golden gate bridge is red what color who
built it a an of and to was where city river north south east west alpha beta gamma delta
epsilon zeta theta kappa lambda sigma omega park tower old new stone wood long short day
night sun moon rain""".split()


@pytest.fixture(scope="module")
def tokenizer():
  chars = string.ascii_lowercase + string.digits
  vocab = SPECIALS + list(chars + string.punctuation) + ["##" + c for c in chars] + WORDS
  return tasks.build_wordpiece_tokenizer(list(dict.fromkeys(vocab)))


def _ids(tok, text):
  return tok.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------
# GLUE: registry, encoding
# ------------------------------------------------------------------------------------------


def test_registry_covers_glue():
  assert set(tasks.GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli",
                                   "rte", "wnli", "ax"}
  assert tasks.get_task("STS-B").num_labels == 1 and tasks.get_task("stsb").is_regression
  assert tasks.get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
  assert tasks.get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
  assert tasks.get_task("mrpc").hub == ("nyu-mll/glue", "mrpc")
  assert tasks.get_task("cola").main_metric == "matthews_correlation"
  assert not tasks.get_task("sst2").is_pair and tasks.get_task("qnli").is_pair
  with pytest.raises(ValueError, match="unknown GLUE task"):
    tasks.get_task("imdb")
  glue = defaults.glue_defaults("stsb")
  assert glue["learning_rate"] == 5e-5 and glue["num_labels"] == 1 and glue["num_epochs"] == 3
  sq = defaults.squad_defaults("2.0")
  assert sq["version_2_with_negative"] and sq["doc_stride"] == 128 and sq["learning_rate"] == 4e-5


def test_encode_pair_layout(tokenizer):
  out = tasks.encode_pairs(tokenizer, ["Hello from Zurich"], ["what color?"], 12)
  cls, sep, pad = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
  a, b = _ids(tokenizer, "hello from zurich"), _ids(tokenizer, "what color ?")
  expected = [cls, *a, sep, *b, sep]
  expected += [pad] * (12 - len(expected))
  np.testing.assert_array_equal(out["input_ids"][0], expected)
  np.testing.assert_array_equal(out["token_type_ids"][0], [0] * 5 + [1] * 4 + [0] * 3)
  np.testing.assert_array_equal(out["attention_mask"][0], [1] * 9 + [0] * 3)
  assert all(v.dtype == np.int32 and v.shape == (1, 12) for v in out.values())
  single = tasks.encode_pairs(tokenizer, ["hello", "red sun"], None, 5)
  np.testing.assert_array_equal(single["input_ids"][1], [cls, *_ids(tokenizer, "red sun"),
                                                          sep, pad])
  assert not single["token_type_ids"].any()


def _reference_truncation(len_a, len_b, max_tokens):
  # BERT's loop, one token at a time.
  while len_a + len_b > max_tokens:
    if len_a > len_b:
      len_a -= 1
    else:
      len_b -= 1
  return len_a, len_b


def test_longest_first_truncation(tokenizer):
  for la in range(0, 12):
    for lb in range(0, 12):
      for m in range(0, 14):
        assert tasks.truncated_lengths(la, lb, m) == _reference_truncation(la, lb, m)
  text_a = "alpha beta gamma delta epsilon zeta theta"  # 7 tokens
  text_b = "red sun"                                   # 2 tokens
  out = tasks.encode_pairs(tokenizer, [text_a], [text_b], 9)  # budget 6: a keeps 4, b keeps 2
  cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
  a, b = _ids(tokenizer, text_a), _ids(tokenizer, text_b)
  np.testing.assert_array_equal(out["input_ids"][0], [cls, *a[:4], sep, *b, sep])


def test_encode_ignores_tokenizer_truncation_and_checks_vocab(tokenizer):
  from tokenizers import Tokenizer
  tok = Tokenizer.from_str(tokenizer.to_str())
  tok.enable_truncation(2)
  out = tasks.encode_pairs(tok, ["alpha beta gamma delta"], None, 8)
  assert out["attention_mask"].sum() == 6
  assert tok.truncation is not None  # the caller's tokenizer is left as it was
  with pytest.raises(ValueError, match=r"lacks the special tokens \['\[PAD\]'\]"):
    tasks.build_wordpiece_tokenizer(["[UNK]", "[CLS]", "[SEP]"])
  with pytest.raises(ValueError, match="differ in length"):
    tasks.encode_pairs(tokenizer, ["a", "b"], ["c"], 8)
  with pytest.raises(ValueError, match="single string"):
    tasks.encode_pairs(tokenizer, "hello", None, 8)
  with pytest.raises(ValueError, match="no room"):
    tasks.encode_pairs(tokenizer, ["a"], ["b"], 2)


# ------------------------------------------------------------------------------------------
# GLUE: loading local files
# ------------------------------------------------------------------------------------------


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


def test_load_original_glue_tsv_layouts(tmp_path, tokenizer):
  # MRPC: original header; quotes are literal text in GLUE TSVs.
  _write(tmp_path / "train.tsv",
         "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
         '1\t11\t12\tHe said "hello.\tHello, he said.\n'
         "0\t13\t14\tThe river is long\tThe tower is old\n")
  mrpc = tasks.load_glue("mrpc", tmp_path, "train")
  assert mrpc.column_names == ["sentence1", "sentence2", "label", "idx"]
  assert mrpc["sentence1"][0] == 'He said "hello.' and mrpc["label"][:] == [1, 0]
  assert mrpc["idx"][:] == [0, 1]
  batch = tasks.encode_glue("mrpc", mrpc, tokenizer, 16)
  assert batch["input_ids"].shape == (2, 16) and batch["labels"].tolist() == [1, 0]
  assert batch["labels"].dtype == np.int32

  # CoLA train/dev ship without a header; test has one.
  cola_dir = tmp_path / "cola"
  cola_dir.mkdir()
  _write(cola_dir / "dev.tsv", "gj04\t1\t\tOur friends won't buy it.\n"
                               "gj04\t0\t*\tOne more pseudo generalization.\n")
  _write(cola_dir / "test.tsv", "index\tsentence\n0\tBill left.\n")
  cola = tasks.load_glue("cola", cola_dir, "validation")
  assert cola["sentence"][:] == ["Our friends won't buy it.", "One more pseudo generalization."]
  assert cola["label"][:] == [1, 0]
  cola_test = tasks.load_glue("cola", cola_dir, "test")
  assert cola_test["label"][:] == [-1] and cola_test["sentence"][:] == ["Bill left."]

  # MNLI: string labels, dev_matched file name, many extra columns.
  mnli_dir = tmp_path / "mnli"
  mnli_dir.mkdir()
  header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
            "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
  rows = ["7\tp\tq\tfiction\t(\t(\t(\t(\tA man sleeps.\tA man rests.\tneutral\tentailment",
          "8\tp\tq\tfiction\t(\t(\t(\t(\tIt is day.\tIt is night.\tcontradiction\tcontradiction"]
  _write(mnli_dir / "dev_matched.tsv", header + "\n".join(rows) + "\n")
  mnli = tasks.load_glue("mnli", mnli_dir, "validation_matched")
  assert mnli["premise"][:] == ["A man sleeps.", "It is day."]
  assert mnli["label"][:] == [0, 2] and mnli["idx"][:] == [7, 8]
  with pytest.raises(ValueError, match="validation_matched"):
    tasks.load_glue("mnli", mnli_dir, "validation")


def test_load_glue_csv_json_and_column_maps(tmp_path):
  # STS-B from a CSV with custom names → float labels.
  _write(tmp_path / "sts.csv", 'first,second,similarity\n"A, quoted",B,3.8\nC,D,0\n')
  stsb = tasks.load_glue("stsb", tmp_path / "sts.csv", "train",
                         column_map={"first": "sentence1", "second": "sentence2",
                                     "similarity": "label"})
  assert stsb["sentence1"][0] == "A, quoted"
  np.testing.assert_allclose(stsb["label"][:], [3.8, 0.0], rtol=1e-6)
  # RTE as JSON lines in the hub layout, found by split name; label names are mapped.
  lines = [{"sentence1": "x", "sentence2": "y", "label": "not_entailment", "idx": 5},
           {"sentence1": "z", "sentence2": "w", "label": 0, "idx": 6}]
  _write(tmp_path / "validation.jsonl", "\n".join(json.dumps(r) for r in lines))
  rte = tasks.load_glue("rte", tmp_path, "validation")
  assert rte["label"][:] == [1, 0] and rte["idx"][:] == [5, 6]
  # A dict of split → files, and a JSON list file.
  _write(tmp_path / "sst.json", json.dumps([{"text": "good", "y": "positive"}]))
  sst = tasks.load_glue("sst2", {"train": tmp_path / "sst.json"}, "train",
                        column_map={"text": "sentence", "y": "label"})
  assert sst["label"][:] == [1]


def test_load_glue_errors(tmp_path):
  _write(tmp_path / "bad_label.tsv", "sentence\tlabel\nnice\tmaybe\n")
  with pytest.raises(ValueError, match="unknown label 'maybe'"):
    tasks.load_glue("sst2", tmp_path / "bad_label.tsv")
  _write(tmp_path / "range.tsv", "sentence\tlabel\nnice\t3\n")
  with pytest.raises(ValueError, match="out of range"):
    tasks.load_glue("sst2", tmp_path / "range.tsv")
  _write(tmp_path / "cols.tsv", "text\tlabel\nnice\t1\n")
  with pytest.raises(ValueError, match="lacks text column 'sentence'"):
    tasks.load_glue("sst2", tmp_path / "cols.tsv")
  _write(tmp_path / "ragged.tsv", "sentence\tlabel\nnice\t1\textra\n")
  with pytest.raises(ValueError, match="ragged.tsv:2"):
    tasks.load_glue("sst2", tmp_path / "ragged.tsv")
  with pytest.raises(FileNotFoundError, match="dev.tsv"):
    tasks.load_glue("sst2", tmp_path, "validation")
  with pytest.raises(ValueError, match="no split 'dev'"):
    tasks.load_glue("sst2", tmp_path, "dev")


def test_load_glue_from_in_memory_dataset():
  import datasets
  ds = datasets.DatasetDict({"validation": datasets.Dataset.from_dict(
      {"question": ["q?"], "sentence": ["s."], "label": [1], "idx": [3]})})
  qnli = tasks.load_glue("qnli", ds, "validation")
  assert qnli.to_list() == [{"question": "q?", "sentence": "s.", "label": 1, "idx": 3}]


# ------------------------------------------------------------------------------------------
# SQuAD: features
# ------------------------------------------------------------------------------------------

FILLER = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega park tower old "
          "new stone wood long short day night sun moon rain river north south east west city")


def _long_example(answer_at_word=60, repeats=4):
  words = (FILLER.split() * repeats)
  head = " ".join(words[:answer_at_word])
  tail = " ".join(words[answer_at_word:])
  context = f"{head} The Golden Gate Bridge, {tail}"
  answer = "Golden Gate Bridge"
  start = context.index(answer)
  return {"id": "long", "question": "What is red?", "context": context,
          "answers": {"text": [answer], "answer_start": [start]}}


def _window_token_spans(features, f):
  in_ctx = np.flatnonzero(features.offsets[f, :, 0] >= 0)
  return in_ctx[0], in_ctx[-1]


def test_features_label_every_window_that_holds_the_answer(tokenizer):
  ex = _long_example()
  context, answer = ex["context"], ex["answers"]["text"][0]
  start_char = ex["answers"]["answer_start"][0]
  end_char = start_char + len(answer)
  feats = squad.prepare_squad_features([ex], tokenizer, max_seq_length=40, doc_stride=12,
                                       max_query_length=8)
  assert len(feats) >= 5
  labelled = 0
  for f in range(len(feats)):
    first, last = _window_token_spans(feats, f)
    window_chars = (feats.offsets[f, first, 0], feats.offsets[f, last, 1])
    holds_answer = window_chars[0] <= start_char and end_char <= window_chars[1]
    s, e = feats.start_positions[f], feats.end_positions[f]
    if holds_answer:
      labelled += 1
      assert context[feats.offsets[f, s, 0]:feats.offsets[f, e, 1]] == answer
    else:
      assert s == 0 and e == 0
    # Row layout: [CLS] question [SEP] context [SEP] [PAD]...
    q = _ids(tokenizer, ex["question"])
    assert feats.input_ids[f, 0] == tokenizer.token_to_id("[CLS]")
    assert feats.input_ids[f, 1:1 + len(q)].tolist() == q
    assert first == len(q) + 2 and feats.token_type_ids[f, first - 1] == 0
    assert feats.token_type_ids[f, first:last + 2].all()
    assert feats.input_ids[f, last + 1] == tokenizer.token_to_id("[SEP]")
    assert feats.attention_mask[f].sum() == last + 2
  assert labelled >= 2  # stride 12 over a 3-token answer: it lies in several windows


def test_windows_stride_coverage_and_max_context(tokenizer):
  ex = _long_example()
  doc = tokenizer.encode(ex["context"], add_special_tokens=False)
  feats = squad.prepare_squad_features([ex], tokenizer, max_seq_length=40, doc_stride=12,
                                       max_query_length=8)
  q_len = len(_ids(tokenizer, ex["question"]))
  window = 40 - q_len - 3
  starts_chars = [doc.offsets[i][0] for i in range(len(doc.ids))]
  seen = {}
  for f in range(len(feats)):
    first, last = _window_token_spans(feats, f)
    # The window's first context token is token f·stride of the whole context.
    assert feats.offsets[f, first, 0] == starts_chars[12 * f]
    assert last - first + 1 == window or f == len(feats) - 1
    for pos in range(first, last + 1):
      token = starts_chars.index(feats.offsets[f, pos, 0])
      score = min(pos - first, last - pos) + 0.01 * (last - first + 1)
      seen.setdefault(token, []).append((score, f, bool(feats.token_is_max_context[f, pos])))
  assert sorted(seen) == list(range(len(doc.ids)))  # every context token is covered
  for token, views in seen.items():
    owners = [f for _, f, is_max in views if is_max]
    best = max(views, key=lambda v: (v[0], -v[1]))  # highest score, earliest window on ties
    assert owners == [best[1]], token
  assert not feats.token_is_max_context[:, 0].any()


def test_feature_edge_cases(tokenizer):
  short = {"id": "s", "question": "What?", "context": "Hello from Café Müller.",
           "answers": {"text": ["Café Müller"], "answer_start": [11]}}
  impossible = {"id": "i", "question": "Who?", "context": "The sun is red.",
                "answers": {"text": [], "answer_start": []}}
  with pytest.raises(ValueError, match="version_2_with_negative"):
    squad.prepare_squad_features([impossible], tokenizer)
  feats = squad.prepare_squad_features([short, impossible], tokenizer, max_seq_length=32,
                                       version_2_with_negative=True)
  assert len(feats) == 2 and feats.example_index.tolist() == [0, 1]
  s, e = feats.start_positions[0], feats.end_positions[0]
  assert short["context"][feats.offsets[0, s, 0]:feats.offsets[0, e, 1]] == "Café Müller"
  assert feats.start_positions[1] == 0 and feats.end_positions[1] == 0
  # An answer on whitespace covers no token: kept (labelled [CLS]) for evaluation,
  # skipped with a warning for training.
  blank = {"id": "b", "question": "Q", "context": "red  sun",
           "answers": {"text": [" "], "answer_start": [4]}}
  assert squad.prepare_squad_features([blank], tokenizer, 16).start_positions.tolist() == [0]
  with pytest.warns(UserWarning, match="skipped 1"):
    assert len(squad.prepare_squad_features([blank], tokenizer, 16, is_training=True)) == 0
  bad = dict(short, answers={"text": ["x"], "answer_start": [99]})
  with pytest.raises(ValueError, match="outside"):
    squad.prepare_squad_features([bad], tokenizer)
  with pytest.raises(ValueError, match="no room"):
    squad.prepare_squad_features([short], tokenizer, max_seq_length=5, max_query_length=4)


# ------------------------------------------------------------------------------------------
# SQuAD: decoding
# ------------------------------------------------------------------------------------------


def _zeros(feats):
  return np.zeros(feats.input_ids.shape), np.zeros(feats.input_ids.shape)


def test_decode_oracle_logits_recovers_answers_across_windows(tokenizer):
  ex = _long_example()
  feats = squad.prepare_squad_features([ex], tokenizer, max_seq_length=40, doc_stride=12,
                                       max_query_length=8)
  start, end = _zeros(feats)
  rows = np.arange(len(feats))
  start[rows, feats.start_positions] = 5.0  # [CLS] in windows without the answer
  end[rows, feats.end_positions] = 5.0
  out = squad.postprocess_squad_predictions([ex], feats, start, end)
  assert out.predictions == {"long": "Golden Gate Bridge"}
  assert squad_metrics(out.predictions, [ex])["exact_match"] == 100.0
  texts = [x["text"] for x in out.nbest["long"]]
  assert len(texts) == len(set(texts)) <= 20  # one entry per distinct text
  assert sum(x["probability"] for x in out.nbest["long"]) == pytest.approx(1.0)


@pytest.mark.parametrize("layout", ["modernbert", "eurobert"])
def test_byte_level_bpe_answers_carry_no_leading_space(layout):
  """A byte-level BPE folds the space before a word into its token (" France"); the answers
  read back through the token offsets are the gold text itself, not " France"."""
  import itertools

  from mbert_jax.data import bpe
  from mbert_jax.data.builtin_corpus import iter_builtin_documents
  tok = bpe.train_bpe((d.text for d in itertools.islice(iter_builtin_documents(), 200)), 1024,
                      layout)
  ctx = ("The Normans were the people who in the 10th and 11th centuries gave their name to "
         "Normandy, a region in  France.")
  answers = ["The Normans", "France", "10th and 11th centuries"]
  examples = [{"id": str(i), "question": f"What is answer {i}?", "context": ctx,
               "answers": {"text": [a], "answer_start": [ctx.index(a)]}}
              for i, a in enumerate(answers)]
  feats = squad.prepare_squad_features(examples, tok, max_seq_length=64, doc_stride=16,
                                       max_query_length=16)
  assert any(ctx[s - 1] == " " for s, e in feats.offsets.reshape(-1, 2) if s > 0)
  start, end = _zeros(feats)
  rows = np.arange(len(feats))
  start[rows, feats.start_positions] = 5.0
  end[rows, feats.end_positions] = 5.0
  out = squad.postprocess_squad_predictions(examples, feats, start, end)
  assert out.predictions == {str(i): a for i, a in enumerate(answers)}


def test_decode_skips_invalid_spans(tokenizer):
  ex = {"id": "q", "question": "What?", "context": "alpha beta gamma delta epsilon zeta",
        "answers": {"text": ["gamma"], "answer_start": [11]}}
  feats = squad.prepare_squad_features([ex], tokenizer, max_seq_length=16)
  c = int(np.flatnonzero(feats.offsets[0, :, 0] >= 0)[0])  # alpha=c, beta=c+1, ... zeta=c+5
  start = np.full(feats.input_ids.shape, -10.0)
  end = np.full(feats.input_ids.shape, -10.0)
  start[0, 0] = end[0, 0] = 50.0   # [CLS]: 100, not a span in v1.1
  start[0, 1] = end[0, 1] = 40.0   # question token: 80, outside the context
  start[0, c + 4] = 30.0           # epsilon..beta: 60, but end < start
  end[0, c + 1] = 30.0
  start[0, c + 2] = end[0, c + 2] = 15.0
  # Valid: gamma..gamma 30; alpha..beta and beta..beta 20; epsilon..zeta 20; rest lower.
  out = squad.postprocess_squad_predictions([ex], feats, start, end)
  assert out.predictions["q"] == "gamma"
  assert out.nbest["q"][0]["score"] == 30.0
  # alpha..zeta scores 120 but spans 6 tokens: allowed at max_answer_length 6 only.
  start[0, c] = 60.0
  end[0, c + 5] = 60.0
  full = squad.postprocess_squad_predictions([ex], feats, start, end, max_answer_length=6)
  assert full.predictions["q"] == "alpha beta gamma delta epsilon zeta"
  cut = squad.postprocess_squad_predictions([ex], feats, start, end, max_answer_length=5)
  assert cut.predictions["q"] == "alpha beta"  # 60 + 30, the best span of <= 5 tokens
  with pytest.raises(ValueError, match="shape"):
    squad.postprocess_squad_predictions([ex], feats, start[:, :3], end)
  with pytest.raises(ValueError, match="do not match"):
    squad.postprocess_squad_predictions([dict(ex, id="other")], feats, start, end)


def test_decode_prefers_max_context_start(tokenizer):
  ex = _long_example()
  feats = squad.prepare_squad_features([ex], tokenizer, max_seq_length=40, doc_stride=12,
                                       max_query_length=8)
  start = np.full(feats.input_ids.shape, -100.0)
  end = np.full(feats.input_ids.shape, -10.0)
  # The top span (200) starts at a token window 1 sees but does not own: skipped ...
  not_owned = np.flatnonzero((feats.offsets[1, :, 0] >= 0) & ~feats.token_is_max_context[1])
  assert not_owned.size
  p = int(not_owned[-1])
  start[1, p] = end[1, p] = 100.0
  # ... so a span scoring 2 that starts at a token window 0 owns wins (any span of window 1
  # ending at p starts at -100 and scores at most 0).
  owned = int(np.flatnonzero(feats.token_is_max_context[0])[0])
  start[0, owned] = end[0, owned] = 1.0
  out = squad.postprocess_squad_predictions([ex], feats, start, end)
  context = ex["context"]
  assert out.predictions["long"] == context[feats.offsets[0, owned, 0]:
                                            feats.offsets[0, owned, 1]]
  assert out.nbest["long"][0]["score"] == 2.0


def test_decode_v2_null_decisions(tokenizer):
  ex = _long_example()
  feats = squad.prepare_squad_features([ex], tokenizer, max_seq_length=40, doc_stride=12,
                                       max_query_length=8, version_2_with_negative=True)
  rows = np.arange(len(feats))
  # A window holding the answer and owning its first token.
  f = int(np.flatnonzero((feats.start_positions > 0)
                         & feats.token_is_max_context[rows, feats.start_positions])[0])
  s, e = feats.start_positions[f], feats.end_positions[f]
  start = np.full(feats.input_ids.shape, -10.0)
  end = np.full(feats.input_ids.shape, -10.0)
  start[:, 0] = end[:, 0] = 4.0
  start[2, 0] = 1.0              # null score = min over windows of [CLS] sums = 1 + 4 = 5
  start[f, s] = end[f, e] = 2.0  # best span 2 + 2 = 4 → diff 5 − 4 = 1
  args = dict(version_2_with_negative=True)
  out = squad.postprocess_squad_predictions([ex], feats, start, end, **args)
  assert out.null_score_diff["long"] == pytest.approx(1.0)
  assert out.predictions["long"] == ""  # 1 > 0
  assert out.nbest["long"][0]["text"] == "" and out.nbest["long"][0]["score"] == 5.0
  out = squad.postprocess_squad_predictions([ex], feats, start, end,
                                            null_score_diff_threshold=1.0, **args)
  assert out.predictions["long"] == "Golden Gate Bridge"  # 1 ≤ 1
  start[f, s] = 3.0              # span 5 → diff 0, not above the default threshold
  out = squad.postprocess_squad_predictions([ex], feats, start, end, **args)
  assert out.predictions["long"] == "Golden Gate Bridge"
  assert out.null_score_diff["long"] == pytest.approx(0.0)
  # No valid span at all: with one start candidate per window and [CLS] the top start
  # everywhere, nothing starts in the context → "" with an infinite diff.
  start[:, :] = -10.0
  start[:, 0] = 4.0
  none = squad.postprocess_squad_predictions([ex], feats, start, end, n_best_size=1, **args)
  assert none.predictions["long"] == "" and none.null_score_diff["long"] == np.inf
  assert [x["text"] for x in none.nbest["long"]] == [""]
  # -inf logits mark impossible positions: such spans are never candidates.
  masked = np.where(feats.offsets[..., 0] >= 0, -np.inf, end)
  out = squad.postprocess_squad_predictions([ex], feats, start, masked, **args)
  assert out.predictions["long"] == "" and out.null_score_diff["long"] == np.inf


def test_squad_v2_end_to_end_from_json(tmp_path, tokenizer):
  context = "The Golden Gate Bridge is red. It was built in 1937 by Strauss."
  data = {"version": "v2.0", "data": [{"title": "Bridge", "paragraphs": [{
      "context": context,
      "qas": [
          {"id": "q1", "question": "What color?", "is_impossible": False,
           "answers": [{"text": "red", "answer_start": context.index("red")}]},
          {"id": "q2", "question": "Who painted it?", "is_impossible": True, "answers": [],
           "plausible_answers": [{"text": "Strauss", "answer_start": context.index("Str")}]},
          {"id": "q3", "question": "When?", "is_impossible": False,
           "answers": [{"text": "1937", "answer_start": context.index("1937")}]},
      ]}]}]}
  (tmp_path / "dev-v2.0.json").write_text(json.dumps(data), encoding="utf-8")
  examples = squad.load_squad(tmp_path, version="2.0", split="validation")
  assert examples["id"][:] == ["q1", "q2", "q3"]
  assert examples[1]["answers"] == {"text": [], "answer_start": []}  # plausible ≠ gold
  with pytest.raises(ValueError, match="version='2.0'"):
    squad.load_squad(tmp_path / "dev-v2.0.json", version="1.1")
  with pytest.raises(FileNotFoundError):
    squad.load_squad(tmp_path / "missing.json")

  feats = squad.prepare_squad_features(examples, tokenizer, max_seq_length=24, doc_stride=4,
                                       max_query_length=8, version_2_with_negative=True)
  start, end = _zeros(feats)
  rows = np.arange(len(feats))
  start[rows, feats.start_positions] = 8.0
  end[rows, feats.end_positions] = 8.0
  out = squad.postprocess_squad_predictions(examples, feats, start, end,
                                            version_2_with_negative=True)
  assert out.predictions == {"q1": "red", "q2": "", "q3": "1937"}
  result = squad_metrics(out.predictions, examples, na_probs=out.null_score_diff,
                         version="2.0")
  assert result["exact_match"] == 100.0 and result["f1"] == 100.0
  assert result["NoAns_total"] == 1 and result["best_f1"] == 100.0

  # The same data as JSON lines of flat examples.
  flat = tmp_path / "flat.jsonl"
  flat.write_text("\n".join(json.dumps(r) for r in examples.to_list()), encoding="utf-8")
  assert squad.load_squad(flat, version="2.0").to_list() == examples.to_list()
