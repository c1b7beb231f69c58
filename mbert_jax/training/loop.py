"""The one training loop: teacher pretraining, every knowledge-transfer schedule and GLUE/SQuAD
fine-tuning run through `run(task, workdir)`.

Reads top to bottom: the workdir is claimed (a run of another configuration is refused) -> the
task's `setup` reads its inputs and builds its models and stages on the mesh (every input error
surfaces here, before anything is compiled) -> the state is restored or initialised -> per
stage: one compiled step (training/step.py) -> steps (non-finite guard, log, evaluate,
checkpoint, preemption) -> final evaluation and report.

What differs between objectives lives in a `Task` (training/task.py; mbert_jax/distill/task.py
for pretraining and distillation, mbert_jax/finetune/task.py for fine-tuning); the loop knows
no objective and no model's parameter paths. Everything that decides numbers is a pure
function of (config, step), which is what makes a resumed run equal an uninterrupted one bit for
bit on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mbert_jax.errors import NonFiniteError
from mbert_jax.training import checkpoint as ckpt_lib
from mbert_jax.training import metrics as metrics_lib
from mbert_jax.training import sharding
from mbert_jax.training import workdir as workdir_lib
from mbert_jax.training.state import (TrainState, abstract_state, fresh_opt_state, parameter_norm,
                                      state_shardings)
from mbert_jax.training.step import jit_train_step
from mbert_jax.training.task import Setup, StagePlan, Task


class Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """Every process stops at the same step: one SIGTERM anywhere stops them all."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
    return bool(np.max(flags))


def _check_nonfinite(state: TrainState, step: int, limit: int, ckpt) -> None:
  bad = int(jax.device_get(state.nonfinite))
  if bad >= limit:
    ckpt.wait()
    raise NonFiniteError(
        f"{bad} consecutive steps had a non-finite loss or gradient (up to step {step}); the "
        "updates were skipped and no checkpoint was written after them. Lower the learning "
        "rate, check the data, or raise train.max_nonfinite_steps.")


def _initial_state(setup: Setup, mesh) -> TrainState:
  # Three distinct buffers: the state is donated, and one buffer cannot be donated twice.
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  return TrainState(step=zero(), params=setup.init_params(), opt_state=None, nonfinite=zero(),
                    skipped=zero())


@dataclasses.dataclass
class _Run:
  """What every stage of one run shares: the task, the mesh, the parameter layout and the
  run's outputs (checkpoints, metrics, console)."""
  task: Task
  setup: Setup
  workdir: str
  mesh: Any
  ckpt: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricWriter
  progress: metrics_lib.Progress
  stage_times: dict = dataclasses.field(default_factory=dict)

  @property
  def stop(self) -> int:
    return self.setup.stop_step

  @property
  def total(self) -> int:
    return self.setup.total_steps

  def state_shardings(self, tx) -> TrainState:
    return state_shardings(self.setup.param_shardings, tx, self.setup.abstract_params, self.mesh)

  def eval_due(self, step: int) -> bool:
    every = int(self.task.config.train.eval_every)  # 0: at the end only
    return bool(every) and step % every == 0

  def evaluate(self, params, step: int, final: bool) -> dict[str, float]:
    result = self.setup.evaluate(params, step, final)
    self.writer.write(step, result)
    if result:
      self.progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result

  def save(self, step: int, state: TrainState) -> None:
    # The stage that ran the step just taken: at a stage boundary the checkpoint holds that
    # stage's optimizer state, and resuming there builds the next stage's from it.
    idx, _, _ = self.setup.stage_index(step - 1)
    self.ckpt.save(step, state.as_dict(), {"step": int(step), "stage_index": int(idx)})


def _claim_and_set_up(task: Task, workdir: str, mesh) -> Setup:
  """The workdir claim, then the inputs: a refused run writes nothing but its claim."""
  workdir_lib.claim(workdir, task.identity())
  setup = task.setup(workdir, mesh, sharding.rules_from_config(task.config.mesh))
  for name, content in setup.files.items():
    workdir_lib.write_json(os.path.join(workdir, name), content)
  if jax.process_index() == 0:
    setup.write_side_files(workdir)
  return setup


def _restore_or_init(r: _Run) -> tuple[int, TrainState]:
  def target_for(meta) -> dict:
    tx = r.setup.stages[int(meta.get("stage_index", 0))].tx
    return abstract_state(r.state_shardings(tx), r.setup.abstract_params, tx).as_dict()

  restored = r.ckpt.restore_latest_good(target_for)
  if restored is not None:
    start, state_dict, _ = restored
    logging.info("resumed %s from step %d", r.workdir, start)
    return start, TrainState.from_dict(state_dict)
  return 0, _initial_state(r.setup, r.mesh)


def _compile_stage(r: _Run, plan: StagePlan, state: TrainState, batch, st_sh):
  """The stage's step, compiled ahead of its first call, so compile time is its own metric and
  never part of a throughput or MFU window."""
  tc = r.task.config.train
  # Per stage: a stage may add batch fields (cached teacher targets).
  batch_sh = {k: v.sharding for k, v in batch.items()}
  # Nothing in flight while compiling: on XLA:CPU a sharded program still running its
  # collectives next to a compile can starve the shared thread pool and deadlock.
  jax.block_until_ready((state, plan.aux, batch))
  return jit_train_step(plan, int(tc.seed), int(tc.grad_accum_steps), st_sh, batch_sh, r.mesh,
                        sharding.rules_from_config(r.task.config.mesh)
                        ).lower(state, plan.aux, batch).compile()


def _log_step(r: _Run, plan: StagePlan, idx: int, stage_start: int, step: int, state, out,
              window) -> None:
  tc = r.task.config.train
  host = {k: float(v) for k, v in jax.device_get(out).items()}
  host["param_norm"] = float(parameter_norm(state.params))
  host.pop("finite", None)
  host.update(learning_rate=float(plan.learning_rate(step - stage_start - 1)),
              stage=float(idx), skipped_steps=float(jax.device_get(state.skipped)))
  host.update(window.rates(r.setup.global_batch_size, plan.flops_per_example, tc.compute_dtype))
  r.writer.write(step, host)
  r.progress.update(step, {"loss": host["loss"], "stage": plan.name})


def _run_stage(r: _Run, state: TrainState, step: int, preemption: Preemption,
               last_eval: dict) -> tuple[TrainState, int, bool, dict]:
  """Steps of the stage `step` is in, up to its end or the run's stop; returns (state, step,
  preempted, last evaluation)."""
  tc = r.task.config.train
  idx, stage_start, in_stage = r.setup.stage_index(step)
  plan = r.setup.stages[idx]
  stage_end = min(r.stop, stage_start + plan.steps)
  st_sh = r.state_shardings(plan.tx)
  # A stage boundary gets a new optimizer (moments reset or carried as the stage says); a
  # checkpoint holds the state of the stage that wrote it, so resuming there does the same.
  if state.opt_state is None or in_stage == 0:
    state = state.replace(opt_state=fresh_opt_state(
        plan.tx, state.params, st_sh.opt_state, previous=state.opt_state,
        reset=plan.reset_optimizer))
  if plan.banner:
    r.progress.write(plan.banner)
  t_stage = time.perf_counter()
  batch = sharding.global_batch(r.setup.batch_at(step), r.mesh)
  step_fn = _compile_stage(r, plan, state, batch, st_sh)
  r.writer.write(step, {f"time/compile_stage_{idx:02d}_seconds": time.perf_counter() - t_stage})
  window = metrics_lib.ThroughputWindow()
  limit, preempted = int(tc.max_nonfinite_steps), False
  while step < stage_end:
    if batch is None:
      batch = sharding.global_batch(r.setup.batch_at(step), r.mesh)
    state, out = step_fn(state, plan.aux, batch)
    batch = None
    step += 1
    window.count(1)
    at_log = step % int(tc.log_every) == 0 or step == stage_end
    if at_log or step % limit == 0 or step % int(tc.checkpoint_every) == 0:
      _check_nonfinite(state, step, limit, r.ckpt)
    if at_log:
      _log_step(r, plan, idx, stage_start, step, state, out, window)
    if r.eval_due(step) and step < r.total:
      last_eval = r.evaluate(state.params, step, final=False)
    saved = step % int(tc.checkpoint_every) == 0 or step == stage_end
    if saved:
      r.save(step, state)
    if preemption.agreed() and step < r.stop:
      if not saved:  # a step that has just been saved is not saved twice
        r.save(step, state)
      r.ckpt.wait()
      preempted = True
      break
  seconds = time.perf_counter() - t_stage
  r.stage_times[plan.name] = r.stage_times.get(plan.name, 0.0) + seconds
  r.writer.write(step, {f"time/stage_{idx:02d}_seconds": r.stage_times[plan.name]})
  return state, step, preempted, last_eval


def run(task: Task, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) `task` in `workdir`; returns the final report."""
  t_start = time.time()
  tc = task.config.train
  if tc.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", tc.compilation_cache_dir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(task.config.mesh)
  setup = _claim_and_set_up(task, workdir, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR),
                               keep=int(tc.keep_checkpoints), async_save=bool(tc.async_checkpoint))
  r = _Run(task, setup, workdir, mesh, ckpt, metrics_lib.MetricWriter(workdir, enabled=is_main),
           None)
  start, state = _restore_or_init(r)
  r.progress = metrics_lib.Progress(r.stop, start, enabled=is_main and bool(tc.progress_bar))
  metrics_lib.warn_if_no_mfu(tc.compute_dtype, r.progress.write if is_main else None)

  step, last_eval, preempted = start, {}, False
  with Preemption() as preemption:
    while step < r.stop and not preempted:
      state, step, preempted, last_eval = _run_stage(r, state, step, preemption, last_eval)
  ckpt.close()
  r.progress.close()
  return _finish(r, state, step, preempted, last_eval, t_start)


def _finish(r: _Run, state: TrainState, step: int, preempted: bool, last_eval: dict,
            t_start: float) -> dict[str, Any]:
  """The final evaluation of a completed run, its report and the console's last word."""
  status = "preempted" if preempted else ("stopped" if step < r.total else "completed")
  if status == "completed":
    last_eval = r.evaluate(state.params, step, final=True)
  report = {"status": status, "step": int(step), "total_steps": int(r.total),
            "stage_seconds": r.stage_times, "wall_seconds": time.time() - t_start,
            "checkpoints": r.ckpt.directory, "eval": last_eval,
            "skipped_steps": int(jax.device_get(state.skipped)), **r.setup.report()}
  if status == "completed":
    workdir_lib.write_json(os.path.join(r.workdir, workdir_lib.DONE_FILE),
                           {**report, "eval": metrics_lib.json_safe(last_eval)})
  elif status == "preempted":
    r.progress.write(f"preempted: saved step {step} to {r.ckpt.directory}; rerun the same "
                     "command to resume")
  else:
    r.progress.write(f"stopped at step {step} of {r.total}; rerun with a later stop "
                     f"({r.task.stop_field}) to go on")
  r.writer.close()
  return report
