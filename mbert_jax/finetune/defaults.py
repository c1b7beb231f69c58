"""Default fine-tuning hyperparameters (the TF1 release's `run_classifier.py`, `run_squad.py`
and README).

The optimizer block is shared: TF1's AdamWeightDecayOptimizer (`adamw_tf1`: AdamW without
bias correction) with β 0.9/0.999, ε 1e-6, weight decay 0.01 (not on LayerNorm/NoNorm
parameters and biases: `optim.excluded_from_decay`), linear warm-up over 10% of the steps, then
linear decay to lr × 1e-4, global-norm clipping at 1.0. The paper tuned batch {16, 32, 48},
lr (1–10)e-5 and 2–10 epochs per task; these are the starting points, not the tuned values
(sweep them with a sweep file over `train.learning_rate`, `data.batch_size`, `train.epochs`).
Every key here is read by `finetune.task.default_config`.
"""

from __future__ import annotations

import copy
from typing import Any

from mbert_jax.finetune.glue import get_task

__all__ = ["OPTIMIZER_DEFAULTS", "GLUE_DEFAULTS", "SQUAD_DEFAULTS", "glue_defaults",
           "squad_defaults"]

OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw_tf1",
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-6,
    "weight_decay": 0.01,
    "warmup_proportion": 0.1,
    "end_lr_ratio": 1e-4,
    "grad_clip_norm": 1.0,
}

GLUE_DEFAULTS: dict[str, Any] = {
    **OPTIMIZER_DEFAULTS,
    "learning_rate": 5e-5,
    "num_epochs": 3,
    "batch_size": 32,
    "max_seq_length": 128,
    "classifier_dropout": 0.1,
    "lower_case": True,
}

SQUAD_DEFAULTS: dict[str, Any] = {
    **OPTIMIZER_DEFAULTS,
    "learning_rate": 4e-5,
    "num_epochs": 5,
    "batch_size": 32,
    "max_seq_length": 384,
    "doc_stride": 128,
    "max_query_length": 64,
    "max_answer_length": 30,
    "n_best_size": 20,
    "null_score_diff_threshold": 0.0,
    "lower_case": True,
}

def glue_defaults(task: str) -> dict[str, Any]:
  """`GLUE_DEFAULTS` plus the task's `num_labels`, `is_regression`, `main_metric` and the
  splits it is evaluated on (a fresh dict: edit freely)."""
  spec = get_task(task)
  out = copy.deepcopy(GLUE_DEFAULTS)
  out.update(task=spec.name, num_labels=spec.num_labels, is_regression=spec.is_regression,
             main_metric=spec.main_metric, eval_splits=spec.eval_splits)
  return out


def squad_defaults(version: str = "1.1") -> dict[str, Any]:
  """`SQUAD_DEFAULTS` for v1.1 or v2.0 (v2.0 turns on no-answer prediction)."""
  v = str(version).lower().lstrip("v")
  if v not in ("1", "1.1", "2", "2.0"):
    raise ValueError(f"SQuAD version must be '1.1' or '2.0', got {version!r}")
  out = copy.deepcopy(SQUAD_DEFAULTS)
  out.update(version="2.0" if v.startswith("2") else "1.1",
             version_2_with_negative=v.startswith("2"))
  return out
