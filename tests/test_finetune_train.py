"""Fine-tuning end to end on tiny local task files: GLUE classification learns a separable toy
task, STS-B regression and SQuAD v2.0 run through the official metrics, a stopped run resumes
to the uninterrupted run's parameters bit for bit, an mbert-jax pretraining workdir seeds the
backbone, and bad configs fail with errors that name the problem.

Compilation dominates on CPU, so the module compiles with XLA's optimizations off (as flax's
lm1b test does) and shares a persistent compilation cache: the resume and init runs repeat the
first GLUE run's programs and load them instead of compiling again.
"""

import csv
import json
import os
import random
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import common, finetune_glue, finetune_squad
from mbert_jax.data.tokenizer import FINETUNE_SPECIAL_TOKENS, load_tokenizer
from mbert_jax.training import checkpoint as ckpt_lib
from mbert_jax.training import optim
from mbert_jax.training import workdir as workdir_lib
from mbert_jax.finetune import squad, task as trainer
from mbert_jax.models import ModelConfig
from mbert_jax.models.summary import param_shapes

POS = "sunny bright happy golden warm gentle lovely brave".split()
NEG = "gloomy dark sad rotten cold harsh awful grim".split()
FILL = ("the a day river town walk over under with near city road house garden tree stone "
        "light morning evening people").split()
STEPS = 60


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  from jax.experimental.compilation_cache import compilation_cache as cc
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes", "jax_disable_most_optimizations")
  old = {k: jax.config.values[k] for k in keys}
  jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  cc.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  cc.reset_cache()


# ------------------------------------------------------------------------------ toy data

def _sentence(rng, label):
  words = [rng.choice(FILL) for _ in range(rng.randint(4, 8))]
  for _ in range(rng.randint(1, 2)):
    words.insert(rng.randint(0, len(words)), rng.choice(POS if label else NEG))
  return " ".join(words)


def _write_tsv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  """SST-2 layout; label 1 iff the sentence holds a word from POS (else one from NEG)."""
  d = tmp_path_factory.mktemp("sst2")
  rng = random.Random(0)
  for name, n in (("train", 256), ("dev", 64)):
    _write_tsv(d / f"{name}.tsv", ["sentence", "label"],
               [(_sentence(rng, i % 2), i % 2) for i in range(n)])
  return str(d)


def micro(c, seq=32):
  c.init.checkpoint = ""
  c.model = common.model_section("mobilebert_micro", num_hidden_layers=2,
                                 max_position_embeddings=64)
  c.model.vocab_size = -1
  c.data.max_seq_length = seq
  c.data.batch_size = 16
  c.data.train_vocab_size = 256
  c.train.progress_bar = False
  c.train.async_checkpoint = False
  c.train.log_every = 10
  return c


def glue_config(data_dir, **train):
  c = micro(finetune_glue.get_config("task=sst2"))
  c.task.data = data_dir
  c.train.steps = STEPS
  c.train.learning_rate = 3e-3
  c.train.checkpoint_every = 30
  for k, v in train.items():
    c.train[k] = v
  return c


def restore_state(workdir, step=None):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return jax.tree.map(np.asarray, state)


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def glue_run(glue_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("glue_full"))
  return workdir, trainer.finetune_and_evaluate(glue_config(glue_dir), workdir)


# ------------------------------------------------------------------------------ GLUE

def test_glue_learns_separable_task(glue_run):
  workdir, report = glue_run
  assert report["status"] == "completed" and report["step"] == STEPS
  acc = report["eval"]["eval/validation/accuracy"]
  assert acc >= 0.85, f"dev accuracy {acc} on a separable task"
  assert report["score"] == acc and report["main_metric"] == "accuracy"
  with open(os.path.join(workdir, "final.json")) as f:
    assert json.load(f)["eval"]["eval/validation/accuracy"] == acc
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert any("eval/validation/accuracy" in r for r in rows)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < 0.5 * losses[0]
  with open(os.path.join(workdir, "predictions", "sst2_validation.tsv")) as f:
    lines = f.read().splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == 65
  assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
  with open(os.path.join(workdir, trainer.TASK_FILE)) as f:
    task = json.load(f)
  assert task["task"] == "sst2" and task["num_labels"] == 2
  assert workdir_lib.is_mbert_workdir(workdir)
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "vocab.txt"))
  assert set(flat(restore_state(workdir)["params"])) >= {"classifier/kernel", "classifier/bias"}


def test_resume_matches_uninterrupted_run(glue_run, glue_dir, tmp_path):
  full_dir, full = glue_run
  workdir = str(tmp_path / "resumed")
  first = trainer.finetune_and_evaluate(glue_config(glue_dir, stop_at_step=STEPS // 2), workdir)
  assert first["status"] == "stopped" and first["step"] == STEPS // 2
  assert not os.path.exists(os.path.join(workdir, "final.json"))
  second = trainer.finetune_and_evaluate(glue_config(glue_dir), workdir)
  assert second["status"] == "completed" and second["step"] == STEPS
  a, b = flat(restore_state(full_dir)["params"]), flat(restore_state(workdir)["params"])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert second["eval"] == full["eval"]
  # One workdir is one run: another seed must not continue it.
  with pytest.raises(ValueError, match="seed"):
    trainer.finetune_and_evaluate(glue_config(glue_dir, seed=1), workdir)


def _pretraining_params(model_config: ModelConfig, backbone):
  """The pretraining tree (flat): backbone as given, MLM/NSP heads random (the fine-tuning
  model must leave those out)."""
  rng = np.random.default_rng(7)
  params = {}
  for name, shape in param_shapes(model_config).items():
    if name.startswith(("embeddings/", "encoder/")):
      params[name] = np.asarray(backbone[name], np.float32)
    else:
      params[name] = rng.normal(0.0, 0.02, shape).astype(np.float32)
  assert "cls/predictions/output_bias" in params
  return params


def _pretraining_workdir(path, model_config: ModelConfig, tokenizer_dir, params):
  """A workdir in the layout train.py writes: model_config.json, tokenizer/, checkpoints/ with
  state {step, params, opt_state, nonfinite, skipped}."""
  os.makedirs(path)
  with open(os.path.join(path, "model_config.json"), "w") as f:
    json.dump(model_config.to_dict(), f)
  shutil.copytree(tokenizer_dir, os.path.join(path, "tokenizer"))
  tree = traverse_util.unflatten_dict(params, sep="/")
  tx = optim.build_optimizer(optim.default_optimizer_config(), tree)
  state = {"step": np.int32(5), "params": tree, "opt_state": jax.jit(tx.init)(tree),
           "nonfinite": np.int32(0), "skipped": np.int32(0)}
  ckpt = ckpt_lib.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  ckpt.save(5, state, {"step": 5, "stage_index": 0})
  ckpt.close()


def test_init_from_mbert_workdir_copies_backbone(glue_run, glue_dir, tmp_path):
  full_dir, _ = glue_run
  with open(os.path.join(full_dir, "model_config.json")) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  # A trained backbone (the GLUE run's) differs from any fresh init, so equality proves a copy.
  trained = flat(restore_state(full_dir)["params"])
  pre = _pretraining_params(cfg, trained)
  _pretraining_workdir(str(tmp_path / "pretrain"), cfg, os.path.join(full_dir, "tokenizer"), pre)

  c = glue_config(glue_dir, stop_at_step=1)
  c.init.checkpoint = str(tmp_path / "pretrain")
  workdir = str(tmp_path / "ft")
  report = trainer.finetune_and_evaluate(c, workdir)
  assert report["status"] == "stopped" and report["init"] == str(tmp_path / "pretrain")
  # Step 0 of the warm-up has learning rate 0, so the step-1 checkpoint holds the initial model.
  got = flat(restore_state(workdir)["params"])
  backbone = [k for k in got if k.startswith(("embeddings/", "encoder/"))]
  assert backbone and all(k in pre for k in backbone)
  for k in backbone:
    np.testing.assert_array_equal(got[k], pre[k], err_msg=k)
  assert not np.array_equal(got["classifier/kernel"], trained["classifier/kernel"])
  assert not any(k.startswith("cls/") for k in got)
  kernel = got["classifier/kernel"]
  assert kernel.shape == (cfg.hidden_size, 2)
  assert np.abs(kernel).max() <= 2 * 0.02 + 1e-6 and 0.01 < kernel.std() < 0.03
  np.testing.assert_array_equal(got["classifier/bias"], 0.0)


def test_init_from_hugging_face_directory_loads_backbone(glue_run, glue_dir, tmp_path):
  from mbert_jax import hf
  from mbert_jax.training import sharding
  full_dir, _ = glue_run
  with open(os.path.join(full_dir, "model_config.json")) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  pre = _pretraining_params(cfg, flat(restore_state(full_dir)["params"]))
  hf_dir = hf.save(cfg, traverse_util.unflatten_dict(pre, sep="/"), tmp_path / "hf",
                   tokenizer_dir=os.path.join(full_dir, "tokenizer"))

  c = glue_config(glue_dir)
  c.init.checkpoint = str(hf_dir)
  c.finetune.pooler = "tanh"  # the checkpoint has none: this one starts fresh
  source = trainer.resolve_init(c.init)
  assert source.kind == "hf" and source.tokenizer_dir == str(hf_dir)
  tok = load_tokenizer(source.tokenizer_dir, require=FINETUNE_SPECIAL_TOKENS)
  m_cfg = trainer.finetune_model_config(source, c, tok.get_vocab_size())
  assert m_cfg.hf_layer_norm_eps_quirk and m_cfg.init_distribution == "truncated"
  assert m_cfg.classifier_activation
  model = trainer.build_model(trainer.task_info(c), m_cfg, 0.1)
  mesh = sharding.make_mesh(c.mesh)
  abs_params, shardings = trainer.abstract_params(model, m_cfg, mesh,
                                                   sharding.rules_from_config(c.mesh))
  got = trainer.load_backbone(source, c.init, abs_params, shardings)
  assert set(got) == {"embeddings", "encoder"}
  got = flat(jax.tree.map(np.asarray, got))
  assert got.keys() == {k for k in pre if k.startswith(("embeddings/", "encoder/"))}
  for k, v in got.items():
    np.testing.assert_array_equal(v, pre[k], err_msg=k)


# ------------------------------------------------------------------------------ STS-B

def test_stsb_regression_reports_correlations(tmp_path):
  words = POS + NEG + FILL
  rng = random.Random(1)
  data = tmp_path / "stsb"
  data.mkdir()
  for name, n in (("train", 128), ("dev", 32)):
    rows = []
    for i in range(n):
      a = rng.sample(words, 6)
      keep = rng.randint(0, 6)
      b = a[:keep] + rng.sample([w for w in words if w not in a], 6 - keep)
      rng.shuffle(b)
      rows.append((i, " ".join(a), " ".join(b), f"{5.0 * keep / 6:.3f}"))
    _write_tsv(data / f"{name}.tsv", ["index", "sentence1", "sentence2", "score"], rows)
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")

  c = micro(finetune_glue.get_config("task=stsb"))
  c.task.data = str(data)
  c.data.vocab = str(vocab)
  c.train.steps = 10
  c.train.learning_rate = 2e-3
  report = trainer.finetune_and_evaluate(c, str(tmp_path / "run"))
  m = report["eval"]
  for key in ("pearson", "spearman", "combined_score"):
    v = m[f"eval/validation/{key}"]
    assert np.isfinite(v) and -1.0 <= v <= 1.0
  assert report["main_metric"] == "spearman" and report["score"] == m["eval/validation/spearman"]
  params = flat(restore_state(str(tmp_path / "run"))["params"])
  assert params["classifier/kernel"].shape[-1] == 1
  lines = (tmp_path / "run" / "predictions" / "stsb_validation.tsv").read_text().splitlines()
  assert len(lines) == 33 and all(np.isfinite(float(x.split("\t")[1])) for x in lines[1:])


# ------------------------------------------------------------------------------ SQuAD

def _squad_file(path, rng, n_contexts, prefix):
  names = "anna boris clara dmitri elena felix greta hugo".split()
  foods = "apples bread cheese dates figs grapes honey olives".split()
  colors = "red blue green white black grey".split()
  paragraphs = []
  for i in range(n_contexts):
    name, food = rng.choice(names), rng.choice(foods)
    filler = " ".join(rng.choice(FILL) for _ in range(60))
    context = (f"The {rng.choice(colors)} tower stands near the river . {filler} . "
               f"Its keeper is named {name} and he likes {food} .")
    qas = [
        {"id": f"{prefix}{i}a", "question": "Who is the keeper ?", "is_impossible": False,
         "answers": [{"text": name, "answer_start": context.index(f"named {name}") + 6}]},
        {"id": f"{prefix}{i}b", "question": "What does he like ?", "is_impossible": False,
         "answers": [{"text": food, "answer_start": context.rindex(food)}]},
        {"id": f"{prefix}{i}c", "question": "What is the capital ?", "is_impossible": True,
         "answers": []},
    ]
    paragraphs.append({"context": context, "qas": qas})
  with open(path, "w") as f:
    json.dump({"version": "v2.0", "data": [{"title": "towers", "paragraphs": paragraphs}]}, f)


def test_squad_v2_end_to_end(tmp_path):
  rng = random.Random(2)
  data = tmp_path / "squad"
  data.mkdir()
  _squad_file(data / "train-v2.0.json", rng, 12, "t")
  _squad_file(data / "dev-v2.0.json", rng, 6, "d")

  c = micro(finetune_squad.get_config("version=2.0"), seq=64)
  c.task.data = str(data)
  c.finetune.doc_stride = 16
  c.finetune.max_query_length = 12
  c.train.steps = 10
  c.train.learning_rate = 3e-3
  workdir = str(tmp_path / "run")
  report = trainer.finetune_and_evaluate(c, workdir)
  m = report["eval"]
  assert report["status"] == "completed" and report["task"] == "squad"
  assert m["eval/validation/total"] == 18.0
  assert m["eval/validation/HasAns_total"] == 12.0 and m["eval/validation/NoAns_total"] == 6.0
  for key in ("exact_match", "f1", "HasAns_f1", "NoAns_exact", "best_f1", "best_exact"):
    assert 0.0 <= m[f"eval/validation/{key}"] <= 100.0, key
  assert m["eval/validation/f1"] >= m["eval/validation/exact_match"]
  assert report["score"] == m["eval/validation/f1"]
  with open(os.path.join(workdir, "predictions", "squad_validation.json")) as f:
    preds = json.load(f)
  assert len(preds) == 18 and all(isinstance(v, str) for v in preds.values())
  with open(os.path.join(workdir, "predictions", "squad_validation_null_odds.json")) as f:
    odds = json.load(f)
  assert odds.keys() == preds.keys()
  assert flat(restore_state(workdir)["params"])["qa_outputs/kernel"].shape[-1] == 2
  # Contexts are longer than one window, so decoding merged several windows per question.
  examples = squad.load_squad(str(data), version="2.0", split="validation")
  feats = squad.prepare_squad_features(examples, load_tokenizer(
      os.path.join(workdir, "tokenizer"), require=FINETUNE_SPECIAL_TOKENS), max_seq_length=64, doc_stride=16, max_query_length=12,
      version_2_with_negative=True)
  assert len(feats) > len(examples)


# ------------------------------------------------------------------------------ errors, data order

def test_bad_configs_fail_early(glue_dir, tmp_path):
  with pytest.raises(ValueError, match="unknown GLUE task 'imdb'"):
    finetune_glue.get_config("task=imdb")
  c = glue_config(glue_dir)
  c.task.name = "imdb"
  with pytest.raises(ValueError, match="unknown GLUE task"):
    trainer.finetune_and_evaluate(c, str(tmp_path / "a"))
  c = glue_config(str(tmp_path / "no_such_dir"))
  with pytest.raises(FileNotFoundError, match="task.data"):
    trainer.finetune_and_evaluate(c, str(tmp_path / "b"))
  c = glue_config(glue_dir)
  c.task.name = "mrpc"  # the directory holds SST-2-style files only: wrong columns
  with pytest.raises(ValueError, match="sentence1"):
    trainer.finetune_and_evaluate(c, str(tmp_path / "c"))
  c = glue_config(glue_dir)
  c.task.eval_splits = "validation_matched"
  with pytest.raises(ValueError, match="no split 'validation_matched'"):
    trainer.finetune_and_evaluate(c, str(tmp_path / "d"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="train"):
    trainer.finetune_and_evaluate(glue_config(str(empty)), str(tmp_path / "e"))
  c = glue_config(glue_dir)
  c.init.checkpoint = str(tmp_path / "missing_run")
  with pytest.raises(FileNotFoundError, match="init.checkpoint"):
    trainer.finetune_and_evaluate(c, str(tmp_path / "f"))
  c = glue_config(glue_dir)
  c.data.max_seq_length = 128  # the micro model has 64 positions
  with pytest.raises(ValueError, match="max_position_embeddings"):
    trainer.finetune_and_evaluate(c, str(tmp_path / "g"))
  with pytest.raises(ValueError, match="SQuAD version"):
    finetune_squad.get_config("version=3")
  c = glue_config(glue_dir)
  c.train.warmup_proportion = 1.5
  with pytest.raises(ValueError, match="warmup_proportion"):
    trainer.validate_config(c)
  del c.finetune
  with pytest.raises(ValueError, match="finetune"):
    trainer.validate_config(c)


def test_train_batches_are_per_epoch_permutations():
  n, b, seed = 10, 4, 3
  stream = np.concatenate([trainer.train_batch_indices(s, b, n, seed) for s in range(10)])
  for epoch in range(4):
    assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
  np.testing.assert_array_equal(trainer.train_batch_indices(7, b, n, seed), stream[28:32])
  assert not np.array_equal(stream[:n], np.concatenate(
      [trainer.train_batch_indices(s, b, n, seed + 1) for s in range(3)])[:n])
  assert not np.array_equal(stream[:n], stream[n:2 * n])  # a fresh order every epoch
