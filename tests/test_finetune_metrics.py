"""GLUE and SQuAD metrics against values worked out by hand (arithmetic in the comments)."""

import math

import numpy as np
import pytest

from mbert_jax.finetune import metrics as M

# ------------------------------------------------------------------------------------------
# Classification / regression metrics
# ------------------------------------------------------------------------------------------


def test_accuracy_and_binary_f1():
  preds = [1, 1, 0, 0, 1]
  labels = [1, 0, 0, 1, 1]
  assert M.accuracy(preds, labels) == pytest.approx(3 / 5)
  # TP = 2 (0, 4), FP = 1 (1), FN = 1 (3): F1 = 2·2 / (2·2 + 1 + 1) = 4/6.
  assert M.f1_binary(preds, labels) == pytest.approx(4 / 6)
  # No positive predicted and none true: undefined → 0.
  assert M.f1_binary([0, 0], [0, 0]) == 0.0
  with pytest.raises(ValueError, match=r"\{0, 1\}"):
    M.f1_binary([0, 2], [0, 1])


def test_matthews_binary_and_edge_cases():
  # TP 2, FP 1, FN 1, TN 2: (2·2 − 1·1) / sqrt(3·3·3·3) = 3/9.
  assert M.matthews_corrcoef([1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]) == pytest.approx(1 / 3)
  assert M.matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
  assert M.matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
  # A constant predictor (or constant labels) makes the denominator 0 → 0, not NaN.
  assert M.matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
  assert M.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0
  assert M.matthews_corrcoef([0, 0, 0], [0, 0, 0]) == 0.0


def test_matthews_three_classes():
  # labels [0,0,1,1,2,2], preds [0,1,1,1,2,0]: correct c = 4, n = 6,
  # true counts t = [2,2,2], predicted counts p = [2,3,1].
  # (c·n − p·t) / sqrt((n² − p·p)(n² − t·t)) = (24 − 12) / sqrt(22 · 24) = 12 / sqrt(528).
  got = M.matthews_corrcoef([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])
  assert got == pytest.approx(12 / math.sqrt(528))


def test_pearson_by_hand():
  # dx = [-1.5,-.5,.5,1.5], dy = [-1.75,.25,1.25,.25]; Σdxdy = 3.5, Σdx² = 5, Σdy² = 4.75.
  assert M.pearson([1, 2, 3, 4], [2, 4, 5, 4]) == pytest.approx(3.5 / math.sqrt(5 * 4.75))
  assert M.pearson([1, 2, 3], [7, 7, 7]) == 0.0  # constant side: no measurable association
  with pytest.raises(ValueError, match="NaN"):
    M.pearson([1.0, float("nan")], [1.0, 2.0])


def test_rankdata_and_spearman_with_ties():
  # Sorted: 10,10 | 20,20,20 | 30 → ranks (1+2)/2, (3+4+5)/3, 6.
  np.testing.assert_allclose(M.rankdata([10, 20, 10, 30, 20, 20]), [1.5, 4, 1.5, 6, 4, 4])
  # Ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred: dx = [-1.5,0,0,1.5],
  # dy = [-1.5,.5,-.5,1.5]; Σdxdy = 4.5, Σdx² = 4.5, Σdy² = 5 → 4.5 / sqrt(22.5).
  assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
  # Monotone but non-linear: Spearman 1, Pearson below 1.
  x = [1, 2, 3, 4, 5]
  y = [1, 8, 27, 64, 125]
  assert M.spearman(x, y) == pytest.approx(1.0)
  assert M.pearson(x, y) < 0.99


def test_input_errors_are_named():
  with pytest.raises(ValueError, match="differ in length"):
    M.accuracy([0, 1], [0])
  with pytest.raises(ValueError, match="zero examples"):
    M.accuracy([], [])
  with pytest.raises(ValueError, match="integer class ids"):
    M.accuracy([0.5, 1.0], [0, 1])


def test_glue_metrics_per_task():
  logits = np.array([[2.0, 1.0], [0.1, 0.9], [0.3, 0.2], [0.0, 5.0]])  # argmax 0,1,0,1
  mrpc = M.glue_metrics("mrpc", logits, [0, 1, 1, 1])
  # acc 3/4; TP 2, FP 0, FN 1 → F1 4/5; combined (0.75 + 0.8) / 2.
  assert mrpc == pytest.approx({"accuracy": 0.75, "f1": 0.8, "combined_score": 0.775})
  assert set(M.glue_metrics("QQP", [1, 0], [1, 0])) == {"accuracy", "f1", "combined_score"}
  cola = M.glue_metrics("cola", [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0])
  assert cola == pytest.approx({"matthews_correlation": 1 / 3})
  stsb = M.glue_metrics("sts-b", np.array([[1.0], [2.0], [3.0], [4.0]]), [2, 4, 5, 4])
  assert stsb["pearson"] == pytest.approx(3.5 / math.sqrt(5 * 4.75))
  # Ranks of [2,4,5,4] = [1, 2.5, 4, 2.5]; vs [1,2,3,4]: Σdxdy = 2.25 + 0 + 0.75 + 0 = 3,
  # Σdx² = 5, Σdy² = 2.25 + 0 + 2.25 + 0 = 4.5 → 3 / sqrt(22.5).
  assert stsb["spearman"] == pytest.approx(3 / math.sqrt(22.5))
  assert stsb["combined_score"] == pytest.approx((stsb["pearson"] + stsb["spearman"]) / 2)
  for task in ("sst2", "mnli", "mnli_matched", "mnli-mm", "qnli", "rte", "wnli"):
    assert M.glue_metrics(task, [0, 2, 1], [0, 2, 2]) == pytest.approx({"accuracy": 2 / 3})
  with pytest.raises(ValueError, match="unknown GLUE task"):
    M.glue_metrics("squad", [0], [0])


def test_glue_score_reproduces_bert_base_leaderboard():
  # BERT-base on the GLUE test server: task scores CoLA 52.1, SST-2 93.5,
  # MRPC (88.9 + 84.8)/2, STS-B (87.1 + 85.8)/2, QQP (71.2 + 89.2)/2, MNLI (84.6 + 83.4)/2,
  # QNLI 90.5, RTE 66.4, WNLI 65.1 → sum 705.1 / 9 = 78.34 (published: 78.3).
  results = {
      "cola": {"matthews_correlation": 0.521},
      "sst2": {"accuracy": 0.935},
      "mrpc": {"f1": 0.889, "accuracy": 0.848},
      "stsb": {"pearson": 0.871, "spearman": 0.858},
      "qqp": {"f1": 0.712, "accuracy": 0.892},
      "mnli-m": {"accuracy": 0.846},
      "mnli-mm": {"accuracy": 0.834},
      "qnli": {"accuracy": 0.905},
      "rte": {"accuracy": 0.664},
      "wnli": {"accuracy": 0.651},
  }
  scores = M.glue_score(results)
  assert scores["glue"] == pytest.approx(705.1 / 9)
  assert scores["mnli"] == pytest.approx(84.0)
  assert scores["mrpc"] == pytest.approx(86.85)
  without_wnli = M.glue_score(results, include_wnli=False)
  assert without_wnli["glue"] == pytest.approx((705.1 - 65.1) / 8)
  del results["rte"]
  with pytest.raises(ValueError, match="rte"):
    M.glue_score(results)
  partial = M.glue_score(results, require_all=False)
  assert partial["glue"] == pytest.approx((705.1 - 66.4) / 8)
  with pytest.raises(ValueError, match="mnli_mismatched"):
    M.glue_score({"mnli_matched": {"accuracy": 0.8}}, require_all=False)


# ------------------------------------------------------------------------------------------
# SQuAD
# ------------------------------------------------------------------------------------------


def test_normalize_answer_rules():
  # lower → drop punctuation → drop articles → collapse spaces.
  assert M.normalize_answer("The  Cat's, hat!") == "cats hat"
  assert M.normalize_answer("an apple a day") == "apple day"
  assert M.normalize_answer("Theatre\tAnthem") == "theatre anthem"  # articles: whole words only
  # Punctuation goes first, so "a-an" becomes "aan", which is no article.
  assert M.normalize_answer("a-an") == "aan"
  assert M.normalize_answer("  A  ") == ""
  assert M.normalize_answer("U.S.") == "us"


def test_exact_and_f1_single_pair():
  assert M.squad_exact("the Eiffel tower", "Eiffel Tower.") == 1
  assert M.squad_exact("Eiffel", "Eiffel Tower") == 0
  # pred [eiffel, tower, in, paris] vs gold [eiffel, tower]: P = 2/4, R = 1 → F1 = 2/3.
  assert M.squad_f1("Eiffel tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
  # Repeated tokens count with multiplicity: [paris, paris] vs [paris]: overlap 1,
  # P = 1/2, R = 1 → 2/3.
  assert M.squad_f1("Paris Paris", "Paris") == pytest.approx(2 / 3)
  # Empty sides: v1.1 scores 0 always, v2.0 scores 1 when both are empty.
  assert M.squad_f1("", "", "1.1") == 0.0
  assert M.squad_f1("", "", "2.0") == 1.0
  assert M.squad_f1("the", "", "2.0") == 1.0  # "the" normalises to nothing
  assert M.squad_f1("x", "", "2.0") == 0.0


def _nested(qas_by_context):
  """Official nested SQuAD JSON from {context: [(id, question, [answers])]}."""
  paragraphs = []
  for context, qas in qas_by_context.items():
    paragraphs.append({"context": context, "qas": [
        {"id": qid, "question": q, "answers": [{"text": a, "answer_start": max(
            context.find(a), 0)} for a in answers], "is_impossible": not answers}
        for qid, q, answers in qas]})
  return {"version": "test", "data": [{"title": "t", "paragraphs": paragraphs}]}


def test_squad_v1_max_over_gold_answers_and_missing_predictions():
  data = _nested({
      "The Denver Broncos played at Levi's Stadium in Santa Clara, California.": [
          ("q1", "Who won?", ["Denver Broncos", "The Denver Broncos"]),
          ("q2", "Where?", ["Santa Clara, California", "Levi's Stadium"]),
          ("q3", "When?", ["2016"]),
      ]})
  preds = {"q1": "denver broncos.", "q2": "Levi's Stadium in Santa Clara", "zzz": "ignored"}
  # q1: exact after normalisation → EM 1, F1 1.
  # q2: pred [levis, stadium, in, santa, clara] (5 tokens).
  #   vs [santa, clara, california]: overlap 2, P 2/5, R 2/3 → F1 0.5.
  #   vs [levis, stadium]: overlap 2, P 2/5, R 1 → F1 4/7. Max = 4/7, EM 0.
  # q3: no prediction → 0 (v1.1 rule). EM = 100·1/3, F1 = 100·(1 + 4/7)/3.
  with pytest.warns(UserWarning, match="1 of 3 questions"):
    result = M.squad_metrics(preds, data, version="1.1")
  assert result["exact_match"] == pytest.approx(100 / 3)
  assert result["f1"] == pytest.approx(100 * (1 + 4 / 7) / 3)
  assert result["total"] == 3 and result["missing"] == 1
  # The flat (hub) layout gives the same numbers.
  flat = [{"id": "q1", "answers": {"text": ["Denver Broncos", "The Denver Broncos"],
                                   "answer_start": [4, 0]}},
          {"id": "q2", "answers": [{"text": "Santa Clara, California"},
                                   {"text": "Levi's Stadium"}]},
          {"id": "q3", "answers": {"text": ["2016"], "answer_start": [0]}}]
  with pytest.warns(UserWarning):
    assert M.squad_metrics(preds, flat) == pytest.approx(result)


def _v2_data():
  context = "Paris is big. The blue whale swims. It was 1990."
  return _nested({context: [
      ("a", "Capital?", ["Paris"]),
      ("b", "Year?", ["1990"]),
      ("c", "Unanswerable 1", []),
      ("d", "Unanswerable 2", []),
      ("e", "Animal?", ["blue whale"]),
  ]})


V2_PREDS = {"a": "Paris", "b": "", "c": "", "d": "something", "e": "the whale"}


def test_squad_v2_no_answer_handling():
  # a: 1/1. b: empty pred vs "1990" → 0/0. c: empty vs no answer → 1/1 (correct abstention).
  # d: "something" vs no answer → 0/0. e: "whale" vs "blue whale": EM 0, F1 P 1 R 1/2 → 2/3.
  result = M.squad_metrics(V2_PREDS, _v2_data(), version="2.0")
  assert result["exact_match"] == pytest.approx(100 * 2 / 5)
  assert result["f1"] == pytest.approx(100 * (2 + 2 / 3) / 5)
  assert result["HasAns_total"] == 3 and result["NoAns_total"] == 2
  assert result["HasAns_exact"] == pytest.approx(100 / 3)
  assert result["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
  assert result["NoAns_exact"] == pytest.approx(50.0)
  assert result["NoAns_f1"] == pytest.approx(50.0)
  assert "best_f1" not in result  # only with na_probs


def test_squad_v2_threshold_search():
  na = {"a": 0.1, "b": 0.9, "c": 0.8, "d": 0.7, "e": 0.3}
  # Answer iff na ≤ t. Sweep in na order a, e, d, c, b from "all abstain" (score = 2, the
  # unanswerable c and d):
  #   EM: +a → 3 (t 0.1) | +e (EM 0) → 3 | +d (non-empty, no answer) → 2 | +c → 2 | +b → 2
  #   F1: +a → 3 (t 0.1) | +e (2/3) → 3.667 (t 0.3) | +d → 2.667 | +c → 2.667 | +b → 2.667
  result = M.squad_metrics(V2_PREDS, _v2_data(), na_probs=na, version="2.0")
  assert result["best_exact"] == pytest.approx(100 * 3 / 5)
  assert result["best_exact_thresh"] == pytest.approx(0.1)
  assert result["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 5)
  assert result["best_f1_thresh"] == pytest.approx(0.3)
  # Default na_prob_thresh 1.0 abstains nobody here: same as without na_probs.
  assert result["exact_match"] == pytest.approx(40.0)
  # na_prob_thresh 0.5 abstains b, c, d: b stays 0, c stays 1, d becomes 1.
  cut = M.squad_metrics(V2_PREDS, _v2_data(), na_probs=na, version="2.0", na_prob_thresh=0.5)
  assert cut["exact_match"] == pytest.approx(60.0)
  assert cut["f1"] == pytest.approx(100 * (3 + 2 / 3) / 5)
  assert cut["NoAns_exact"] == pytest.approx(100.0)


def test_squad_v2_threshold_ties_move_together():
  # Equal na_probs: the only states are "all abstain" (2 points: c, d) and "all answer"
  # (EM 2 points: a, c). A tie-splitting sweep could claim 3 (answer a only).
  na = {k: 0.5 for k in V2_PREDS}
  result = M.squad_metrics(V2_PREDS, _v2_data(), na_probs=na, version="2.0")
  assert result["best_exact"] == pytest.approx(40.0)
  # When abstaining on everything wins, the threshold must still abstain on everything.
  preds = {"a": "wrong", "b": "wrong", "c": "x", "d": "y", "e": "wrong"}
  na = {"a": -1.0, "b": -2.0, "c": -3.0, "d": -0.5, "e": -4.0}
  result = M.squad_metrics(preds, _v2_data(), na_probs=na, version="2.0")
  assert result["best_exact"] == pytest.approx(40.0)
  assert all(v > result["best_exact_thresh"] for v in na.values())


def test_squad_v2_gold_that_normalises_to_nothing_is_no_answer():
  data = [{"id": "x", "answers": {"text": ["The"], "answer_start": [0]}}]
  result = M.squad_metrics({"x": ""}, data, version="2.0")
  assert result["exact_match"] == 100.0 and result["NoAns_total"] == 1


def test_squad_input_errors():
  with pytest.raises(ValueError, match="version='2.0'"):
    M.squad_metrics({"c": ""}, _v2_data(), version="1.1")
  with pytest.raises(ValueError, match="no prediction"):
    M.squad_metrics({"a": "Paris"}, _v2_data(), version="2.0")
  with pytest.raises(ValueError, match="na_probs lack"):
    M.squad_metrics(V2_PREDS, _v2_data(), na_probs={"a": 0.1}, version="2.0")
  with pytest.raises(ValueError, match="must be a string"):
    M.squad_metrics({"q": None}, [{"id": "q", "answers": ["x"]}])
  with pytest.raises(ValueError, match="version"):
    M.squad_metrics({}, _v2_data(), version="3")
  with pytest.raises(ValueError, match="twice"):
    M.squad_metrics({"q": "x"}, [{"id": "q", "answers": ["x"]}, {"id": "q", "answers": ["y"]}])
