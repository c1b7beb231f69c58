"""Tiny real runs for the training-loop tests: micro models on a slice of the built-in corpus."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from configs import common, distill_mobilebert, ib_bert_large

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_data(c, cache_dir: str, batch: int = 8) -> None:
  c.data.source = "builtin:json*"
  c.data.vocab = "train:512"
  c.data.max_seq_length = 32
  c.data.max_predictions_per_seq = 5
  c.data.batch_size = batch
  c.data.cache_dir = cache_dir
  c.data.num_proc = 1
  c.model.vocab_size = -1
  c.model.max_position_embeddings = 32


def tiny_teacher_config(cache_dir: str, steps: int = 8, layers: int = 2):
  c = ib_bert_large.get_config("smoke")
  c.model = common.model_section("ib_bert_large_micro", num_hidden_layers=layers,
                                 max_position_embeddings=32)
  tiny_data(c, cache_dir)
  c.train.steps = steps
  c.train.warmup_steps = 2
  c.train.log_every = 1
  c.train.eval_every = steps
  c.train.eval_steps = 2
  c.train.checkpoint_every = max(steps // 2, 1)
  c.train.keep_checkpoints = 5
  c.train.progress_bar = False
  c.train.async_checkpoint = False
  return c


def tiny_student_config(cache_dir: str, teacher_dir: str, preset: str = "pkt",
                        steps_per_layer: int = 4, distill_steps: int = 4, layers: int = 2):
  c = distill_mobilebert.get_config(f"smoke,preset={preset}")
  c.model = common.model_section("mobilebert_micro", num_hidden_layers=layers,
                                 max_position_embeddings=32)
  tiny_data(c, cache_dir)
  c.data.vocab = os.path.join(teacher_dir, "tokenizer")
  c.teacher.checkpoint = teacher_dir
  c.schedule.steps_per_layer = steps_per_layer
  c.schedule.transfer_steps = steps_per_layer * layers
  c.schedule.distill_steps = distill_steps
  c.schedule.warmup_steps = 1
  c.train.log_every = 1
  c.train.eval_every = 1000
  c.train.eval_steps = 2
  c.train.checkpoint_every = 2
  c.train.keep_checkpoints = 20
  c.train.progress_bar = False
  c.train.async_checkpoint = False
  return c


def metrics_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir: str) -> dict[int, float]:
  """step -> loss of the last logged row for that step (a resumed run re-logs steps)."""
  return {r["step"]: r["loss"] for r in metrics_rows(workdir) if "loss" in r}


def final_params(workdir: str, step: int | None = None) -> dict[str, np.ndarray]:
  from flax import traverse_util
  from mbert_jax.interop.model_source import load_run
  _, params, _ = load_run(workdir, step)
  return traverse_util.flatten_dict(params, sep="/")


def checkpoint_steps(workdir: str) -> list[int]:
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                if os.path.basename(p).isdigit())


def config_strings(cfg):
  """Every string value of a (nested) config: where an unsubstituted `{workdir}` would hide."""
  for value in cfg.values():
    if hasattr(value, "keys"):
      yield from config_strings(value)
    elif isinstance(value, str):
      yield value
