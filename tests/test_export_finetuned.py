"""`python -m mbert_jax.export` on fine-tuning runs: a GLUE classifier, an STS-B regressor and a
SQuAD span extractor (tiny real runs) export to Hugging Face directories that transformers
loads with the right head class, labels and problem type and no missing or unexpected keys,
matching the Flax model within 1e-5; the flax format round-trips; every export carries its
tokenizer files, task.json and a model card naming the run and its evaluation figures."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from export_util import (glue_run, padded_batch, rel_err, run_module, squad_run, write_sst2,
                         write_squad, write_stsb)
from mbert_jax.interop import export
from mbert_jax.interop.model_source import LoadedModel, load, locate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.hf,
              pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")]

TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("ft")
  out = {}
  out["sst2"] = str(d / "sst2")
  glue_run(out["sst2"], write_sst2(str(d / "sst2_data"), n_train=256, n_dev=64), steps=40)
  out["stsb"] = str(d / "stsb")
  glue_run(out["stsb"], write_stsb(str(d / "stsb_data")), task="stsb", steps=4)
  out["squad"] = str(d / "squad")
  squad_run(out["squad"], write_squad(str(d / "squad_data"), n_train=16, n_dev=4), steps=4)
  return out


def _flax_logits(run: LoadedModel, batch):
  from mbert_jax.models import build_for
  model = build_for(run.source.model_config.replace(compute_dtype="float32"), run.source.head,
                    int((run.source.task or {}).get("num_labels", 2)))
  args = [jnp.asarray(batch[k], jnp.int32) for k in ("input_ids", "token_type_ids",
                                                      "attention_mask")]
  return model.apply({"params": run.params}, *args)


def _torch_batch(batch):
  return {k: torch.tensor(v) for k, v in batch.items()}


def _load(cls, path):
  model, info = cls.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
  for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
    assert not info[key], (key, info)
  return model.eval()


def test_glue_run_exports_a_sequence_classifier(runs, tmp_path):
  out = str(tmp_path / "hf")
  proc = run_module("mbert_jax.interop.export", f"--workdir={runs['sst2']}", "--format=hf",
                    f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info["head"] == "classification" and info["format"] == "hf"
  for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
               "README.md", "task.json"):
    assert os.path.isfile(os.path.join(out, name)), name
  ref = _load(transformers.MobileBertForSequenceClassification, out)
  assert ref.config.id2label == {0: "negative", 1: "positive"}
  assert ref.config.problem_type == "single_label_classification"
  auto = transformers.AutoModelForSequenceClassification.from_pretrained(out)
  assert type(auto).__name__ == "MobileBertForSequenceClassification"

  run = load(locate(runs["sst2"]))
  batch = padded_batch(run.source.model_config.vocab_size, batch=4, seq=32)
  with torch.no_grad():
    theirs = ref(**_torch_batch(batch)).logits.numpy()
  assert rel_err(_flax_logits(run, batch), theirs) <= TOL

  # The tokenizer beside the model is the run's: transformers encodes as the run did.
  tok = transformers.AutoTokenizer.from_pretrained(out)
  from mbert_jax.finetune import glue as tasks
  ours = tasks.encode_pairs(tasks.build_wordpiece_tokenizer(os.path.join(out, "vocab.txt")),
                            ["a sunny day near the river"], None, 16)
  theirs_ids = tok("a sunny day near the river", padding="max_length", max_length=16)["input_ids"]
  assert ours["input_ids"][0].tolist() == theirs_ids

  card = open(os.path.join(out, "README.md")).read()
  report = json.load(open(os.path.join(runs["sst2"], "final.json")))
  acc = report["eval"]["eval/validation/accuracy"]
  assert f"| eval/validation/accuracy | {acc:.4f} |" in card
  assert "fine-tuned on sst2 for 40 steps" in card and runs["sst2"] in card
  assert f"{export._count(run.params):,} in this export" in card
  assert "MobileBERT student" in card and "2 labels (negative, positive)" in card


def test_glue_run_exports_plain_flax(runs, tmp_path):
  out = str(tmp_path / "flax")
  assert export.export(runs["sst2"], "flax", out)["head"] == "classification"
  cfg, params = export.load_flax(out)
  run = load(locate(runs["sst2"]))
  assert cfg == run.source.model_config
  from flax import traverse_util
  a, b = (traverse_util.flatten_dict(t, sep="/") for t in (params, run.params))
  assert a.keys() == b.keys() and "classifier/kernel" in a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  task = json.load(open(os.path.join(out, "task.json")))
  assert task == {"head": "classification", "kind": "glue", "task": "sst2", "num_labels": 2,
                  "label_names": ["negative", "positive"], "max_seq_length": 32,
                  "lower_case": True, "text_fields": ["sentence"]}
  assert os.path.isfile(os.path.join(out, "vocab.txt"))
  assert "plain Flax parameters" in open(os.path.join(out, "README.md")).read()


def test_stsb_run_exports_a_regressor(runs, tmp_path):
  info = export.export(runs["stsb"], "hf", str(tmp_path / "hf"))
  assert info["head"] == "classification"
  ref = _load(transformers.MobileBertForSequenceClassification, str(tmp_path / "hf"))
  assert ref.config.num_labels == 1 and ref.config.problem_type == "regression"
  run = load(locate(runs["stsb"]))
  batch = padded_batch(run.source.model_config.vocab_size, batch=3, seq=20)
  with torch.no_grad():
    theirs = ref(**_torch_batch(batch)).logits.numpy()
  ours = _flax_logits(run, batch)
  assert ours.shape == (3, 1) and rel_err(ours, theirs) <= TOL
  assert "regression (1 output) on stsb" in open(tmp_path / "hf" / "README.md").read()


def test_squad_run_exports_a_span_extractor(runs, tmp_path):
  export.export(runs["squad"], "hf", str(tmp_path / "hf"))
  ref = _load(transformers.MobileBertForQuestionAnswering, str(tmp_path / "hf"))
  run = load(locate(runs["squad"]))
  batch = padded_batch(run.source.model_config.vocab_size, batch=2, seq=48)
  with torch.no_grad():
    r = ref(**_torch_batch(batch))
  start, end = _flax_logits(run, batch)
  assert rel_err(start, r.start_logits.numpy()) <= TOL
  assert rel_err(end, r.end_logits.numpy()) <= TOL
  task = json.load(open(tmp_path / "hf" / "task.json"))
  assert task["head"] == "question_answering" and task["squad_version"] == "1.1"
  assert task["doc_stride"] == 16 and task["max_query_length"] == 12
  assert task["max_answer_length"] == 30 and task["n_best_size"] == 20


def test_model_card_names_the_pretraining_run_behind_a_fine_tuned_model(runs, tmp_path):
  """A fine-tuned model's card follows `init` to the distillation run: schedule, teacher,
  steps."""
  pre = tmp_path / "distilled"
  pre.mkdir()
  (pre / "model_config.json").write_text("{}")
  (pre / "config.json").write_text(json.dumps({
      "schedule": {"name": "pkt", "steps_per_layer": 40, "distill_steps": 200},
      "teacher": {"checkpoint": "runs/ib_bert_large"},
      "data": {"source": "builtin:json*", "batch_size": 8, "max_seq_length": 32}}))
  (pre / "final.json").write_text(json.dumps({"step": 280, "eval": {}}))
  run = load(locate(runs["sst2"]))
  run = dataclasses.replace(run, source=dataclasses.replace(
      run.source, task={**run.source.task, "init": str(pre)}))
  card = export.model_card(run, "onnx", "int8", ["model.onnx"])
  assert f"- initial model: {pre}" in card
  for line in ("  - schedule `pkt` (steps_per_layer 40, distill_steps 200)",
               "  - teacher: runs/ib_bert_large", "  - steps: 280",
               "  - data: builtin:json*, batch 8, sequence 32"):
    assert line in card, line
  assert ("ONNX model (int8, dynamic quantization of the NoNorm-folded graph, "
          "`--quantize=int8`)") in card
  assert "The int8 model's own figures are not measured" in card
