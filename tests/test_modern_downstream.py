"""Downstream of the ModernBERT/EuroBERT teachers: the student leaves with its BPE tokenizer
(transformers' AutoTokenizer loads it and encodes as our pipeline does), a student trained
without NSP exports (hf, flax, onnx), fine-tunes and predicts, and a micro ModernBERT is
pretrained MLM-only by the loop with its own BPE vocabulary and then teaches a student."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from configs import finetune_glue, modernbert_teacher
from export_util import write_sst2
from test_bpe_data import smoke_config
from train_util import metrics_rows, train_losses

from mbert_jax import launch
from mbert_jax.data import bpe
from mbert_jax.data import tokenizer as T
from mbert_jax.data.builtin_corpus import iter_builtin_documents
from mbert_jax.data.corpus import tokenize_documents
from mbert_jax.finetune import glue
from mbert_jax.finetune import task as finetune
from mbert_jax.interop import export, predict
from mbert_jax.interop.model_source import load_flax, locate
from mbert_jax.models import ModernConfig

SENTENCES = ["The river runs past the old mill.", "Hello, world! Accents: émigré café.",
             "Numbers 12345 and symbols #@% stay byte-level."]


@pytest.fixture(scope="module")
def texts():
  return [d.text for d in itertools.islice(iter_builtin_documents("json*"), 50)]


def our_single_ids(tok, sentence: str) -> list[int]:
  """[CLS] sentence [SEP] as the pipeline builds a single-segment example from its corpus."""
  doc = tokenize_documents({"text": [sentence], "splitter": ["lines"], "skip": [""],
                            "flags": [[]]}, tok, -1, 1)
  ids = T.special_ids(tok)
  return [ids["cls"], *doc["input_ids"][0], ids["sep"]]


def check_autotokenizer_matches(directory: str, tok) -> None:
  hf = transformers.AutoTokenizer.from_pretrained(directory)
  for s in SENTENCES:
    assert hf(s)["input_ids"] == our_single_ids(tok, s)
  # Pairs as fine-tuning encodes them: ids and token types.
  ours = glue.encode_pairs(tok, SENTENCES, SENTENCES[::-1], 256)  # nothing truncated
  for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[::-1])):
    enc = hf(a, b)
    n = int(ours["attention_mask"][i].sum())
    assert enc["input_ids"] == ours["input_ids"][i, :n].tolist()
    assert enc["token_type_ids"] == ours["token_type_ids"][i, :n].tolist()
  ids = T.special_ids(tok)
  assert (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id) == (
      ids["cls"], ids["sep"], ids["pad"], ids["mask"])


@pytest.mark.parametrize("layout", ["modernbert", "eurobert"])
def test_autotokenizer_loads_the_bpe_export_and_matches_our_ids(layout, texts, tmp_path):
  tok = bpe.train_bpe(texts, 400, layout)
  run_tok = str(tmp_path / "run_tokenizer")
  T.save_tokenizer(tok, run_tok)
  assert not os.path.exists(os.path.join(run_tok, "vocab.txt"))  # BPE is no WordPiece vocab
  check_autotokenizer_matches(run_tok, tok)
  # A run saved before BPE tokenizers had their own config: export rewrites it.
  with open(os.path.join(run_tok, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True}, f)
  out = str(tmp_path / "export")
  T.export_tokenizer(run_tok, out)
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
  check_autotokenizer_matches(out, tok)
  # predict and fine-tuning read the same files the same way.
  assert T.load_tokenizer(out, require=T.FINETUNE_SPECIAL_TOKENS).to_str() == tok.to_str()


def test_bad_bpe_vocabulary_specs_are_one_line():
  assert bpe.parse_spec("bpe:eurobert:512") == ("eurobert", 512)
  assert bpe.parse_spec("train:512") is None
  for spec, match in (("bpe:gpt2:512", "layout one of"), ("bpe:modernbert:200", "at least")):
    with pytest.raises(ValueError, match=match) as e:
      bpe.parse_spec(spec)
    assert "\n" not in str(e.value)


def test_teacher_presets():
  c = modernbert_teacher.get_config("preset=eurobert_210m")
  assert c.data.vocab == "bpe:eurobert:128256" and c.data.masked_lm_prob == 0.5
  assert c.schedule.name == "scratch" and c.schedule.nsp_factor == 0.0
  assert not c.data.next_sentence and "teacher" not in c
  with pytest.raises(ValueError, match="choose one of"):
    modernbert_teacher.get_config("preset=bert")


# ----------------------------------------------------------------------------- the runs
def teacher_config(steps: int = 40):
  c = modernbert_teacher.get_config("smoke")
  c.data.source = "builtin:json*"
  c.data.max_seq_length = 32
  c.data.max_predictions_per_seq = 11
  c.data.num_proc = 1
  c.data.batch_size = 16
  c.train.steps = steps
  c.train.warmup_steps = 4
  c.train.log_every = 1
  c.train.eval_every = steps
  c.train.eval_steps = 2
  c.train.checkpoint_every = steps
  c.train.progress_bar = False
  c.train.async_checkpoint = False
  return c


def student_config(teacher_dir: str):
  """The `teacher=modernbert_base,smoke` preset at test size, taught by `teacher_dir`."""
  c = smoke_config("modernbert_base")
  c.teacher.checkpoint = teacher_dir
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("modern_downstream")
  teacher, student = str(root / "teacher"), str(root / "student")
  assert launch.run_config(teacher_config(), teacher)["status"] == "completed"
  assert launch.run_config(student_config(teacher), student)["status"] == "completed"
  return root, teacher, student


def test_mlm_only_micro_modernbert_pretrains_and_teaches(runs):
  _, teacher, student = runs
  source = locate(teacher, setting="teacher.checkpoint")
  assert isinstance(source.model_config, ModernConfig) and not source.nsp_trained
  cfg = source.model_config
  tok = T.load_tokenizer(source.tokenizer_dir)
  assert not T.is_wordpiece(tok) and cfg.vocab_size == tok.get_vocab_size(with_added_tokens=True)
  assert (cfg.pad_token_id, cfg.mask_token_id) == (tok.token_to_id("[PAD]"),
                                                  tok.token_to_id("[MASK]"))
  losses = train_losses(teacher)
  first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean(
      [losses[s] for s in range(36, 41)])
  assert last < first - 0.3, (first, last)
  rows = metrics_rows(teacher)
  assert not any(k.startswith(("nsp", "eval/nsp")) for r in rows for k in r)
  assert any("eval/mlm_accuracy" in r for r in rows)
  with open(os.path.join(teacher, "config.json")) as f:
    assert json.load(f)["data"]["masked_lm_prob"] == 0.3
  # The student distilled from it: its vocabulary, its MLM logits, its feature maps.
  with open(os.path.join(student, "config.json")) as f:
    assert json.load(f)["teacher"]["checkpoint"] == teacher
  s_rows = metrics_rows(student)
  assert any("fmt_loss" in r for r in s_rows) and any("kd_loss" in r for r in s_rows)
  assert T.load_tokenizer(os.path.join(student, "tokenizer")).get_vocab() == tok.get_vocab()
  with open(os.path.join(student, "final.json")) as f:
    assert json.load(f)["eval"]["eval/teacher_mlm_accuracy"] > 0


def test_no_nsp_student_exports_without_the_head_that_never_learned(runs, tmp_path):
  _, _, student = runs
  hf_dir, flax_dir, onnx_dir = (str(tmp_path / f) for f in ("hf", "flax", "onnx"))
  export.export(student, "hf", hf_dir)
  with open(os.path.join(hf_dir, "config.json")) as f:
    assert json.load(f)["architectures"] == ["MobileBertForMaskedLM"]
  keys = load_file(os.path.join(hf_dir, "model.safetensors"))
  assert not any(k.startswith(("cls.seq_relationship", "mobilebert.pooler")) for k in keys)
  model, info = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir,
                                                                 output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  with open(os.path.join(hf_dir, "README.md")) as f:
    assert "NSP head never learned" in f.read()
  tok = T.load_tokenizer(os.path.join(student, "tokenizer"))
  check_autotokenizer_matches(hf_dir, tok)

  export.export(student, "flax", flax_dir)
  cfg, params = load_flax(flax_dir)
  assert "seq_relationship" in params["cls"]  # kept so the flax model builds
  check_autotokenizer_matches(flax_dir, tok)

  export.export(student, "onnx", onnx_dir)
  with open(os.path.join(onnx_dir, "onnx_io.json")) as f:
    io = json.load(f)
  assert [o["name"] for o in io["outputs"]] == ["mlm_logits", "hidden_states"]
  assert max(io["fp32_vs_pytorch_max_relative_error"].values()) < 1e-4
  check_autotokenizer_matches(onnx_dir, tok)


def test_no_nsp_student_fine_tunes_and_predicts_with_its_bpe(runs, tmp_path):
  root, _, student = runs
  c = finetune_glue.get_config("task=sst2")
  c.init.checkpoint = student
  c.task.data = write_sst2(str(root / "sst2"), 128, 32)
  c.data.max_seq_length = 32
  c.data.batch_size = 16
  c.train.steps = 20
  c.train.learning_rate = 3e-3
  c.train.log_every = 10
  c.train.checkpoint_every = 20
  c.train.progress_bar = False
  c.train.async_checkpoint = False
  workdir = str(tmp_path / "sst2_run")
  report = finetune.finetune_and_evaluate(c, workdir)
  assert report["status"] == "completed" and "eval/score" in report["eval"]
  tok = T.load_tokenizer(os.path.join(student, "tokenizer"))
  check_autotokenizer_matches(os.path.join(workdir, "tokenizer"), tok)
  out = str(tmp_path / "sst2_flax")
  export.export(workdir, "flax", out)
  model = predict.load(out)
  assert model.tokenizer.to_str() == tok.to_str()
  texts = ["a sunny happy day", "grim dark cold road"]
  results = predict.predict(model, [predict.Example(t) for t in texts])
  assert [r["label"] for r in results] and all(0.5 <= r["probability"] <= 1 for r in results)
  # The same logits as the Flax model applied to AutoTokenizer's encoding of the text.
  hf = transformers.AutoTokenizer.from_pretrained(out)
  enc = hf(texts, padding="max_length", max_length=32, return_tensors="np")
  logits = model.forward({k: enc[k] for k in predict.INPUT_NAMES})["logits"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(probs.max(-1), [r["probability"] for r in results], rtol=1e-5)
