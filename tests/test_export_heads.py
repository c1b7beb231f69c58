"""Hugging Face export of fine-tuned heads: `hf.save_task` writes directories that transformers
loads as MobileBertForSequenceClassification (labels, regression) and
MobileBertForQuestionAnswering with no missing or unexpected keys, and whose outputs match the
Flax models within 1e-5 of each tensor's largest magnitude on padded batches.

Random trees (every weight random, FFN and Q/K kernels scaled up, a few channels driven
large), no training, fp32, eager attention."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from export_util import init_tree, padded_batch, random_tree, rel_err  # noqa: E402
from mbert_jax import hf  # noqa: E402
from mbert_jax.models import build_classifier, build_span_extractor, preset  # noqa: E402

pytestmark = [pytest.mark.hf,
              pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")]

TOL = 1e-5
STUDENT = preset("mobilebert_micro", num_hidden_layers=2, vocab_size=97,
                 max_position_embeddings=32)


def _torch_inputs(batch):
  return {k: torch.tensor(v) for k, v in batch.items()}


def _flax_inputs(batch):
  return [jnp.asarray(batch[k], jnp.int32) for k in ("input_ids", "token_type_ids",
                                                      "attention_mask")]


def _load(cls, path):
  model, info = cls.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
  for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info[key], (key, info)
  return model.eval()


@pytest.mark.parametrize("num_labels,names,pooler", [
    (3, ["entailment", "neutral", "contradiction"], False),
    (2, None, True),
    (1, None, False),  # STS-B regression
])
def test_classifier_export_loads_and_matches(num_labels, names, pooler, tmp_path):
  cfg = STUDENT.replace(classifier_activation=pooler)
  model = build_classifier(cfg, num_labels, 0.1)
  params = random_tree(init_tree(model, cfg, "classification"), seed=num_labels, large=30.0)
  out = hf.save_task(cfg, params, tmp_path / "hf", head="classification", label_names=names)
  ref = _load(transformers.MobileBertForSequenceClassification, out)

  written = json.loads((out / "config.json").read_text())
  assert written["architectures"] == ["MobileBertForSequenceClassification"]
  assert ref.config.num_labels == num_labels
  if num_labels == 1:
    assert written["problem_type"] == "regression" and ref.config.problem_type == "regression"
  else:
    assert written["problem_type"] == "single_label_classification"
  want = names or ["score" if num_labels == 1 else f"LABEL_{i}" for i in range(num_labels)]
  assert [ref.config.id2label[i] for i in range(num_labels)] == want
  assert ref.config.label2id == {n: i for i, n in enumerate(want)}
  assert ("mobilebert.pooler.dense.weight" in hf.task_state_dict(cfg, params, "classification")
          ) == pooler

  for seq in (11, 32):
    batch = padded_batch(cfg.vocab_size, batch=3, seq=seq, seed=seq)
    ours = np.asarray(model.apply({"params": params}, *_flax_inputs(batch)))
    with torch.no_grad():
      theirs = ref(**_torch_inputs(batch)).logits.numpy()
    assert ours.shape == (3, num_labels)
    assert rel_err(ours, theirs) <= TOL, (seq, rel_err(ours, theirs))


def test_span_extractor_export_loads_and_matches(tmp_path):
  # A pooler the span extractor never reads is left out: HF's QA model has none.
  cfg = STUDENT.replace(classifier_activation=True)
  model = build_span_extractor(cfg)
  params = random_tree(init_tree(model, cfg, "question_answering"), seed=4, large=30.0)
  assert "pooler" in params
  out = hf.save_task(cfg, params, tmp_path / "hf", head="question_answering")
  ref = _load(transformers.MobileBertForQuestionAnswering, out)
  assert json.loads((out / "config.json").read_text())["architectures"] == [
      "MobileBertForQuestionAnswering"]
  batch = padded_batch(cfg.vocab_size, batch=4, seq=17, seed=1)
  start, end = model.apply({"params": params}, *_flax_inputs(batch))
  with torch.no_grad():
    r = ref(**_torch_inputs(batch))
  assert rel_err(start, r.start_logits.numpy()) <= TOL
  assert rel_err(end, r.end_logits.numpy()) <= TOL
  # The comparison has power: start and end swapped would fail it.
  assert rel_err(end, r.start_logits.numpy()) > 100 * TOL


def test_tokenizer_files_travel_with_a_task_export(tmp_path):
  model = build_classifier(STUDENT, 2, 0.1)
  params = random_tree(init_tree(model, STUDENT, "classification"), seed=0)
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
  out = hf.save_task(STUDENT, params, tmp_path / "hf", head="classification",
                     tokenizer_dir=tok)
  assert (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\n[CLS]\n[SEP]\n"


def test_task_export_rejects_what_it_cannot_write(tmp_path):
  cls_model = build_classifier(STUDENT, 2, 0.1)
  params = random_tree(init_tree(cls_model, STUDENT, "classification"), seed=0)
  with pytest.raises(ValueError, match="3 label names"):
    hf.save_task(STUDENT, params, tmp_path / "a", head="classification",
                 label_names=["x", "y", "z"])
  with pytest.raises(ValueError, match="no qa_outputs/kernel"):
    hf.save_task(STUDENT, params, tmp_path / "b", head="question_answering")
  with pytest.raises(ValueError, match="head 'tagging'"):
    hf.task_state_dict(STUDENT, params, "tagging")
  other = STUDENT.replace(intermediate_size=32)
  with pytest.raises(ValueError, match=r"encoder/layers/intermediate/kernel: expected shape"):
    hf.save_task(other, params, tmp_path / "c", head="classification")
  teacher = preset("ib_bert_large_micro", num_hidden_layers=1)
  t_params = init_tree(build_classifier(teacher, 2, 0.1), teacher, "classification")
  with pytest.raises(ValueError, match="cannot represent"):
    hf.save_task(teacher, t_params, tmp_path / "d", head="classification")
  for name in "abcd":
    assert not (tmp_path / name / "model.safetensors").exists()
