"""The training loop: teacher pretraining and every knowledge-transfer schedule.

Reads top to bottom: config -> data -> models (student, teacher) -> schedule -> sharded state
(restored or initialised) -> per stage: optimizer, compiled step -> loop (log, evaluate,
checkpoint, preemption) -> report. Pretraining is the one-stage `scratch` schedule, so one loop
serves both. Everything that decides numbers is a pure function of (config, step), which is
what makes a resumed run equal an uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mbert_jax import checkpoint as ckpt_lib
from mbert_jax import losses
from mbert_jax import metrics as metrics_lib
from mbert_jax import optim
from mbert_jax import schedule as schedule_lib
from mbert_jax import sharding
from mbert_jax.models import ModelConfig, build
from mbert_jax.models import summary as model_summary
from mbert_jax.errors import NonFiniteError
from mbert_jax.sharding import abstract_params, init_params
from mbert_jax.teacher import init_student_from_teacher, load_teacher
from mbert_jax.workdir import DONE_FILE, is_mbert_workdir, write_json

TERMS_NEEDING_HEADS = ("mlm", "kd")


# ============================================================================ config

def model_config_from(section, vocab_size: int, compute_dtype: str, max_seq_length: int) -> ModelConfig:
  d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  if d.get("vocab_size", -1) in (-1, None):
    d["vocab_size"] = vocab_size
  elif d["vocab_size"] != vocab_size:
    raise ValueError(f"model.vocab_size = {d['vocab_size']} but the tokenizer has {vocab_size} "
                     "tokens; set model.vocab_size=-1 to follow the tokenizer")
  d["compute_dtype"] = compute_dtype
  return ModelConfig.from_dict(d).validate(max_seq_length=max_seq_length)


def optimizer_config(train_cfg) -> ml_collections.ConfigDict:
  o = optim.default_optimizer_config()
  o.name = train_cfg.optimizer
  o.learning_rate = float(train_cfg.learning_rate)
  o.b1, o.b2, o.eps = train_cfg.b1, train_cfg.b2, train_cfg.eps
  o.weight_decay = float(train_cfg.weight_decay)
  o.clip_norm = train_cfg.clip_norm
  o.grad_accum_steps = train_cfg.grad_accum_steps
  o.warmup_steps = 0  # stages carry their own LR schedules
  o.schedule = "constant"
  return optim.validate_optimizer_config(o)


def validate_config(config) -> None:
  """Checks that need no data and no compile; raises ValueError naming the field."""
  for section in ("model", "data", "train", "mesh", "schedule"):
    if section not in config:
      raise ValueError(f"config has no `{section}` section")
  t = config.train
  if t.steps == 0 or t.steps < -1:
    raise ValueError(f"train.steps = {t.steps}: a positive number of steps, or -1 for the schedule's total")
  for f in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
    if int(t[f]) < 1:
      raise ValueError(f"train.{f} = {t[f]} must be >= 1")
  if t.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"train.compute_dtype = {t.compute_dtype!r}: float32 or bfloat16")
  if config.get("teacher") and config.teacher.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"teacher.compute_dtype = {config.teacher.compute_dtype!r}: float32 or bfloat16")
  optimizer_config(t)
  from mbert_jax.data.config import validate_data_config
  validate_data_config(config.data)
  model = dict(config.model.to_dict())
  if model.get("vocab_size", -1) == -1:
    model["vocab_size"] = 1  # placeholder until the tokenizer is known
  ModelConfig.from_dict({**model, "compute_dtype": t.compute_dtype}).validate(
      max_seq_length=config.data.max_seq_length)
  stages = schedule_lib.build_schedule(config.schedule, config.model.num_hidden_layers)
  if any(s.needs_teacher for s in stages):
    path = config.teacher.checkpoint
    if not path:
      raise ValueError(f"schedule `{config.schedule.name}` needs a teacher: set teacher.checkpoint "
                       "to an mbert-jax workdir or a Hugging Face directory")
    if not os.path.isdir(path):
      raise FileNotFoundError(f"teacher.checkpoint = {path!r} is not a directory")
  sharding.mesh_shape(config.mesh, jax.device_count())


# ============================================================================ state

def state_shardings(params_shardings, tx, abstract_params_tree, mesh):
  """Shardings of the whole train state; optimizer moments follow their parameters."""
  rep = sharding.replicated(mesh)
  opt_sh = sharding.follow_params(jax.eval_shape(tx.init, abstract_params_tree), params_shardings,
                                  abstract_params_tree, mesh)
  return {"step": rep, "params": params_shardings, "opt_state": opt_sh, "nonfinite": rep,
          "skipped": rep}


def abstract_state(shardings_tree, abstract_params_tree, tx):
  opt = jax.eval_shape(tx.init, abstract_params_tree)
  shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params_tree,
            "opt_state": opt, "nonfinite": jax.ShapeDtypeStruct((), jnp.int32),
            "skipped": jax.ShapeDtypeStruct((), jnp.int32)}
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings_tree)


def fresh_opt_state(tx, params, opt_shardings, previous=None, reset: bool = True):
  """New optimizer state; without `reset`, moments carry over and only the count restarts."""
  state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  if reset or previous is None or jax.tree.structure(previous) != jax.tree.structure(state):
    return state

  def keep_moments(path, new, old):
    return new if "count" in jax.tree_util.keystr(path) else old
  return jax.tree_util.tree_map_with_path(keep_moments, state, previous)


# ============================================================================ step

@dataclasses.dataclass(frozen=True)
class StepContext:
  """Everything static a compiled step closes over."""
  model: Any
  teacher: Any | None
  stage: schedule_lib.Stage
  tx: optax.GradientTransformation
  kt: dict
  seed: int
  dropout: bool
  grad_accum: int
  num_student_layers: int
  num_teacher_layers: int | None


def stage_uses_heads(stage) -> bool:
  return any(stage.weight(t) > 0 for t in TERMS_NEEDING_HEADS)


def compute_loss(ctx: StepContext, params, teacher_params, batch, rng):
  """Stage loss (weighted, divided) and every term for logging."""
  stage = ctx.stage
  heads = stage_uses_heads(stage)
  positions = batch["masked_lm_positions"]
  student = ctx.model.apply(
      {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
      masked_positions=positions, deterministic=not ctx.dropout, num_layers=stage.num_layers,
      heads=heads, rngs={"dropout": rng} if ctx.dropout else None)
  teacher = None
  if stage.needs_teacher:
    t_layers = stage.teacher_num_layers(ctx.num_student_layers, ctx.num_teacher_layers)
    teacher = ctx.teacher.apply(
        {"params": teacher_params}, batch["input_ids"], batch["token_type_ids"],
        batch["attention_mask"], masked_positions=positions, deterministic=True,
        num_layers=t_layers, heads=stage.weight("kd") > 0)
    teacher = jax.lax.stop_gradient(teacher)

  terms: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)
  if stage.transfer_layers:
    per_layer = losses.transfer_losses(student, teacher, batch["attention_mask"], ctx.kt,
                                       stage.transfer_layers)
    for term, values in per_layer.items():
      w = stage.weight(term)
      terms[f"{term}_loss"] = jnp.sum(values)
      for layer, v in zip(stage.transfer_layers, values):
        terms[f"{term}_loss/layer_{layer:02d}"] = v
      if w > 0:
        total = total + w * jnp.sum(values)
  if heads:
    labels, weights = batch["masked_lm_ids"], batch["masked_lm_weights"]
    mlm, mlm_acc = losses.mlm_loss(student.mlm_logits, labels, weights)
    terms["mlm_loss"], terms["mlm_accuracy"] = mlm, mlm_acc
    total = total + stage.weight("mlm") * mlm
    if stage.weight("kd") > 0:
      _, parts = losses.distillation_mlm_loss(
          student.mlm_logits, teacher.mlm_logits, labels, weights, alpha=0.0,
          temperature=stage.temperature)
      kd = parts["kd_ce"] if "kd_ce" in parts else parts["kd"]
      terms["kd_loss"] = kd
      if "agreement" in parts:
        terms["teacher_agreement"] = parts["agreement"]
      total = total + stage.weight("kd") * kd
  nsp, nsp_acc = losses.nsp_loss(student.nsp_logits, batch["next_sentence_labels"])
  terms["nsp_loss"], terms["nsp_accuracy"] = nsp, nsp_acc
  if stage.weight("nsp") > 0:
    total = total + stage.weight("nsp") * nsp
  total = total / stage.loss_divisor
  terms["loss"] = total
  return total, terms


def guarded_update(state, tx, loss, grads):
  """One optimizer update, skipped (and counted) when the loss, the gradient or the updated
  parameters are not finite, so no checkpoint can ever hold a non-finite parameter.

  Returns (new state, gradient norm, finite flag). `state` holds step, params, opt_state,
  nonfinite (consecutive skips) and skipped (total skips).
  """
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = {
      "step": state["step"] + 1,
      "params": keep(params, state["params"]),
      "opt_state": keep(opt_state, state["opt_state"]),
      "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1).astype(jnp.int32),
      "skipped": (state["skipped"] + (~finite).astype(jnp.int32)).astype(jnp.int32),
  }
  return new_state, grad_norm, finite


def make_train_step(ctx: StepContext) -> Callable:
  def grad_fn(params, teacher_params, batch, rng):
    return jax.value_and_grad(compute_loss, argnums=1, has_aux=True)(
        ctx, params, teacher_params, batch, rng)

  def step(state, teacher_params, batch):
    rng = jax.random.fold_in(jax.random.key(ctx.seed), state["step"])
    (loss, terms), grads = optim.accumulate_gradients(
        lambda p, mb, r: grad_fn(p, teacher_params, mb, r), state["params"], batch,
        ctx.grad_accum, rng=rng)
    new_state, grad_norm, finite = guarded_update(state, ctx.tx, loss, grads)
    out = dict(terms)
    out.update(grad_norm=grad_norm, param_norm=optax.tree.norm(state["params"]),
               finite=finite.astype(jnp.float32))
    return new_state, out

  return step


def make_eval_step(model, teacher) -> Callable:
  """Sums over one held-out batch: student (and teacher) MLM/NSP, top-1 agreement."""
  def run(m, params, batch):
    return m.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                   batch["attention_mask"], masked_positions=batch["masked_lm_positions"],
                   deterministic=True)

  def step(params, teacher_params, batch):
    w = batch["masked_lm_weights"].astype(jnp.float32)
    labels = batch["masked_lm_ids"]
    out = run(model, params, batch)
    pred = jnp.argmax(out.mlm_logits, -1)
    logp = jax.nn.log_softmax(out.mlm_logits, -1)
    nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
    nsp_pred = jnp.argmax(out.nsp_logits, -1)
    sums = {"weight": jnp.sum(w), "mlm_nll": jnp.sum(w * nll),
            "mlm_correct": jnp.sum(w * (pred == labels)),
            "nsp_correct": jnp.sum(nsp_pred == batch["next_sentence_labels"]).astype(jnp.float32),
            "examples": jnp.asarray(labels.shape[0], jnp.float32)}
    if teacher is not None:
      t_out = run(teacher, teacher_params, batch)
      t_pred = jnp.argmax(t_out.mlm_logits, -1)
      sums["teacher_mlm_correct"] = jnp.sum(w * (t_pred == labels))
      sums["agreement"] = jnp.sum(w * (t_pred == pred))
    return sums

  return step


def summarise_eval(sums: dict[str, float]) -> dict[str, float]:
  w = max(sums["weight"], 1e-9)
  out = {"eval/mlm_loss": sums["mlm_nll"] / w, "eval/mlm_accuracy": sums["mlm_correct"] / w,
         "eval/nsp_accuracy": sums["nsp_correct"] / max(sums["examples"], 1)}
  if "teacher_mlm_correct" in sums:
    out["eval/teacher_mlm_accuracy"] = sums["teacher_mlm_correct"] / w
    out["eval/teacher_agreement"] = sums["agreement"] / w
  return out


# ============================================================================ the run

class _Preemption:
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
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
    return bool(np.max(flags))


def stage_flops(stage, s_cfg: ModelConfig, t_cfg: ModelConfig | None, seq: int, preds: int) -> float:
  """Analytic FLOPs per example of one step: 3x the student, plus the teacher's forward."""
  heads = stage_uses_heads(stage)
  flops = 3 * model_summary.forward_flops(s_cfg, seq, stage.num_layers, preds, heads=heads)
  if stage.needs_teacher and t_cfg is not None:
    t_layers = stage.teacher_num_layers(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    flops += model_summary.forward_flops(t_cfg, seq, t_layers, preds, heads=stage.weight("kd") > 0)
  return float(flops)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the configured schedule in `workdir`; returns the final report."""
  t_start = time.time()
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  tc = config.train
  if tc.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", tc.compilation_cache_dir)

  # ---- data
  from mbert_jax.data import build_pipeline
  pipe = build_pipeline(config.data, workdir, split="train")
  eval_pipe = build_pipeline(config.data, workdir, split="eval")
  seq, preds = config.data.max_seq_length, config.data.max_predictions_per_seq

  # ---- models
  s_cfg = model_config_from(config.model, pipe.vocab_size, tc.compute_dtype, seq)
  model = build(s_cfg)
  stages = schedule_lib.build_schedule(config.schedule, s_cfg.num_hidden_layers)
  needs_teacher = any(s.needs_teacher for s in stages)
  total = schedule_lib.total_steps(stages)
  end_step = total if tc.steps == -1 else min(int(tc.steps), total)
  write_json(os.path.join(workdir, "config.json"), config.to_dict())
  write_json(os.path.join(workdir, "model_config.json"), s_cfg.to_dict())
  if is_main:
    pipe.save_vocab(os.path.join(workdir, "tokenizer"))

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh)
  sharding.check_batch_divisible(config.data.batch_size, mesh, tc.grad_accum_steps)
  t_cfg, teacher_params, teacher_model = None, None, None
  if needs_teacher:
    t_cfg, teacher_params = load_teacher(config.teacher, mesh, rules)
    if t_cfg.vocab_size != s_cfg.vocab_size:
      raise ValueError(f"teacher vocab_size {t_cfg.vocab_size} != student/tokenizer "
                       f"{s_cfg.vocab_size}: distill with the teacher's vocabulary")
    teacher_model = build(t_cfg)
  kt = dict(config.kt.to_dict()) if "kt" in config else {}
  kt.update(num_student_layers=s_cfg.num_hidden_layers,
            num_teacher_layers=t_cfg.num_hidden_layers if t_cfg else s_cfg.num_hidden_layers)

  # ---- state: restore or initialise
  opt_cfg = optimizer_config(tc)
  _, abs_params, p_shardings = abstract_params(s_cfg, mesh, rules)

  def optimizer_for(stage):
    mults = schedule_lib.lr_multiplier_tree(stage, abs_params)
    return optim.build_optimizer(opt_cfg, abs_params, mults, lr_schedule=stage.learning_rate)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                               async_save=tc.async_checkpoint)

  def target_for(meta):
    tx = optimizer_for(stages[int(meta["stage_index"])])
    sh = state_shardings(p_shardings, tx, abs_params, mesh)
    return abstract_state(sh, abs_params, tx)

  restored = ckpt.restore_latest_good(target_for)
  if restored is not None:
    start, state, meta = restored
    logging.info("resumed from step %d (stage %s)", start, meta.get("stage_name"))
  else:
    start = 0
    params, _ = init_params(s_cfg, tc.seed, mesh, rules)
    copied = []
    if needs_teacher:
      params, copied = init_student_from_teacher(params, teacher_params, s_cfg, t_cfg, config.teacher)
    # Three distinct buffers: the state is donated, and one buffer cannot be donated twice.
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
    state = {"step": zero(), "params": params, "opt_state": None, "nonfinite": zero(),
             "skipped": zero()}
    if copied:
      logging.info("copied %d tensors from the teacher: %s", len(copied), sorted({c.rsplit('/', 2)[0] for c in copied}))

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  kind = jax.devices()[0].device_kind
  if metrics_lib.peak_flops(kind, tc.compute_dtype) is None and is_main:
    print(f"MFU not reported: no peak FLOP/s known for device kind {kind!r} "
          "(add it to mbert_jax.metrics.PEAK_FLOPS)", flush=True)
  progress = metrics_lib.Progress(end_step, start, enabled=is_main and tc.progress_bar)
  eval_fn = jax.jit(make_eval_step(model, teacher_model))

  def evaluate(params, step) -> dict[str, float]:
    sums: dict[str, float] = {}
    for i in range(tc.eval_steps):
      b = sharding.global_batch(eval_pipe.batch_at(i, jax.process_index(), jax.process_count()), mesh)
      out = jax.device_get(eval_fn(params, teacher_params, b))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    result = summarise_eval(sums)
    writer.write(step, result)
    return result

  def meta_for(step, stage_index, step_in_stage):
    return {"step": int(step), "stage_index": int(stage_index),
            "stage_name": stages[stage_index].name, "step_in_stage": int(step_in_stage),
            "data_seed": int(config.data.seed), "data_position": int(step),
            "train_seed": int(tc.seed), "schedule": config.schedule.name}

  # Fixed for the whole run: every stage sees the same batch shapes and the same teacher.
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim)
              for k, v in pipe.batch_at(start, jax.process_index(), jax.process_count()).items()}
  t_sh = jax.tree.map(lambda a: a.sharding, teacher_params) if teacher_params is not None else None
  last_eval: dict[str, float] = {}
  stage_times: dict[str, float] = {}
  status = "completed"
  step = start
  with _Preemption() as preemption:
    while step < end_step:
      idx, in_stage = schedule_lib.stage_at(stages, step)
      stage = stages[idx]
      stage_start = step - in_stage
      stage_end = min(end_step, stage_start + stage.steps)
      tx = optimizer_for(stage)
      st_sh = state_shardings(p_shardings, tx, abs_params, mesh)
      # A stage boundary gets a new optimizer (moments reset or carried per the stage); a
      # checkpoint holds the state of the stage that wrote it, so resuming there does the same.
      if state["opt_state"] is None or in_stage == 0:
        state["opt_state"] = fresh_opt_state(tx, state["params"], st_sh["opt_state"],
                                             previous=state["opt_state"], reset=stage.reset_optimizer)
      ctx = StepContext(model, teacher_model, stage, tx, kt, int(tc.seed), bool(tc.dropout),
                        int(tc.grad_accum_steps), s_cfg.num_hidden_layers,
                        t_cfg.num_hidden_layers if t_cfg else None)
      step_fn = jax.jit(make_train_step(ctx), in_shardings=(st_sh, t_sh, batch_sh),
                        out_shardings=(st_sh, sharding.replicated(mesh)), donate_argnums=(0,))
      flops_per_example = stage_flops(stage, s_cfg, t_cfg, seq, preds)
      progress.write(f"== stage {idx + 1}/{len(stages)} `{stage.name}`: steps {stage_start}.."
                     f"{stage_start + stage.steps} (from {step}), layers "
                     f"{stage.num_layers or s_cfg.num_hidden_layers}, losses "
                     + ", ".join(f"{k}={v:.4g}" for k, v in stage.loss_weights.items()))
      t_stage = time.perf_counter()
      timer = metrics_lib.Timer()
      steps_since_log = 0
      while step < stage_end:
        local = pipe.batch_at(step, jax.process_index(), jax.process_count())
        state, out = step_fn(state, teacher_params, sharding.global_batch(local, mesh))
        step += 1
        steps_since_log += 1
        in_stage = step - stage_start
        at_log = step % tc.log_every == 0 or step == stage_end
        check_nonfinite = at_log or step % tc.max_nonfinite_steps == 0 or step % tc.checkpoint_every == 0
        if check_nonfinite:
          bad = int(jax.device_get(state["nonfinite"]))
          if bad >= tc.max_nonfinite_steps:
            ckpt.wait()
            raise NonFiniteError(
                f"{bad} consecutive steps had a non-finite loss or gradient (up to step {step}); "
                f"the updates were skipped and no checkpoint was written after them. Lower "
                "train.learning_rate, check the data, or raise train.max_nonfinite_steps.")
        if at_log:
          host = {k: float(v) for k, v in jax.device_get(out).items()}
          dt = timer.lap()
          host.update(
              learning_rate=float(stage.learning_rate(in_stage - 1)),
              steps_per_second=steps_since_log / dt,
              examples_per_second=steps_since_log * config.data.batch_size / dt,
              stage=float(idx), skipped_steps=float(jax.device_get(state["skipped"])))
          m = metrics_lib.mfu(flops_per_example * config.data.batch_size * steps_since_log, dt,
                              tc.compute_dtype)
          if m is not None:
            host["mfu"] = m
          host.pop("finite", None)
          writer.write(step, host)
          progress.update(step, {"loss": host["loss"], "stage": stage.name})
          steps_since_log = 0
        if step % tc.eval_every == 0 or step == end_step:
          last_eval = evaluate(state["params"], step)
          progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
        if step % tc.checkpoint_every == 0 or step == stage_end:
          ckpt.save(step, state, meta_for(step, idx, in_stage))
        if preemption.agreed():
          ckpt.save(step, state, meta_for(step, idx, in_stage))
          ckpt.wait()
          status = "preempted"
          break
      stage_times[stage.name] = stage_times.get(stage.name, 0.0) + time.perf_counter() - t_stage
      writer.write(step, {f"time/stage_{idx:02d}_seconds": stage_times[stage.name]})
      if status == "preempted":
        break
  ckpt.close()
  progress.close()

  report = {
      "status": status if step >= end_step or status == "preempted" else "stopped",
      "step": int(step), "end_step": end_step, "schedule_steps": total,
      "schedule": config.schedule.name, "stages": [s.name for s in stages],
      "stage_seconds": stage_times, "wall_seconds": time.time() - t_start,
      "params": model_summary.param_table(s_cfg), "checkpoints": ckpt.directory,
      "eval": last_eval, "teacher": config.teacher.checkpoint if needs_teacher else None,
      "skipped_steps": int(jax.device_get(state["skipped"])),
  }
  if status == "preempted":
    progress.write(f"preempted: saved step {step} to {ckpt.directory}; rerun the same command to resume")
  else:
    write_json(os.path.join(workdir, DONE_FILE), report)
  writer.close()
  return report
