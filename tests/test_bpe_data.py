"""Pretraining data from a teacher's tokenizer.json BPE vocabulary (ModernBERT's and EuroBERT's
layouts): special tokens found by name, whole-word masking from the pre-tokenizer's word
boundaries, single-segment examples without token types or NSP, and the `teacher=...,smoke`
presets through the loop and the Hugging Face export."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from configs import distill_mobilebert
from train_util import metrics_rows

from mbert_jax import launch
from mbert_jax.data import bpe, build_pipeline
from mbert_jax.data import tokenizer as T
from mbert_jax.data.builtin_corpus import iter_builtin_documents
from mbert_jax.data.config import default_data_config
from mbert_jax.interop import export


@pytest.fixture(scope="module")
def texts():
  return [d.text for d in itertools.islice(iter_builtin_documents("json*"), 50)]


@pytest.fixture(scope="module", params=["modernbert", "eurobert"])
def bpe_dir(request, texts, tmp_path_factory):
  directory = tmp_path_factory.mktemp(f"bpe_{request.param}")
  bpe.train_bpe(texts, 400, request.param).save(str(directory / "tokenizer.json"))
  return request.param, str(directory)


def test_special_roles_by_name(bpe_dir):
  layout, directory = bpe_dir
  tok = T.load_tokenizer(directory)
  ids = T.special_ids(tok)
  names = {role: tok.id_to_token(i) for role, i in ids.items() if i >= 0}
  expected = ({"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}
              if layout == "modernbert" else
              {"cls": "<|begin_of_text|>", "sep": "<|end_of_text|>", "pad": "<|pad|>",
               "mask": "<|mask|>"})
  assert names == expected
  assert T.token_ids(tok, ("cls", "sep", "pad")) == {k: ids[k] for k in ("cls", "sep", "pad")}
  assert not T.continuation_mask(tok).any()  # no `##` pieces: boundaries come from the corpus
  # The specials are never random replacements.
  assert not set(T.replacement_ids(tok).tolist()) & {i for i in ids.values() if i >= 0}


def test_cls_and_sep_from_the_template_and_a_tokenizer_without_mask(texts, tmp_path):
  tok = bpe.train_bpe(texts, 300, "eurobert")
  plain = Tokenizer.from_str(tok.to_str().replace("<|begin_of_text|>", "<start>")
                             .replace("<|end_of_text|>", "<stop>"))
  ids = T.special_ids(plain)
  assert (plain.id_to_token(ids["cls"]), plain.id_to_token(ids["sep"])) == ("<start>", "<stop>")
  no_mask = Tokenizer.from_str(tok.to_str().replace("<|mask|>", "<|unused|>"))
  no_mask.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match=r"has no mask token .*masked-LM pretraining needs one"
                     ) as e:
    T.load_tokenizer(str(tmp_path))
  assert "\n" not in str(e.value)
  # Fine-tuning needs no mask token.
  T.load_tokenizer(str(tmp_path), require=T.FINETUNE_SPECIAL_TOKENS)


def data_config(directory, cache_dir, **fields):
  c = default_data_config()
  c.source = "builtin:json*"
  c.vocab = directory
  c.max_seq_length = 48
  c.max_predictions_per_seq = 16
  c.batch_size = 16
  c.cache_dir = cache_dir
  c.num_proc = 1
  for k, v in fields.items():
    c[k] = v
  return c


def words(starts):
  """Word index per position from per-token word starts."""
  return np.cumsum(starts) - 1


def test_whole_word_masking_reads_the_pre_tokenizer_boundaries(bpe_dir, tmp_path):
  layout, directory = bpe_dir
  pipe = build_pipeline(data_config(directory, str(tmp_path), whole_word_mask=True,
                                    masked_lm_prob=0.3), None)
  corpus, tok = pipe.corpus, pipe.tokenizer
  starts = np.asarray(corpus.word_starts)
  assert starts is not None and starts.shape == corpus.tokens.shape
  # Every sentence's first token starts a word, and so does every byte-level piece that
  # carries its leading space ("Ġ"); other pieces of a word do not.
  assert starts[np.asarray(corpus.sentence_offsets[:-1])].all()
  pieces = [tok.id_to_token(int(i)) for i in corpus.tokens[:2000]]
  assert all(starts[i] for i, p in enumerate(pieces) if p.startswith("Ġ"))
  assert not starts[:2000].all()
  multi_token_words = 0
  for g in range(40):
    ex = pipe.example_at(g)
    a0, a1, b0, b1, _ = pipe.instances(0)[pipe.locate([g])[0][1]]
    # [CLS] A [SEP] B [SEP]; a segment cut mid-word starts a new one (nothing to join).
    seg = lambda lo, hi, first: first + words(np.r_[True, starts[lo + 1:hi]])
    word = np.concatenate([[-1], seg(a0, a1, 0), [-2], seg(b0, b1, 10_000), [-3]])
    assert len(word) == len(ex["tokens"])
    masked = set(ex["positions"].tolist())
    for w in set(word[list(masked)].tolist()):
      members = set(np.flatnonzero(word == w).tolist())
      assert members <= masked, (layout, g, w)  # a word is masked whole or not at all
      multi_token_words += len(members) > 1
  assert multi_token_words > 0


def test_single_segment_examples_without_token_types(bpe_dir, tmp_path):
  _, directory = bpe_dir
  pipe = build_pipeline(data_config(directory, str(tmp_path), next_sentence=False,
                                    masked_lm_prob=0.3), None)
  b = pipe.batch_at(0)
  ids = pipe.special_ids
  assert not b["token_type_ids"].any() and not b["next_sentence_labels"].any()
  for row, mask in zip(b["input_ids"], b["attention_mask"]):
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any()
    tokens = row[:n]
    assert tokens[0] == ids["cls"] and tokens[-1] == ids["sep"]
    assert np.sum(tokens == ids["sep"]) == 1  # no B segment
  real = b["attention_mask"].sum(1)
  predicted = b["masked_lm_weights"].sum(1)
  assert np.all(predicted == np.minimum(16, np.maximum(1, np.round(real * 0.3))))


# ----------------------------------------------------------------------------- the presets
def smoke_config(teacher):
  c = distill_mobilebert.get_config(f"smoke,teacher={teacher}")
  c.model.num_hidden_layers = 2
  c.data.max_seq_length = 32
  c.data.max_predictions_per_seq = 10
  c.data.source = "builtin:json*"
  c.data.batch_size = 8
  c.data.num_proc = 1
  c.model.max_position_embeddings = 32
  c.schedule.steps_per_layer = 2
  c.schedule.distill_steps = 2
  c.schedule.warmup_steps = 1
  c.train.eval_steps = 1
  c.train.log_every = 1
  c.train.progress_bar = False
  c.train.async_checkpoint = False
  return c


def test_modernbert_smoke_preset_distils_without_nsp_and_exports(tmp_path):
  workdir = str(tmp_path / "run")
  c = smoke_config("modernbert_base")
  assert c.teacher.checkpoint.startswith("micro:") and not c.data.next_sentence
  report = launch.run_config(c, workdir)
  assert report["status"] == "completed"
  teacher_dir = os.path.join(workdir, "micro_teacher")
  assert os.path.isfile(os.path.join(teacher_dir, "tokenizer.json"))
  # Laid out like a checkpoint from the hub: AutoTokenizer reads its config, not a vocab.txt.
  with open(os.path.join(teacher_dir, "tokenizer_config.json")) as f:
    assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert not os.path.exists(os.path.join(teacher_dir, "vocab.txt"))
  rows = metrics_rows(workdir)
  assert any("kd_loss" in r for r in rows) and any("fmt_loss" in r for r in rows)
  assert not any("nsp_loss" in r or "eval/nsp_accuracy" in r for r in rows)
  # The student's vocabulary is the teacher's tokenizer.json, and it leaves with it.
  with open(os.path.join(workdir, "tokenizer", "tokenizer.json")) as f, \
       open(os.path.join(teacher_dir, "tokenizer.json")) as g:
    assert Tokenizer.from_str(f.read()).get_vocab() == Tokenizer.from_str(g.read()).get_vocab()
  out = str(tmp_path / "hf")
  export.export(workdir, "hf", out)
  assert os.path.isfile(os.path.join(out, "model.safetensors"))


@pytest.mark.slow
def test_eurobert_smoke_preset_runs(tmp_path):
  report = launch.run_config(smoke_config("eurobert_210m"), str(tmp_path / "run"))
  assert report["status"] == "completed"


def test_nsp_weight_without_pairs_is_refused():
  c = smoke_config("modernbert_base")
  c.schedule.nsp_factor = 1.0
  with pytest.raises(ValueError, match=r"next_sentence=False .* schedule.nsp_factor=0"):
    launch.run_config(c, "/nonexistent/never-written")
  assert isinstance(models.BPE(), models.Model)
