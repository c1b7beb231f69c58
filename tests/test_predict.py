"""`python -m mbert_jax.predict` on exports of tiny fine-tuned runs: labels for a classifier
(ONNX Runtime and Flax agree, `--text` and `--file`), scores for a sentence-pair regressor,
answers for a span extractor that come from the context; bad inputs end with one
`error: ...` line and exit status 2.

Needs the `onnx` extra (CI installs it)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from export_util import (FOODS, NAMES, error_line, glue_run, run_module, squad_context,
                         squad_run, write_sst2, write_squad, write_stsb)
from mbert_jax.interop import export
from mbert_jax.interop import predict

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op"),
              pytest.mark.filterwarnings("ignore:# The axis name"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

CLEAR = [("a sunny happy lovely morning in the garden", "positive"),
         ("the grim cold awful road", "negative"),
         ("warm golden light over the town", "positive"),
         ("a dark sad evening with gloomy people", "negative")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  d = tmp_path_factory.mktemp("predict")
  runs = {"sst2": str(d / "sst2"), "stsb": str(d / "stsb"), "squad": str(d / "squad")}
  glue_run(runs["sst2"], write_sst2(str(d / "sst2_data"), n_train=256, n_dev=32), steps=60)
  glue_run(runs["stsb"], write_stsb(str(d / "stsb_data")), task="stsb", steps=4)
  squad_run(runs["squad"], write_squad(str(d / "squad_data"), n_train=48, n_dev=4), steps=40)
  out = {}
  for name, formats in (("sst2", ("onnx", "flax")), ("stsb", ("flax",)),
                        ("squad", ("onnx", "flax"))):
    for fmt in formats:
      out[f"{name}_{fmt}"] = str(d / f"{name}_{fmt}")
      export.export(runs[name], fmt, out[f"{name}_{fmt}"])
  out["sst2_hf"] = str(d / "sst2_hf")
  export.export(runs["sst2"], "hf", out["sst2_hf"])
  out["pretraining"] = str(d / "pre")
  shutil.copytree(out["sst2_flax"], out["pretraining"])
  os.remove(os.path.join(out["pretraining"], "task.json"))
  return out


def test_classifier_labels_through_onnx_and_flax(exports):
  examples = [predict.Example(t) for t, _ in CLEAR]
  onnx_model = predict.load(exports["sst2_onnx"])
  flax_model = predict.load(exports["sst2_flax"])
  assert onnx_model.backend == "onnx" and flax_model.backend == "flax"
  a = predict.predict(onnx_model, examples, batch_size=3)  # a ragged last batch
  b = predict.predict(flax_model, examples)
  assert [r["label"] for r in a] == [label for _, label in CLEAR]
  assert [r["label"] for r in a] == [r["label"] for r in b]
  np.testing.assert_allclose([r["probability"] for r in a], [r["probability"] for r in b],
                             atol=1e-5)
  assert all(0.5 <= r["probability"] <= 1.0 for r in a)


def test_predict_command_text_and_file(exports, tmp_path):
  proc = run_module("mbert_jax.predict", f"--model={exports['sst2_onnx']}",
                    f"--text={CLEAR[0][0]}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  label, prob, text = proc.stdout.strip().split("\t")
  assert label == "positive" and 0.5 <= float(prob) <= 1.0 and text == CLEAR[0][0]

  lines = tmp_path / "lines.txt"
  lines.write_text("\n".join(t for t, _ in CLEAR[1:]) + "\n\n")  # blank lines are skipped
  proc = run_module("mbert_jax.predict", f"--model={exports['sst2_flax']}",
                    f"--file={lines}", "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  assert [r["label"] for r in rows] == [label for _, label in CLEAR[1:]]
  assert [r["text"] for r in rows] == [t for t, _ in CLEAR[1:]]


def test_pair_regressor_scores(exports):
  model = predict.load(exports["stsb_flax"])
  examples = predict.parse_lines(["sunny day river\tsunny day river", "a b\tc d"], True, "x")
  scores = predict.predict(model, examples)
  assert all(set(r) == {"score"} and np.isfinite(r["score"]) for r in scores)
  with pytest.raises(ValueError, match="two tab-separated parts"):
    predict.parse_lines(["only one part"], True, "lines.txt")
  with pytest.raises(ValueError, match="stsb takes two parts: give --text_pair"):
    predict.examples_from_flags(model.task, "one", None, None)


def test_answers_come_from_the_context(exports, tmp_path):
  import random
  rng = random.Random(9)
  examples = []
  for name, food in (("clara", "honey"), ("hugo", "dates"), ("elena", "figs")):
    context = squad_context(rng, name, food)
    examples += [predict.Example("Who is the keeper ?", context),
                 predict.Example("What does he like ?", context)]
  a = predict.predict(predict.load(exports["squad_onnx"]), examples)
  b = predict.predict(predict.load(exports["squad_flax"]), examples)
  assert [r["answer"] for r in a] == [r["answer"] for r in b]
  # The tiny model has learnt where answers sit (a name or a food), if not always which one.
  for e, r in zip(examples, a):
    assert r["answer"] in e.pair and r["answer"] in NAMES + FOODS, (e, r)
    assert 0.0 < r["probability"] <= 1.0

  lines = tmp_path / "qa.txt"
  lines.write_text("".join(f"{e.text}\t{e.pair}\n" for e in examples[:2]))
  proc = run_module("mbert_jax.predict", f"--model={exports['squad_onnx']}", f"--file={lines}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = [line.split("\t") for line in proc.stdout.strip().splitlines()]
  assert [row[0] for row in out] == [r["answer"] for r in a[:2]]
  assert [row[2] for row in out] == [e.text for e in examples[:2]]


@pytest.mark.slow
def test_bad_inputs_end_with_one_error_line(exports, tmp_path):
  no_tok = str(tmp_path / "no_tokenizer")
  shutil.copytree(exports["sst2_onnx"], no_tok)
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json"):
    os.remove(os.path.join(no_tok, name))
  cases = [
      ([f"--model={no_tok}", "--text=hello"], "has no tokenizer"),
      ([f"--model={exports['pretraining']}", "--text=hello"], "not an export of a fine-tuned"),
      ([f"--model={exports['sst2_hf']}", "--text=hello"], "Hugging Face export"),
      ([f"--model={exports['sst2_onnx']}"], "either --text"),
      ([f"--model={exports['sst2_onnx']}", "--text=x", "--backend=tflite"], "--backend='tflite'"),
      ([f"--model={exports['sst2_flax']}", "--text=x", "--backend=onnx"], "no model.onnx"),
      ([f"--model={exports['squad_onnx']}", "--text=Who ?"], "give --context"),
      ([f"--model={tmp_path / 'absent'}", "--text=x"], "no such directory"),
  ]
  for args, message in cases:
    proc = run_module("mbert_jax.predict", *args)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert message in error_line(proc), (args, error_line(proc))
    assert proc.stdout == "", args
