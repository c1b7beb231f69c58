"""Build the configured data pipeline and print one JSON object describing what it produces
(the code of `python -m mbert_jax.data.inspect`).

  python -m mbert_jax.data.inspect --config=configs/demo.py [--config.data.vocab=train:2000]
      [--workdir=DIR] [--split=train|eval] [--batches=20] [--show=N]

Rates come from the first `--batches` batches (steps 0..batches-1) as the trainer sees them:
mask_rate = predictions / real tokens; the three token rates split the masked positions into
[MASK] / random replacement / kept (a random draw of the original token counts as kept).
examples_per_second times batch_at alone, on this one process, after the cache is built.
`token_accounting` says where the corpus's tokens went (read, used, dropped by cause) and
`sentence_splitters` how each source was read and why. A known error (missing or empty corpus,
a binary file, a bad setting) prints one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mbert_jax.cli import guarded
from mbert_jax.data.pipeline import Pipeline, build_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with a `data` section.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Where the data cache lives (default: ~/.cache/mbert_jax/inspect).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Which split to inspect.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Batches measured (from step 0).")
_SHOW = flags.DEFINE_integer("show", 0, "Also print this many decoded examples.")


def default_workdir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "mbert_jax", "inspect")


def batch_statistics(batches: list[dict[str, np.ndarray]], mask_id: int) -> dict[str, float]:
  """Masking, NSP and length statistics over a list of batches."""
  weights = np.concatenate([b["masked_lm_weights"] for b in batches]) > 0
  real = np.concatenate([b["attention_mask"] for b in batches]).sum()
  inputs = np.concatenate([np.take_along_axis(b["input_ids"], b["masked_lm_positions"], axis=1)
                           for b in batches])[weights]
  originals = np.concatenate([b["masked_lm_ids"] for b in batches])[weights]
  n = max(1, len(inputs))
  as_mask = inputs == mask_id
  kept = (inputs == originals) & ~as_mask
  labels = np.concatenate([b["next_sentence_labels"] for b in batches])
  lengths = np.concatenate([b["attention_mask"].sum(axis=1) for b in batches])
  return {
      "mask_rate": float(weights.sum() / max(1, real)),
      "mask_token_rate": float(as_mask.sum() / n),
      "random_token_rate": float((~as_mask & ~kept).sum() / n),
      "kept_token_rate": float(kept.sum() / n),
      "nsp_random_rate": float(labels.mean()),
      "mean_real_tokens": float(lengths.mean()),
      "mean_predictions": float(weights.sum() / len(labels)),
  }


def decoded_examples(pipe: Pipeline, count: int) -> list[dict[str, Any]]:
  """The first `count` examples of the stream, decoded: segments A and B with the original
  tokens, the masked input as the model sees it, and each prediction target."""
  out = []
  for ex in (pipe.example_at(g) for g in range(count)):
    tokens, la = ex["tokens"], int(ex["len_a"])
    out.append({
        "segment_a": pipe.decode(tokens[1:1 + la]),
        "segment_b": pipe.decode(tokens[2 + la:-1]),
        "is_random_next": bool(ex["is_random_next"]),
        "masked_input": pipe.decode(ex["input_ids"]),
        "predictions": [
            {"position": int(p), "target": pipe.tokenizer.id_to_token(int(t)),
             "input": pipe.tokenizer.id_to_token(int(ex["input_ids"][p]))}
            for p, t in zip(ex["positions"], ex["labels"])],
    })
  return out


def inspect_pipeline(pipe: Pipeline, batches: int = 20, show: int = 0) -> dict[str, Any]:
  if batches < 1:
    raise ValueError(f"--batches={batches}: need at least one batch")
  pipe.batch_at(0)  # pairing table and page cache warm: time the steady state
  start = time.perf_counter()
  measured = [pipe.batch_at(s) for s in range(batches)]
  elapsed = time.perf_counter() - start
  stats = pipe.stats
  report: dict[str, Any] = {
      "split": pipe.split,
      "documents": stats["documents"],
      "skipped_documents": stats["skipped_documents"],
      "flagged_documents": stats["flagged_documents"],
      "sentences": stats["sentences"],
      "tokens": stats["tokens"],
      "unk_rate": stats["unk_rate"],
      "sentence_splitters": stats.get("sentence_splitters", []),
      "token_accounting": stats["token_accounting"],
      "vocab_size": pipe.vocab_size,
      "examples": pipe.num_examples,
      "batch_size": pipe.batch_size,
      "max_seq_length": pipe.max_seq_length,
      "max_predictions_per_seq": pipe.max_predictions_per_seq,
      "static_masking": pipe.static_masking,
      **batch_statistics(measured, pipe.special_ids["mask"]),
      "examples_measured": batches * pipe.batch_size,
      "examples_per_second": batches * pipe.batch_size / elapsed,
  }
  if show:
    report["shown"] = decoded_examples(pipe, show)
  return report


def run(config) -> None:
  pipe = build_pipeline(config.data, _WORKDIR.value or default_workdir(), split=_SPLIT.value)
  report = inspect_pipeline(pipe, _BATCHES.value, _SHOW.value)
  sys.stdout.write(json.dumps(report, indent=2) + "\n")


def main(argv):
  """The command's body, run by absl's `app.run` (mbert_jax/data/inspect.py)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required (a config file whose get_config() has `data`)")
  if "data" not in config:
    raise app.UsageError("the config has no `data` section")
  guarded(run, config)
