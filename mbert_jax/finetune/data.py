"""The data of a fine-tuning run: its tokenizer, the task's splits read and featurized, and
which rows make the batch of each step (a pure function of the step and seed)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import jax
import numpy as np

from mbert_jax.training.workdir import TOKENIZER_DIR
from mbert_jax.finetune import squad as squad_lib
from mbert_jax.finetune import glue as tasks_lib
from mbert_jax.data.tokenizer import (FINETUNE_SPECIAL_TOKENS, load_tokenizer,
                                      parse_trained_vocab_size, train_wordpiece)
from mbert_jax.interop import model_source
from mbert_jax.finetune.config import TaskInfo
from mbert_jax.finetune.initial_model import InitSource

def resolve_tokenizer(config, source: InitSource, workdir: str, texts: Callable[[], list[str]]):
  """Explicit data.vocab > the run's own saved tokenizer (resume) > checkpoint's > trained."""
  spec = str(config.data.vocab)
  saved = os.path.join(workdir, TOKENIZER_DIR)
  # Fine-tuning never masks: a vocabulary without [MASK] will do.
  load = functools.partial(load_tokenizer, lower_case=bool(config.data.lower_case),
                           require=FINETUNE_SPECIAL_TOKENS)
  if spec and not spec.startswith("train:"):
    return load(spec)
  if os.path.isdir(saved):  # a resumed run keeps the vocabulary it started with
    return load(saved)
  if not spec and source.tokenizer_dir:
    return load(source.tokenizer_dir)
  if not spec and source.kind != "random":
    raise FileNotFoundError(f"init.checkpoint = {source.path} has no tokenizer ({TOKENIZER_DIR}/, "
                            "tokenizer.json or vocab.txt): set data.vocab")
  size = parse_trained_vocab_size(spec) if spec else int(config.data.train_vocab_size)
  corpus = texts()
  logging.info("training a %d-token WordPiece vocabulary on %d training texts", size, len(corpus))
  return train_wordpiece(corpus, size)


# ============================================================================ data

def _data_source(config, info: TaskInfo) -> str | None:
  spec = str(config.task.data)
  if not spec:
    return None
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise FileNotFoundError(f"task.data = {spec!r} is a file; give the directory holding the "
                            "split files (train and dev/validation)")
  if model_source.looks_like_hub_name(spec):
    return spec
  raise FileNotFoundError(f"task.data = {spec!r}: no such directory")


def _first(n_max: int, dataset):
  return dataset if n_max < 0 or len(dataset) <= n_max else dataset.select(range(n_max))


def load_split(config, info: TaskInfo, split: str, limit: int):
  """One split as a `datasets.Dataset` in the canonical layout (tasks.py / squad.py)."""
  source = _data_source(config, info)
  cache = str(config.data.cache_dir) or None
  try:
    if info.kind == "squad":
      ds = squad_lib.load_squad(source, version=info.squad_version, split=split, cache_dir=cache)
    elif source is not None and not os.path.isdir(source):
      import datasets  # another hub copy of GLUE: same configs and columns
      hub = datasets.load_dataset(source, info.name, split=split, cache_dir=cache)
      ds = tasks_lib.load_glue(info.glue, hub, split)
    else:
      ds = tasks_lib.load_glue(info.glue, source, split, cache_dir=cache)
  except (ValueError, FileNotFoundError):
    raise  # problems with the data itself, already named
  except Exception as e:  # network, hub or cache failures come in many types
    where = "the Hugging Face hub" if source is None or not os.path.isdir(source) else source
    raise FileNotFoundError(
        f"{info.name} split {split!r}: loading from {where} failed ({type(e).__name__}: "
        f"{str(e)[:300]}); offline, set task.data to a local directory with the task's files"
    ) from e
  if len(ds) == 0:
    raise ValueError(f"{info.name} split {split!r} is empty")
  return _first(limit, ds)


@dataclasses.dataclass
class Split:
  name: str
  examples: Any                # datasets.Dataset
  arrays: dict[str, np.ndarray]  # model inputs (+ labels for training)
  features: squad_lib.SquadFeatures | None = None

  def __len__(self) -> int:
    return int(self.arrays["input_ids"].shape[0])


def featurize(config, info: TaskInfo, tokenizer, split: str, examples, training: bool) -> Split:
  seq = int(config.data.max_seq_length)
  if info.kind == "glue":
    enc = tasks_lib.encode_glue(info.glue, examples, tokenizer, seq)
    arrays = {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    arrays["labels"] = enc["labels"]
    if training:
      unlabelled = arrays["labels"] == -1
      if unlabelled.any():
        raise ValueError(f"{info.name} split {split!r}: {int(unlabelled.sum())} training examples "
                         "have no label")
    return Split(split, examples, arrays)
  f = config.finetune
  feats = squad_lib.prepare_squad_features(
      examples, tokenizer, max_seq_length=seq, doc_stride=int(f.doc_stride),
      max_query_length=int(f.max_query_length),
      version_2_with_negative=info.squad_version == "2.0", is_training=training)
  if len(feats) == 0:
    raise ValueError(f"SQuAD split {split!r} produced no features")
  arrays = feats.training_batch() if training else feats.model_inputs()
  return Split(split, examples, dict(arrays), feats)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def train_batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
  """Example indices of the global batch at `step`: rows [step·B, (step+1)·B) of the stream of
  per-epoch permutations (so an epoch boundary can fall inside a batch; nothing is dropped)."""
  pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
  epochs, within = np.divmod(pos, num_examples)
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = _epoch_permutation(seed, int(e), num_examples)[within[sel]]
  return out


def local_rows(rows: np.ndarray) -> np.ndarray:
  n = rows.shape[0] // jax.process_count()
  return rows[jax.process_index() * n:(jax.process_index() + 1) * n]


def total_steps(tc, num_train: int, batch_size: int) -> int:
  if int(tc.steps) > 0:
    return int(tc.steps)
  # TF1 run_classifier: int(num_examples / batch_size * num_epochs).
  total = int(num_train / batch_size * float(tc.epochs))
  if total < 1:
    raise ValueError(f"{num_train} training rows x {tc.epochs} epochs / batch {batch_size} is "
                     "less than one step; raise train.epochs or set train.steps")
  return total
