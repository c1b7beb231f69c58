"""Shared pieces of the export, ONNX and predict tests: toy task files, tiny fine-tuning runs,
random parameter trees with large activations, and running the commands as a user does."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys

import numpy as np
from flax import traverse_util

from train_util import ROOT

POS = "sunny bright happy golden warm gentle lovely brave".split()
NEG = "gloomy dark sad rotten cold harsh awful grim".split()
FILL = ("the a day river town walk over under with near city road house garden tree stone "
        "light morning evening people").split()


# ------------------------------------------------------------------------------ toy tasks
def _sst2_row(rng: random.Random) -> tuple[str, int]:
  """A sentence with 1-3 positive and 1-3 negative words; positive iff more positive ones, so
  the model has to weigh words against each other (ties are left out)."""
  while True:
    n_pos, n_neg = rng.randint(0, 3), rng.randint(0, 3)
    if n_pos != n_neg:
      break
  words = [rng.choice(FILL) for _ in range(rng.randint(3, 7))]
  for w in [rng.choice(POS) for _ in range(n_pos)] + [rng.choice(NEG) for _ in range(n_neg)]:
    words.insert(rng.randint(0, len(words)), w)
  return " ".join(words), int(n_pos > n_neg)


def write_tsv(path: str, header: list[str], rows: list[tuple]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)


def write_sst2(directory: str, n_train: int = 512, n_dev: int = 200, seed: int = 0) -> str:
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  for name, n in (("train", n_train), ("dev", n_dev)):
    write_tsv(os.path.join(directory, f"{name}.tsv"), ["sentence", "label"],
              [_sst2_row(rng) for _ in range(n)])
  return directory


def write_stsb(directory: str, n_train: int = 64, n_dev: int = 16, seed: int = 1) -> str:
  """Score = 5 x the share of words the two sentences have in common."""
  rng = random.Random(seed)
  words = POS + NEG + FILL
  os.makedirs(directory, exist_ok=True)
  for name, n in (("train", n_train), ("dev", n_dev)):
    rows = []
    for i in range(n):
      a = rng.sample(words, 6)
      keep = rng.randint(0, 6)
      b = a[:keep] + rng.sample([w for w in words if w not in a], 6 - keep)
      rng.shuffle(b)
      rows.append((i, " ".join(a), " ".join(b), f"{5.0 * keep / 6:.3f}"))
    write_tsv(os.path.join(directory, f"{name}.tsv"),
              ["index", "sentence1", "sentence2", "score"], rows)
  return directory


NAMES = "anna boris clara dmitri elena felix greta hugo".split()
FOODS = "apples bread cheese dates figs grapes honey olives".split()


def squad_context(rng: random.Random, name: str, food: str) -> str:
  filler = " ".join(rng.choice(FILL) for _ in range(20))
  return f"The tower stands near the river . {filler} . Its keeper is {name} and he likes {food} ."


def write_squad(directory: str, n_train: int = 48, n_dev: int = 12, seed: int = 2) -> str:
  """SQuAD v1.1 files: who keeps the tower, what he likes."""
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  for split, n in (("train", n_train), ("dev", n_dev)):
    paragraphs = []
    for i in range(n):
      name, food = rng.choice(NAMES), rng.choice(FOODS)
      context = squad_context(rng, name, food)
      paragraphs.append({"context": context, "qas": [
          {"id": f"{split}{i}a", "question": "Who is the keeper ?",
           "answers": [{"text": name, "answer_start": context.index(f"is {name}") + 3}]},
          {"id": f"{split}{i}b", "question": "What does he like ?",
           "answers": [{"text": food, "answer_start": context.rindex(food)}]}]})
    with open(os.path.join(directory, f"{split}-v1.1.json"), "w") as f:
      json.dump({"version": "1.1", "data": [{"title": "towers", "paragraphs": paragraphs}]}, f)
  return directory


# ------------------------------------------------------------------------------ tiny runs
def micro_finetune_config(c, seq: int = 32, steps: int = 60):
  from configs import common
  c.init.checkpoint = ""
  c.model = common.model_section("mobilebert_micro", num_hidden_layers=2,
                                 max_position_embeddings=64)
  c.model.vocab_size = -1
  c.data.max_seq_length = seq
  c.data.batch_size = 16
  c.data.train_vocab_size = 256
  c.train.steps = steps
  c.train.learning_rate = 3e-3
  c.train.progress_bar = False
  c.train.async_checkpoint = False
  c.train.log_every = 10
  c.train.checkpoint_every = steps
  return c


def glue_run(workdir: str, data_dir: str, task: str = "sst2", steps: int = 60) -> dict:
  from configs import finetune_glue
  from mbert_jax.finetune import task as trainer
  c = micro_finetune_config(finetune_glue.get_config(f"task={task}"), steps=steps)
  c.task.data = data_dir
  return trainer.finetune_and_evaluate(c, workdir)


def squad_run(workdir: str, data_dir: str, steps: int = 60) -> dict:
  from configs import finetune_squad
  from mbert_jax.finetune import task as trainer
  c = micro_finetune_config(finetune_squad.get_config("version=1.1"), seq=48, steps=steps)
  c.task.data = data_dir
  c.finetune.doc_stride = 16
  c.finetune.max_query_length = 12
  return trainer.finetune_and_evaluate(c, workdir)


# ------------------------------------------------------------------------------ random trees
def random_tree(params, seed: int, large: float = 1.0):
  """Every weight random (so a swapped scale/bias or transposed kernel shows), FFN and Q/K
  kernels scaled up as in the Hugging Face parity tests, and with `large` > 1 a few channels
  of the embedding and block outputs multiplied by it, which drives the feature maps to the
  magnitudes (1e7) the trained student reaches."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, a in traverse_util.flatten_dict(params, sep="/").items():
    n = rng.normal(size=np.shape(a)).astype(np.float32)
    if k.endswith("scale"):
      v = 1.0 + 0.3 * n
    elif k.endswith("bias"):
      v = 0.1 * n
    else:
      v = 0.05 * n
    if any(s in k for s in ("intermediate/kernel", "query/kernel", "key/kernel")):
      v = 4.0 * v
    if large != 1.0 and k in ("embeddings/norm/scale", "encoder/layers/output/bottleneck/norm/scale",
                              "encoder/layers/output/norm/scale"):
      v[..., :4] *= large
    out[k] = v.astype(np.float32)
  return traverse_util.unflatten_dict(out, sep="/")


def init_tree(model, cfg, head: str):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  ids = jnp.ones((1, 8), jnp.int32)
  kw = {"masked_positions": jnp.zeros((1, 2), jnp.int32)} if head == "pretraining" else {}
  args = (ids,) if head == "pretraining" else (ids, jnp.zeros_like(ids), ids)
  shapes = jax.eval_shape(lambda k: nn.unbox(model.init(k, *args, **kw)["params"]),
                          jax.random.key(0))
  return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)


def padded_batch(vocab: int, batch: int = 3, seq: int = 11, seed: int = 0) -> dict[str, np.ndarray]:
  """Two segments, the rows padded to different lengths ([PAD] = 0)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (batch, seq))
  lengths = np.linspace(seq, max(3, seq // 3), batch).astype(int)
  mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
  types = (np.arange(seq)[None, :] >= lengths[:, None] // 2).astype(np.int64) * mask
  return {"input_ids": ids * mask, "token_type_ids": types, "attention_mask": mask}


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ------------------------------------------------------------------------------ commands
def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                        timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
  """The one `error: ...` line a command ends with on a known error (and nothing else)."""
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines, "nothing on stderr"
  assert lines[-1].startswith("error: "), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  return lines[-1]
