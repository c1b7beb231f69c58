"""The one training loop: teacher pretraining, every knowledge-transfer schedule and GLUE/SQuAD
fine-tuning run through `run(task, workdir)`.

Reads top to bottom: the task prepares its data and models (every input error surfaces here,
before anything is written or compiled) -> the workdir is claimed (a run of another
configuration is refused) -> mesh, sharded state (restored or initialised) -> per stage: the
task's optimizer and loss, one compiled step -> loop (non-finite guard, log, evaluate,
checkpoint, preemption) -> final evaluation and report.

What differs between objectives lives in a `Task` (mbert_jax/pretrain.py for pretraining and
distillation, mbert_jax/finetune/trainer.py for fine-tuning). Everything that decides numbers
is a pure function of (config, step), which is what makes a resumed run equal an uninterrupted
one bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mbert_jax import checkpoint as ckpt_lib
from mbert_jax import metrics as metrics_lib
from mbert_jax import optim
from mbert_jax import sharding
from mbert_jax import workdir as workdir_lib
from mbert_jax.errors import NonFiniteError
from mbert_jax.workdir import DONE_FILE  # re-exported: callers check a run's end by it

__all__ = ["TrainState", "StagePlan", "Task", "run", "run_config", "train_and_evaluate",
           "guarded_update", "NonFiniteError", "DONE_FILE"]


# ============================================================================ state

@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds: the step, params, optimizer state and the non-finite counters
  (consecutive skipped steps, total skipped steps)."""
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite: jax.Array
  skipped: jax.Array

  def as_dict(self) -> dict[str, Any]:
    # Checkpoints store a plain dict, so their layout does not depend on this class.
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainState":
    return cls(**d)


def state_shardings(param_shardings, tx, abstract_params, mesh) -> TrainState:
  """Shardings of the whole train state; optimizer moments follow their parameters."""
  rep = sharding.replicated(mesh)
  opt = sharding.follow_params(jax.eval_shape(tx.init, abstract_params), param_shardings,
                               abstract_params, mesh)
  return TrainState(step=rep, params=param_shardings, opt_state=opt, nonfinite=rep, skipped=rep)


def abstract_state(shardings: TrainState, abstract_params, tx) -> TrainState:
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  shapes = TrainState(step=scalar, params=abstract_params,
                      opt_state=jax.eval_shape(tx.init, abstract_params), nonfinite=scalar,
                      skipped=scalar)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


def fresh_opt_state(tx, params, opt_shardings, previous=None, reset: bool = True):
  """New optimizer state; without `reset`, moments carry over and only the count restarts."""
  state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  if reset or previous is None or jax.tree.structure(previous) != jax.tree.structure(state):
    return state

  def keep_moments(path, new, old):
    return new if "count" in jax.tree_util.keystr(path) else old
  return jax.tree_util.tree_map_with_path(keep_moments, state, previous)


def guarded_update(state: TrainState, tx, loss, grads) -> tuple[TrainState, jax.Array, jax.Array]:
  """One optimizer update, skipped (and counted) when the loss, the gradient or the updated
  parameters are not finite, so no checkpoint can ever hold a non-finite parameter.

  Returns (new state, gradient norm, finite flag).
  """
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32),
      skipped=(state.skipped + (~finite).astype(jnp.int32)).astype(jnp.int32),
  ), grad_norm, finite


# ============================================================================ the task interface

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One stage as the loop sees it: its steps, its optimizer and its loss.

  `loss(params, aux, batch, rng) -> (loss, terms)` is traced inside the compiled step; `aux`
  is whatever the stage needs besides the params (the teacher's params), passed as an argument
  so it is sharded, not baked into the program. `learning_rate(step_in_stage)` is logged.
  `active_layers = n`: layer slices n.. of the stacked encoder get no gradient and a
  multiplier of 0 for the whole stage and start it with zero moments (a truncated phase that
  resets the optimizer), so the step updates only the first n (`make_train_step`).
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
  active_layers: int | None = None


class Task(Protocol):
  """What one objective gives the loop. Built from a config; `prepare` does all I/O and every
  check that can fail on the user's inputs, before anything is written or compiled."""
  config: ml_collections.ConfigDict

  def prepare(self, workdir: str) -> None: ...
  def identity(self) -> dict[str, Any]: ...
  def files(self) -> dict[str, Any]: ...
  def save_side_files(self, workdir: str) -> None: ...
  def total_steps(self) -> int: ...
  def stop_step(self) -> int: ...
  def build(self, mesh, rules) -> None: ...
  def abstract_params(self) -> tuple[Any, Any]: ...
  def init_params(self) -> Any: ...
  def stage_index(self, step: int) -> tuple[int, int, int]: ...
  def stage(self, index: int) -> StagePlan: ...
  def batch_at(self, step: int) -> dict[str, np.ndarray]: ...
  def evaluate(self, params, step: int, final: bool) -> dict[str, float]: ...
  def checkpoint_meta(self, step: int) -> dict[str, Any]: ...
  def global_batch_size(self) -> int: ...
  def eval_due(self, step: int) -> bool: ...
  def report(self) -> dict[str, Any]: ...
  stop_field: str  # the config field that sets where a run stops


# ============================================================================ the run

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


def _initial_state(task: Task, mesh) -> TrainState:
  # Three distinct buffers: the state is donated, and one buffer cannot be donated twice.
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  return TrainState(step=zero(), params=task.init_params(), opt_state=None, nonfinite=zero(),
                    skipped=zero())


def run(task: Task, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) `task` in `workdir`; returns the final report."""
  t_start = time.time()
  tc = task.config.train
  if tc.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", tc.compilation_cache_dir)
  is_main = jax.process_index() == 0

  # ---- the workdir claim, then the inputs: a refused run writes nothing
  workdir_lib.claim(workdir, task.identity())
  task.prepare(workdir)
  for name, content in task.files().items():
    workdir_lib.write_json(os.path.join(workdir, name), content)
  if is_main:
    task.save_side_files(workdir)

  mesh = sharding.make_mesh(task.config.mesh)
  rules = sharding.rules_from_config(task.config.mesh)
  task.build(mesh, rules)
  abs_params, p_shardings = task.abstract_params()
  total, stop = task.total_steps(), task.stop_step()

  # ---- state: restore or initialise
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR),
                               keep=int(tc.keep_checkpoints), async_save=bool(tc.async_checkpoint))

  def target_for(meta) -> dict:
    tx = task.stage(int(meta.get("stage_index", 0))).tx
    return abstract_state(state_shardings(p_shardings, tx, abs_params, mesh), abs_params,
                          tx).as_dict()

  restored = ckpt.restore_latest_good(target_for)
  if restored is not None:
    start, state_dict, meta = restored
    state = TrainState.from_dict(state_dict)
    logging.info("resumed %s from step %d", workdir, start)
  else:
    start, state = 0, _initial_state(task, mesh)

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  progress = metrics_lib.Progress(stop, start, enabled=is_main and bool(tc.progress_bar))
  metrics_lib.warn_if_no_mfu(tc.compute_dtype, progress.write if is_main else None)

  def evaluate(params, step: int, final: bool) -> dict[str, float]:
    result = task.evaluate(params, step, final)
    writer.write(step, result)
    if result:
      progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result

  status, step, last_eval, stage_times = "completed", start, {}, {}
  with Preemption() as preemption:
    while step < stop:
      idx, stage_start, in_stage = task.stage_index(step)
      plan = task.stage(idx)
      stage_end = min(stop, stage_start + plan.steps)
      st_sh = state_shardings(p_shardings, plan.tx, abs_params, mesh)
      # A stage boundary gets a new optimizer (moments reset or carried as the stage says); a
      # checkpoint holds the state of the stage that wrote it, so resuming there does the same.
      if state.opt_state is None or in_stage == 0:
        state = state.replace(opt_state=fresh_opt_state(
            plan.tx, state.params, st_sh.opt_state, previous=state.opt_state,
            reset=plan.reset_optimizer))
      aux_sh = jax.tree.map(lambda a: a.sharding, plan.aux)
      if plan.banner:
        progress.write(plan.banner)
      t_stage = time.perf_counter()
      local = task.batch_at(step)
      # Per stage: a stage may add batch fields (cached teacher targets).
      batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in local.items()}
      batch = sharding.global_batch(local, mesh)
      # Nothing in flight while compiling: on XLA:CPU a sharded program still running its
      # collectives next to a compile can starve the shared thread pool and deadlock.
      jax.block_until_ready((state, plan.aux, batch))
      # Compiled ahead of the first step, so compile time is its own metric and never part
      # of a throughput or MFU window.
      step_fn = jax.jit(make_train_step(plan, int(tc.seed), int(tc.grad_accum_steps)),
                        in_shardings=(st_sh, aux_sh, batch_sh),
                        out_shardings=(st_sh, sharding.replicated(mesh)),
                        donate_argnums=(0,)).lower(state, plan.aux, batch).compile()
      writer.write(step, {f"time/compile_stage_{idx:02d}_seconds": time.perf_counter() - t_stage})
      window = metrics_lib.ThroughputWindow()
      while step < stage_end:
        if batch is None:
          batch = sharding.global_batch(task.batch_at(step), mesh)
        state, out = step_fn(state, plan.aux, batch)
        batch = None
        step += 1
        window.count(1)
        at_log = step % int(tc.log_every) == 0 or step == stage_end
        if at_log or step % int(tc.max_nonfinite_steps) == 0 or step % int(tc.checkpoint_every) == 0:
          _check_nonfinite(state, step, int(tc.max_nonfinite_steps), ckpt)
        if at_log:
          host = {k: float(v) for k, v in jax.device_get(out).items()}
          host["param_norm"] = float(parameter_norm(state.params))
          host.pop("finite", None)
          host.update(learning_rate=float(plan.learning_rate(step - stage_start - 1)),
                      stage=float(idx), skipped_steps=float(jax.device_get(state.skipped)))
          host.update(window.rates(task.global_batch_size(), plan.flops_per_example,
                                   tc.compute_dtype))
          writer.write(step, host)
          progress.update(step, {"loss": host["loss"], "stage": plan.name})
        if task.eval_due(step) and step < total:
          last_eval = evaluate(state.params, step, final=False)
        saved = step % int(tc.checkpoint_every) == 0 or step == stage_end
        if saved:
          ckpt.save(step, state.as_dict(), task.checkpoint_meta(step))
        if preemption.agreed() and step < stop:
          if not saved:  # a step that has just been saved is not saved twice
            ckpt.save(step, state.as_dict(), task.checkpoint_meta(step))
          ckpt.wait()
          status = "preempted"
          break
      stage_times[plan.name] = stage_times.get(plan.name, 0.0) + time.perf_counter() - t_stage
      writer.write(step, {f"time/stage_{idx:02d}_seconds": stage_times[plan.name]})
      if status == "preempted":
        break
  ckpt.close()
  progress.close()

  if status != "preempted" and step < total:
    status = "stopped"
  if status == "completed":
    last_eval = evaluate(state.params, step, final=True)
  report = {"status": status, "step": int(step), "total_steps": int(total),
            "stage_seconds": stage_times, "wall_seconds": time.time() - t_start,
            "checkpoints": ckpt.directory, "eval": last_eval,
            "skipped_steps": int(jax.device_get(state.skipped)), **task.report()}
  if status == "completed":
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.DONE_FILE),
                           {**report, "eval": metrics_lib.json_safe(last_eval)})
  elif status == "preempted":
    progress.write(f"preempted: saved step {step} to {ckpt.directory}; rerun the same command "
                   "to resume")
  else:
    progress.write(f"stopped at step {step} of {total}; rerun with a later stop "
                   f"({task.stop_field}) to go on")
  writer.close()
  return report


def _map_layers(fn: Callable, tree: Any, *rest: Any) -> Any:
  """`fn` on every leaf stacked on the encoder's layer axis (params, gradients and optimizer
  moments alike: their paths name `encoder/layers/`); other leaves come from the last tree."""
  marker = "/" + optim.LAYER_AXIS_PREFIX

  def one(path, leaf, *others):
    stacked = marker in "/" + optim.param_path(path) and jnp.ndim(leaf) >= 1
    return fn(leaf, *others) if stacked else (others[-1] if others else leaf)
  return jax.tree_util.tree_map_with_path(one, tree, *rest)


def narrow_layers(tree: Any, n: int) -> Any:
  """The first `n` slices of every layer-stacked leaf."""
  return _map_layers(lambda x: x[:n], tree)


def widen_layers(full: Any, narrow: Any) -> Any:
  """`full` with its leading layer slices replaced by `narrow`'s (in place when donated)."""
  return _map_layers(lambda f, s: jax.lax.dynamic_update_slice_in_dim(f, s.astype(f.dtype), 0, 0),
                     full, narrow)


parameter_norm = jax.jit(optax.tree.norm)  # logged at log steps only, not in every step


def make_train_step(plan: StagePlan, seed: int, grad_accum: int) -> Callable:
  """The compiled step: gradients (accumulated over micro-batches), one guarded update.

  With `plan.active_layers = n` the loss sees only the first n layer slices of the student's
  stack, the gradients have that depth, and the update (clipping, optimizer, guard) runs on
  them and writes them back in place, so a truncated phase costs its depth. Differentiating
  the whole stack instead would zero a full-depth gradient every step and, in the layer loop's
  backward, add a stack-sized cotangent every iteration; the n-layer slice is the cheaper copy
  (benchmarks/progressive_cost.py). Nothing may read the old stacks after the write-back, or
  XLA copies each of them first (test_train.py checks the compiled step).
  """
  n = plan.active_layers

  def grad_fn(params, aux, batch, rng):
    return jax.value_and_grad(plan.loss, has_aux=True)(params, aux, batch, rng)

  def step(state: TrainState, aux, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    trained = state
    if n is not None:
      trained = state.replace(params=narrow_layers(state.params, n),
                              opt_state=narrow_layers(state.opt_state, n))
    (loss, terms), grads = optim.accumulate_gradients(
        lambda p, mb, r: grad_fn(p, aux, mb, r), trained.params, batch, grad_accum, rng=rng)
    new_state, grad_norm, finite = guarded_update(trained, plan.tx, loss, grads)
    if n is not None:
      new_state = new_state.replace(params=widen_layers(state.params, new_state.params),
                                    opt_state=widen_layers(state.opt_state, new_state.opt_state))
    # No param_norm here: the loop takes it at log steps (`parameter_norm`); in the step it
    # was a pass over every parameter each step, and reading the old stacks alongside the
    # in-place write-back made XLA copy every stack first.
    out = dict(terms)
    out.update(grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    return new_state, out

  return step


# ============================================================================ entry points

def task_for(config: ml_collections.ConfigDict):
  """A config with a `finetune` section fine-tunes on GLUE/SQuAD; any other one pretrains or
  distils."""
  if "finetune" in config:
    from mbert_jax.finetune.trainer import FinetuneTask
    return FinetuneTask(config)
  from mbert_jax.pretrain import PretrainTask
  return PretrainTask(config)


def validate_config(config: ml_collections.ConfigDict):
  """Every check that needs no data and no compile; raises ValueError naming the field."""
  return task_for(config)


def run_config(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return run(task_for(config), workdir)


train_and_evaluate = run_config  # the name the earlier releases and the tests use
