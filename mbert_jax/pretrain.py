"""Pretraining and knowledge transfer as a task of the one loop (mbert_jax/train.py).

Teacher pretraining is the one-stage `scratch` schedule; every distillation strategy is a list
of stages (mbert_jax/schedule.py). This module says what those stages compute: the student's
truncated forward, the teacher's forward, the transfer / distillation / MLM / NSP terms, and
the held-out evaluation (MLM accuracy and loss, teacher agreement).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mbert_jax import losses
from mbert_jax import optim
from mbert_jax import schedule as schedule_lib
from mbert_jax import sharding
from mbert_jax import teacher as teacher_lib
from mbert_jax.models import ModelConfig, build
from mbert_jax.models import summary as model_summary
from mbert_jax.train import StagePlan
from mbert_jax.workdir import CONFIG_FILE, MODEL_CONFIG_FILE, TOKENIZER_DIR

TERMS_NEEDING_HEADS = ("mlm", "kd")
TEACHER_VOCAB = "teacher"  # data.vocab: the teacher's own tokenizer files
DTYPES = ("float32", "bfloat16")
# Fields whose change leaves the checkpoints valid: cadence, where to stop, placement.
_RESUMABLE_TRAIN_FIELDS = ("steps", "log_every", "eval_every", "eval_steps", "checkpoint_every",
                           "keep_checkpoints", "async_checkpoint", "progress_bar",
                           "compilation_cache_dir", "max_nonfinite_steps", "compute_dtype")
_RESUMABLE_DATA_FIELDS = ("cache_dir", "num_proc")


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


def optimizer_config(config) -> ml_collections.ConfigDict:
  """The optimizer fields of `train`; the learning rate comes from each stage's schedule."""
  t = config.train
  o = optim.default_optimizer_config()
  o.name = t.optimizer
  o.learning_rate = float(config.schedule.learning_rate)
  o.b1, o.b2, o.eps = t.b1, t.b2, t.eps
  o.weight_decay = float(t.weight_decay)
  o.clip_norm = t.clip_norm
  o.grad_accum_steps = t.grad_accum_steps
  o.warmup_steps = 0
  o.schedule = "constant"
  return optim.validate_optimizer_config(o)


def schedule_fields(config) -> str:
  """The config fields a user sets to change the preset stages, for error messages."""
  if "learning_rate" in config.train:  # a pretraining config: its one stage follows train.*
    return ("the stage's length, warm-up and learning rate are train.steps, "
            "train.warmup_steps and train.learning_rate")
  return ("stage lengths are schedule.steps_per_layer (layer-wise phases), "
          "schedule.transfer_steps (joint transfer) and schedule.distill_steps (the final "
          "stage); its warm-up and learning rate are schedule.warmup_steps and "
          "schedule.learning_rate")


def build_stages(config, num_layers: int) -> list[schedule_lib.Stage]:
  try:
    return schedule_lib.build_schedule(config.schedule, num_layers)
  except ValueError as e:
    raise ValueError(f"schedule `{config.schedule.name}`: {e}; {schedule_fields(config)}") from e


def validate_config(config) -> list[schedule_lib.Stage]:
  """Checks that need no data and no compile; raises ValueError naming the field."""
  for section in ("model", "data", "train", "mesh", "schedule"):
    if section not in config:
      raise ValueError(f"config has no `{section}` section")
  t = config.train
  if t.steps == 0 or t.steps < -1:
    raise ValueError(f"train.steps = {t.steps}: the step to stop at, or -1 for the schedule's end")
  for f in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps",
            "eval_steps"):
    if int(t[f]) < 1:
      raise ValueError(f"train.{f} = {t[f]} must be >= 1")
  if t.compute_dtype not in DTYPES:
    raise ValueError(f"train.compute_dtype = {t.compute_dtype!r}: float32 or bfloat16")
  if config.get("teacher") and config.teacher.compute_dtype not in DTYPES:
    raise ValueError(f"teacher.compute_dtype = {config.teacher.compute_dtype!r}: float32 or bfloat16")
  optimizer_config(config)
  from mbert_jax.data.config import validate_data_config
  validate_data_config(config.data)
  model = dict(config.model.to_dict())
  if model.get("vocab_size", -1) == -1:
    model["vocab_size"] = 1  # placeholder until the tokenizer is known
  ModelConfig.from_dict({**model, "compute_dtype": t.compute_dtype}).validate(
      max_seq_length=config.data.max_seq_length)
  stages = build_stages(config, config.model.num_hidden_layers)
  if any(s.needs_teacher for s in stages):
    path = config.teacher.checkpoint
    if not path:
      raise ValueError(f"schedule `{config.schedule.name}` needs a teacher: set teacher.checkpoint "
                       "to an mbert-jax workdir or a Hugging Face directory")
    if not os.path.isdir(path):
      raise FileNotFoundError(f"teacher.checkpoint = {path!r} is not a directory")
  sharding.mesh_shape(config.mesh, jax.device_count())
  return stages


def run_identity(config) -> dict[str, Any]:
  """What this run's checkpoints depend on (see `workdir.claim`)."""
  c = config.to_dict()
  stages = build_stages(config, config.model.num_hidden_layers)
  # The final stage may grow ("more steps"): it is where a run stops, and a longer one only
  # stretches its learning-rate decay. Every earlier boundary fixes which stage a checkpoint
  # belongs to, so those are part of the identity.
  # Where the PD stage reads its teacher targets is not part of it either: a cache is checked
  # against the data and teacher it was built for (teacher_cache.identity_key), so a run may
  # switch to one mid-stage, or read a moved copy, like it may change compute_dtype.
  sched = {k: v for k, v in c["schedule"].items() if k not in ("distill_steps", "teacher_cache")}
  sched["stages"] = [[s.name, s.steps] for s in stages[:-1]] + [[stages[-1].name]]
  ident = {"task": "pretrain", "model": c["model"], "schedule": sched,
           "kt": c.get("kt", {}),
           "data": {k: v for k, v in c["data"].items() if k not in _RESUMABLE_DATA_FIELDS},
           "train": {k: v for k, v in c["train"].items() if k not in _RESUMABLE_TRAIN_FIELDS}}
  if any(s.needs_teacher for s in stages):
    ident["teacher"] = {k: v for k, v in c["teacher"].items() if k != "compute_dtype"}
  return ident


# ============================================================================ step

@dataclasses.dataclass(frozen=True)
class LossContext:
  """Everything static one stage's loss closes over."""
  model: Any
  teacher: Any | None
  stage: schedule_lib.Stage
  kt: dict
  dropout: bool
  num_student_layers: int
  num_teacher_layers: int | None
  plan: Any = None              # teacher.TransferPlan (None: no teacher)
  cached_targets: bool = False  # kd from the batch's cached top-k teacher logits


def stage_uses_heads(stage) -> bool:
  return any(stage.weight(t) > 0 for t in TERMS_NEEDING_HEADS)


def wants_qkv(ctx: LossContext, stage) -> bool:
  """Queries/keys/values are materialised only for a weighted relation-transfer term."""
  return bool(ctx.plan is not None and ctx.plan.needs_qkv and stage.weight("at") > 0
              and stage.transfer_layers)


def transfer_terms(ctx: LossContext, stage) -> tuple[str, ...]:
  """Every term for the log, except an unweighted relation term (it would need Q/K/V)."""
  return tuple(t for t in losses.TRANSFER_TERMS
               if stage.weight(t) > 0 or not (t == "at" and ctx.plan is not None
                                               and ctx.plan.needs_qkv))


def active_layers(stage, num_layers: int) -> int | None:
  """The encoder depth a truncated stage trains, when the update may skip the layers above
  it (`train.StagePlan.active_layers`): they do not run (no gradient), their multiplier is 0
  (`schedule.GroupMultipliers.encoder_vector` gates them) and, the optimizer being reset at the
  stage's start, their moments are 0. None: update every layer slice."""
  if (stage.num_layers is None or not 0 < stage.num_layers < num_layers
      or not stage.reset_optimizer):
    return None
  return stage.num_layers


def teacher_depth(ctx: LossContext, stage) -> int | None:
  """Teacher layers a stage runs: those its layer map reaches, all for PD."""
  if not stage.transfer_layers or ctx.plan is None:
    return None
  return ctx.plan.teacher_layers(stage.num_layers)


def compute_loss(ctx: LossContext, params, teacher_params, batch, rng):
  """Stage loss (weighted, divided) and every term for logging."""
  stage = ctx.stage
  heads = stage_uses_heads(stage)
  positions = batch["masked_lm_positions"]
  student = ctx.model.apply(
      {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
      masked_positions=positions, deterministic=not ctx.dropout, num_layers=stage.num_layers,
      heads=heads, rngs={"dropout": rng} if ctx.dropout else None,
      return_qkv=wants_qkv(ctx, stage), layer_outputs=bool(stage.transfer_layers))
  teacher = None
  if stage.needs_teacher and not ctx.cached_targets:
    teacher = ctx.teacher.apply(
        {"params": teacher_params}, batch["input_ids"], batch["token_type_ids"],
        batch["attention_mask"], masked_positions=positions, deterministic=True,
        num_layers=teacher_depth(ctx, stage), heads=stage.weight("kd") > 0,
        return_qkv=wants_qkv(ctx, stage), layer_outputs=bool(stage.transfer_layers))
    teacher = jax.lax.stop_gradient(teacher)

  terms: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)
  if stage.transfer_layers:
    per_layer = losses.transfer_losses(student, teacher, batch["attention_mask"], ctx.kt,
                                       stage.transfer_layers,
                                       projection=params.get(teacher_lib.PROJECTION_KEY),
                                       terms=transfer_terms(ctx, stage))
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
    if stage.weight("kd") > 0 and ctx.cached_targets:
      _, parts = losses.sparse_kd_loss(
          student.mlm_logits, batch["teacher_topk_values"], batch["teacher_topk_indices"],
          batch["teacher_log_normalizer"], labels, weights, temperature=stage.temperature)
    elif stage.weight("kd") > 0:
      _, parts = losses.distillation_mlm_loss(
          student.mlm_logits, teacher.mlm_logits, labels, weights, alpha=0.0,
          temperature=stage.temperature)
    if stage.weight("kd") > 0:
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


def make_eval_step(model, teacher):
  """Sums over one held-out batch: student (and teacher) MLM/NSP, top-1 agreement."""
  def run(m, params, batch):
    return m.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                   batch["attention_mask"], masked_positions=batch["masked_lm_positions"],
                   deterministic=True, layer_outputs=False)

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


def stage_flops(ctx: LossContext, s_cfg: ModelConfig, t_cfg: ModelConfig | None, seq: int,
                preds: int) -> float:
  """Analytic FLOPs per example of one step: 3x the student, plus the teacher's forward."""
  stage = ctx.stage
  heads = stage_uses_heads(stage)
  flops = 3 * model_summary.forward_flops(s_cfg, seq, stage.num_layers, preds, heads=heads)
  if stage.needs_teacher and t_cfg is not None and not ctx.cached_targets:
    flops += model_summary.forward_flops(t_cfg, seq, teacher_depth(ctx, stage), preds,
                                         heads=stage.weight("kd") > 0)
  return float(flops)


# ============================================================================ the task

class PretrainTask:
  """Teacher pretraining (`scratch`) or knowledge transfer into a student (every other
  schedule), for `mbert_jax.train.run`."""

  stop_field = "train.steps"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    if str(config.data.vocab) == TEACHER_VOCAB:
      # Resolved in place (a plain string field), so config.json records the file used.
      config.data.vocab = teacher_lib.vocab_source(str(config.teacher.checkpoint))
    self.stages = validate_config(config)
    self.needs_teacher = any(s.needs_teacher for s in self.stages)
    self._plans: dict[int, StagePlan] = {}

  # ---- inputs
  def identity(self) -> dict[str, Any]:
    return run_identity(self.config)

  def prepare(self, workdir: str) -> None:
    from mbert_jax import teacher_cache
    from mbert_jax.data import build_pipeline
    c = self.config
    self.workdir = workdir
    self.pipe = build_pipeline(c.data, workdir, split="train")
    self.eval_pipe = build_pipeline(c.data, workdir, split="eval")
    self.seq, self.preds = c.data.max_seq_length, c.data.max_predictions_per_seq
    self.s_cfg = model_config_from(c.model, self.pipe.vocab_size, c.train.compute_dtype, self.seq)
    self.model = build(self.s_cfg)
    self.schedule_steps = schedule_lib.total_steps(self.stages)
    self.end_step = (self.schedule_steps if c.train.steps == -1
                     else min(int(c.train.steps), self.schedule_steps))
    # Cached teacher targets: opened (and checked against this run's data and teacher) before
    # anything compiles; None when schedule.teacher_cache is empty.
    self.cache = teacher_cache.open_for_run(c, self.pipe) if self.needs_teacher else None
    self.cached_stage = (teacher_cache.distillation_stage(self.stages)[0]
                         if self.cache is not None else None)

  def files(self) -> dict[str, Any]:
    return {CONFIG_FILE: self.config.to_dict(), MODEL_CONFIG_FILE: self.s_cfg.to_dict()}

  def save_side_files(self, workdir: str) -> None:
    self.pipe.save_vocab(os.path.join(workdir, TOKENIZER_DIR))

  def total_steps(self) -> int:
    return self.end_step

  def stop_step(self) -> int:
    return self.end_step

  def global_batch_size(self) -> int:
    return int(self.config.data.batch_size)

  # ---- models and state
  def _teacher_needed_online(self) -> bool:
    """The teacher's parameters are loaded unless every stage this run still has to take
    reads cached targets and the student needs no seeding from it (a resumed run)."""
    from mbert_jax.workdir import latest_checkpoint_step
    start = latest_checkpoint_step(self.workdir)
    if start is None:
      return True
    first = self.stage_index(min(start, self.schedule_steps - 1))[0]
    return any(s.needs_teacher and i != self.cached_stage
               for i, s in enumerate(self.stages) if i >= first)

  def build(self, mesh, rules) -> None:
    c = self.config
    self.mesh = mesh
    sharding.check_batch_divisible(c.data.batch_size, mesh, c.train.grad_accum_steps)
    self.t_cfg, self.teacher_params, self.teacher_model, self.teacher = None, None, None, None
    self.transfer = None
    if self.needs_teacher:
      if self._teacher_needed_online():
        self.teacher = teacher_lib.open_teacher(c.teacher, mesh, rules)
        self.t_cfg, self.teacher_params = self.teacher.config, self.teacher.params
        has_mlm, t_vocab = self.teacher.has_mlm_head, self.teacher.vocab_file
      else:
        # The cache holds the teacher's MLM distribution, so it had an MLM head.
        self.t_cfg = teacher_lib.read_teacher_config(c.teacher)
        has_mlm, t_vocab = True, ""
        logging.info("teacher parameters not loaded: the remaining stages read cached targets "
                     "(%.1f MiB of teacher parameters saved)", self.teacher_mib())
      self.transfer = teacher_lib.check_transfer(
          c.kt, self.stages, self.s_cfg, self.t_cfg, has_mlm, teacher_path=c.teacher.checkpoint,
          student_vocab=str(c.data.vocab), teacher_vocab=t_vocab)
      logging.info("knowledge transfer: %s", self.transfer.describe())
      self.teacher_model = build(self.t_cfg)
    kt = dict(c.kt.to_dict()) if "kt" in c else {}
    kt.update(num_student_layers=self.s_cfg.num_hidden_layers,
              num_teacher_layers=(self.t_cfg or self.s_cfg).num_hidden_layers)
    self.kt = kt
    self.opt_cfg = optimizer_config(c)
    _, self.abs_params, self.p_shardings = sharding.abstract_params(self.s_cfg, mesh, rules)
    self.projection = None
    if self.needs_teacher:
      self.projection = teacher_lib.init_transfer_params(
          c.kt, self.s_cfg, self.t_cfg, jax.random.fold_in(jax.random.key(c.train.seed), 1))
    if self.projection is not None:
      # Small (width x teacher width): replicated, trained with the transfer losses, never
      # exported (export reads only the student model's parameters).
      abs_proj = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.projection)
      rep = sharding.replicated(mesh)
      self.abs_params = {**self.abs_params, teacher_lib.PROJECTION_KEY: abs_proj}
      self.p_shardings = {**self.p_shardings,
                          teacher_lib.PROJECTION_KEY: jax.tree.map(lambda _: rep, abs_proj)}
    # Teacher accuracy and agreement only mean something for a teacher with a trained MLM head.
    eval_teacher = (self.teacher_model if self.teacher is not None and self.teacher.has_mlm_head
                    else None)
    self.eval_fn = jax.jit(make_eval_step(self.model, eval_teacher))

  def teacher_mib(self) -> float:
    return model_summary.param_table(self.t_cfg)["total"] * 4 / 2**20 if self.t_cfg else 0.0

  def abstract_params(self):
    return self.abs_params, self.p_shardings

  def init_params(self):
    c = self.config
    params, _ = sharding.init_params(self.s_cfg, c.train.seed, self.mesh,
                                     sharding.rules_from_config(c.mesh))
    if self.needs_teacher:
      params, report = teacher_lib.init_student_from_teacher(
          params, self.teacher_params, self.s_cfg, self.t_cfg, c.teacher,
          teacher_fresh=self.teacher.fresh)
      logging.info("student from teacher: %s", teacher_lib.seed_report_summary(report))
      for line in report.lines():
        logging.info("  %s", line)
      self.seed_report = report
    if self.projection is not None:
      params = {**params, teacher_lib.PROJECTION_KEY: jax.device_put(
          self.projection, self.p_shardings[teacher_lib.PROJECTION_KEY])}
    return params

  # ---- stages
  def stage_index(self, step: int) -> tuple[int, int, int]:
    idx, in_stage = schedule_lib.stage_at(self.stages, step)
    return idx, step - in_stage, in_stage

  def stage(self, index: int) -> StagePlan:
    if index not in self._plans:
      self._plans[index] = self._plan(index)
    return self._plans[index]

  def _plan(self, index: int) -> StagePlan:
    stage = self.stages[index]
    mults = schedule_lib.lr_multiplier_tree(stage, self.abs_params)
    tx = optim.build_optimizer(self.opt_cfg, self.abs_params, mults, lr_schedule=stage.learning_rate)
    cached = index == self.cached_stage
    ctx = LossContext(self.model, self.teacher_model, stage, self.kt, bool(self.config.train.dropout),
                      self.s_cfg.num_hidden_layers,
                      self.t_cfg.num_hidden_layers if self.t_cfg else None,
                      plan=self.transfer, cached_targets=cached)
    start = sum(s.steps for s in self.stages[:index])
    banner = (f"== stage {index + 1}/{len(self.stages)} `{stage.name}`: steps {start}.."
              f"{start + stage.steps}, layers {stage.num_layers or self.s_cfg.num_hidden_layers}, "
              "losses " + ", ".join(f"{k}={v:.4g}" for k, v in stage.loss_weights.items()))
    return StagePlan(
        name=stage.name, steps=stage.steps, tx=tx,
        loss=lambda p, aux, b, r: compute_loss(ctx, p, aux, b, r),
        learning_rate=lambda s: float(stage.learning_rate(s)),
        reset_optimizer=stage.reset_optimizer,
        active_layers=active_layers(stage, self.s_cfg.num_hidden_layers),
        aux=self.teacher_params if stage.needs_teacher and not cached else None,
        flops_per_example=stage_flops(ctx, self.s_cfg, self.t_cfg, self.seq, self.preds),
        banner=banner + (f"; teacher targets from {self.cache.directory}" if cached else ""))

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    local = self.pipe.batch_at(step, jax.process_index(), jax.process_count())
    if self.cached_stage is not None and self.stage_index(step)[0] == self.cached_stage:
      # The cache checks each row's input digest, so it can never pair targets with other rows.
      local.update(self.cache.targets_at(step, jax.process_index(), jax.process_count(),
                                         batch=local))
    return local

  def checkpoint_meta(self, step: int) -> dict[str, Any]:
    # The stage that ran the step just taken: at a stage boundary the checkpoint holds that
    # stage's optimizer state, and resuming builds the next stage's from it.
    idx, start, _ = self.stage_index(step - 1)
    in_stage = step - start
    return {"step": int(step), "stage_index": int(idx), "stage_name": self.stages[idx].name,
            "step_in_stage": int(in_stage), "data_seed": int(self.config.data.seed),
            "data_position": int(step), "train_seed": int(self.config.train.seed),
            "schedule": self.config.schedule.name}

  # ---- evaluation and report
  def eval_due(self, step: int) -> bool:
    return step % int(self.config.train.eval_every) == 0

  def evaluate(self, params, step: int, final: bool) -> dict[str, float]:
    sums: dict[str, float] = {}
    for i in range(int(self.config.train.eval_steps)):
      local = self.eval_pipe.batch_at(i, jax.process_index(), jax.process_count())
      out = jax.device_get(self.eval_fn(params, self.teacher_params,
                                        sharding.global_batch(local, self.mesh)))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    return summarise_eval(sums)

  def report(self) -> dict[str, Any]:
    return {"end_step": self.end_step, "schedule_steps": self.schedule_steps,
            "schedule": self.config.schedule.name, "stages": [s.name for s in self.stages],
            "params": model_summary.param_table(self.s_cfg),
            "teacher": self.config.teacher.checkpoint if self.needs_teacher else None,
            "teacher_loaded": self.teacher_params is not None,
            "teacher_cache": self.cache.directory if self.cache is not None else None,
            "transfer": self.transfer.describe() if self.transfer is not None else None}
