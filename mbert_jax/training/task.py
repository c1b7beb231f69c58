"""What the loop asks of an objective: its stages (`StagePlan`) and the `Task` that gives them."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import jax
import ml_collections
import numpy as np
import optax


LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class ParamSubset:
  """The part of a param-shaped tree that a stage trains: `take(tree)` cuts it out (params,
  gradients and optimizer moments alike), `put(full, part)` writes it back in place."""
  take: Callable[[Any], Any]
  put: Callable[[Any, Any], Any]
  description: str = ""


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One stage as the loop sees it: its steps, its optimizer and its loss.

  `loss(params, aux, batch, rng) -> (loss, terms)` is traced inside the compiled step; `aux`
  is whatever the stage needs besides the params (the teacher's params), passed as an argument
  so it is sharded, not baked into the program. `learning_rate(step_in_stage)` is logged.
  `trained`: when set, the step differentiates and updates only `trained.take(params)` (and the
  same part of the optimizer state) and writes it back with `trained.put`; the rest gets no
  gradient for the whole stage (a truncated phase that trains only its first layers).
  """
  name: str
  steps: int
  tx: optax.GradientTransformation
  loss: LossFn
  learning_rate: Callable[[int], float]
  reset_optimizer: bool = True
  aux: Any = None
  flops_per_example: float | None = None
  banner: str = ""
  trained: ParamSubset | None = None


@dataclasses.dataclass(frozen=True)
class Setup:
  """A task made ready to run in one workdir on one mesh: everything the loop needs, built in
  one place (`Task.setup`), so nothing depends on the order of calls.

  `stages` run one after another (their `steps` add up to `total_steps`); the run stops at
  `stop_step` (<= `total_steps`; a later stop resumes it). `batch_at(step)` is this process's
  rows of the global batch of `step`; `evaluate(params, step, final)` returns the metrics to log
  (and, when `final`, writes whatever the run leaves behind, such as predictions).
  """
  stages: tuple[StagePlan, ...]
  abstract_params: Any
  param_shardings: Any
  init_params: Callable[[], Any]
  batch_at: Callable[[int], dict[str, np.ndarray]]
  evaluate: Callable[[Any, int, bool], dict[str, float]]
  global_batch_size: int
  total_steps: int
  stop_step: int
  files: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # JSON files of the workdir
  write_side_files: Callable[[str], None] = lambda workdir: None      # e.g. the tokenizer
  report: Callable[[], dict[str, Any]] = dict                         # merged into the report

  def stage_index(self, step: int) -> tuple[int, int, int]:
    """(stage index, the stage's first step, steps into it) of `step`; the last stage takes
    every step past the schedule's end."""
    start = 0
    for i, plan in enumerate(self.stages):
      if step < start + plan.steps or i == len(self.stages) - 1:
        return i, start, step - start
      start += plan.steps
    raise ValueError("a setup without stages")


class Task(Protocol):
  """One objective (pretraining and distillation: `distill.task.PretrainTask`; fine-tuning:
  `finetune.task.FinetuneTask`). Constructing one from its config checks every field that
  needs no data and no compile; `setup` does all I/O, refusing bad inputs before anything is
  compiled."""
  config: ml_collections.ConfigDict  # the loop reads its `train` and `mesh` sections
  stop_field: str                    # the config field that sets where a run stops

  def identity(self) -> dict[str, Any]:
    """What the run's checkpoints depend on; a workdir refuses a run of another identity."""

  def setup(self, workdir: str, mesh, rules) -> Setup: ...
