"""The config sections the training loop reads (`train`, `mesh`, `distributed`), defined once for
pretraining, distillation and fine-tuning: their defaults, their checks, the optimizer they
describe, and which of their fields a resumed run may change.

Each objective adds its own fields on top (a pretraining config its learning rate, a
fine-tuning config its epochs and warm-up proportion); config files compose the sections
(configs/common.py).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import ml_collections

from mbert_jax.training import optim

DTYPES = ("float32", "bfloat16")

# Fields whose change leaves the checkpoints valid: cadence, placement and, per objective, the
# field that says where a run stops (its task's `stop_field`). A workdir refuses a rerun that
# changes any other field (`workdir.claim`).
RESUMABLE_TRAIN_FIELDS = ("log_every", "eval_every", "eval_steps", "checkpoint_every",
                          "keep_checkpoints", "async_checkpoint", "progress_bar",
                          "compilation_cache_dir", "max_nonfinite_steps", "compute_dtype")


def train_section(**overrides: Any) -> ml_collections.ConfigDict:
  """How a run trains: optimizer, cadence, seed, precision. `overrides` set the defaults that
  differ by objective (fine-tuning uses AdamW, evaluates at the end, keeps two checkpoints)."""
  t = ml_collections.ConfigDict()
  t.steps = -1                # the step to stop at; -1 = the schedule's (or the epochs') end
  t.optimizer = "lamb"        # lamb (TF1, no bias correction) | adamw | adamw_tf1 | adam
  t.weight_decay = 0.01
  t.clip_norm = 1.0
  t.b1 = 0.9
  t.b2 = 0.999
  t.eps = 1e-6
  t.grad_accum_steps = 1      # micro-batches per step (the loop accumulates their gradients)
  t.log_every = 50
  t.eval_every = 500          # 0 = evaluate only at the end
  t.eval_steps = 10           # held-out batches per evaluation
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.async_checkpoint = True
  t.seed = 0
  t.compute_dtype = "float32"  # float32 | bfloat16 (params, optimizer state, losses stay fp32)
  t.max_nonfinite_steps = 20  # consecutive skipped steps before the run stops
  t.progress_bar = True
  t.compilation_cache_dir = ""  # persistent XLA cache; empty = off
  for key, value in overrides.items():
    t[key] = value
  return t


def mesh_section() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.data = -1                 # -1: every device not used by the other axes
  m.fsdp = 1
  m.tensor = 1
  m.logical_axis_rules = ()   # extra (logical, mesh axis) pairs, tried before the defaults
  return m


def distributed_section() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.initialize = "auto"       # auto: when the environment names a cluster (SLURM, TPU pod, ...)
  d.coordinator_address = ""
  d.num_processes = -1
  d.process_id = -1
  d.cpu_collectives = "gloo"  # multi-process CPU runs (tests, development)
  return d


def require_sections(config: ml_collections.ConfigDict, names: Iterable[str],
                     hint: str = "") -> None:
  for name in names:
    if name not in config:
      raise ValueError(f"config has no `{name}` section{hint}")


def validate_train_section(t: ml_collections.ConfigDict, *, eval_every_may_be_zero: bool) -> None:
  """The checks every objective shares; raises ValueError naming the field."""
  if int(t.steps) == 0 or int(t.steps) < -1:
    raise ValueError(f"train.steps = {t.steps}: the step to stop at, or -1 for the schedule's "
                     "end")
  for name in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps",
               "grad_accum_steps") + (("eval_steps",) if "eval_steps" in t else ()):
    if int(t[name]) < 1:
      raise ValueError(f"train.{name} = {t[name]} must be >= 1")
  if eval_every_may_be_zero and int(t.eval_every) < 0:
    raise ValueError(f"train.eval_every = {t.eval_every}: >= 1, or 0 for the end only")
  if not eval_every_may_be_zero and int(t.eval_every) < 1:
    raise ValueError(f"train.eval_every = {t.eval_every} must be >= 1")
  if t.compute_dtype not in DTYPES:
    raise ValueError(f"train.compute_dtype = {t.compute_dtype!r}: float32 or bfloat16")


def optimizer_config(t: ml_collections.ConfigDict, learning_rate: float, *,
                     schedule: str = "constant", total_steps: int | None = None,
                     warmup_steps: int = 0, end_factor: float | None = None,
                     power: float = 1.0) -> ml_collections.ConfigDict:
  """The optimizer that `train`'s fields describe, at `learning_rate` with the given schedule
  (`optim.validate_optimizer_config` checks every field)."""
  o = optim.default_optimizer_config()
  o.name = t.optimizer
  o.learning_rate = float(learning_rate)
  o.b1, o.b2, o.eps = float(t.b1), float(t.b2), float(t.eps)
  o.weight_decay = float(t.weight_decay)
  o.clip_norm = float(t.clip_norm) if t.clip_norm else None
  o.schedule = schedule
  if total_steps is not None:
    o.total_steps = int(total_steps)
  o.warmup_steps = int(warmup_steps)
  if end_factor is not None:
    o.end_factor = float(end_factor)
  o.power = float(power)
  return optim.validate_optimizer_config(o)


def identity_sections(config: Mapping[str, Any], sections: Iterable[str], stop_field: str,
                      resumable: Mapping[str, Iterable[str]]) -> dict[str, Any]:
  """`sections` of a config as a run identity: each without its `resumable` fields; `train`
  always without RESUMABLE_TRAIN_FIELDS and the run's stop field (`train.<name>`)."""
  c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  stop = stop_field.split(".", 1)[1]
  skip = {**resumable,
          "train": RESUMABLE_TRAIN_FIELDS + (stop,) + tuple(resumable.get("train", ()))}
  return {name: {k: v for k, v in c[name].items() if k not in skip.get(name, ())}
          for name in sections if name in c}
