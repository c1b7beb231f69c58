"""Pretraining and knowledge transfer as a task of the one loop (mbert_jax/training/loop.py).

Teacher pretraining is the one-stage `scratch` schedule; every distillation strategy is a list
of stages (distill/schedule.py) whose losses distill/objective.py computes. `PretrainTask`
checks its config when built and, in `setup`, reads its inputs (the corpus, the teacher, a
cache of teacher targets) and hands the loop every stage, complete.

`design` is the part of the setup that needs no data and no weights (the models, the stages'
optimizers and losses, the parameter layout), so a planner can build the same programs for a
machine it is not on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from mbert_jax.data import build_pipeline
from mbert_jax.data import tokenizer as tokenizer_lib
from mbert_jax.distill import config as distill_config
from mbert_jax.distill import micro_teacher
from mbert_jax.distill import objective
from mbert_jax.distill import schedule as schedule_lib
from mbert_jax.distill import teacher as teacher_lib
from mbert_jax.distill import teacher_cache
from mbert_jax.models import ModelConfig, build, example_inputs
from mbert_jax.models import summary as model_summary
from mbert_jax.models.config import table_size_for
from mbert_jax.training import optim, sharding
from mbert_jax.training.task import Setup, StagePlan
from mbert_jax.training.workdir import (CONFIG_FILE, MODEL_CONFIG_FILE, TOKENIZER_DIR,
                                        latest_checkpoint_step)


@dataclasses.dataclass(frozen=True)
class Design:
  """A run's programs without its inputs: the student (and teacher) models, the transfer plan,
  the parameter layout on the mesh, and one `StagePlan` per stage. `aux` of a stage that runs
  the teacher online is `teacher_params` (arrays, or ShapeDtypeStructs for planning)."""
  student: ModelConfig
  teacher: ModelConfig | None
  transfer: teacher_lib.TransferPlan | None
  abstract_params: Any
  param_shardings: Any
  projection: Any                  # the feature projection's initial params, or None
  plans: tuple[StagePlan, ...]


def _kt(config, s_cfg: ModelConfig, t_cfg: ModelConfig | None) -> dict:
  kt = dict(config.kt.to_dict()) if "kt" in config else {}
  kt.update(num_student_layers=s_cfg.num_hidden_layers,
            num_teacher_layers=(t_cfg or s_cfg).num_hidden_layers)
  return kt


def _stage_plan(config, stages, index: int, s_cfg, t_cfg, transfer, abs_params, teacher_params,
                cached_stage: int | None, cache_dir: str | None) -> StagePlan:
  stage = stages[index]
  mults = schedule_lib.lr_multiplier_tree(stage, abs_params)
  tx = optim.build_optimizer(distill_config.optimizer_config(config), abs_params, mults,
                             lr_schedule=stage.learning_rate)
  cached = index == cached_stage
  ctx = objective.LossContext(build(s_cfg), build(t_cfg) if t_cfg else None, stage,
                              _kt(config, s_cfg, t_cfg), bool(config.train.dropout),
                              plan=transfer, cached_targets=cached,
                              nsp=bool(config.data.get("next_sentence", True)))
  start = sum(s.steps for s in stages[:index])
  banner = (f"== stage {index + 1}/{len(stages)} `{stage.name}`: steps {start}.."
            f"{start + stage.steps}, layers {stage.num_layers or s_cfg.num_hidden_layers}, "
            "losses " + ", ".join(f"{k}={v:.4g}" for k, v in stage.loss_weights.items()))
  seq, preds = config.data.max_seq_length, config.data.max_predictions_per_seq
  return StagePlan(
      name=stage.name, steps=stage.steps, tx=tx,
      loss=lambda p, aux, b, r: objective.compute_loss(ctx, p, aux, b, r),
      learning_rate=lambda s: float(stage.learning_rate(s)),
      reset_optimizer=stage.reset_optimizer,
      trained=objective.first_layers_subset(
          objective.trained_depth(stage, s_cfg.num_hidden_layers)),
      aux=teacher_params if stage.needs_teacher and not cached else None,
      flops_per_example=objective.stage_flops(ctx, s_cfg, t_cfg, seq, preds),
      banner=banner + (f"; teacher targets from {cache_dir}" if cached else ""))


def design(config, stages, s_cfg: ModelConfig, t_cfg: ModelConfig | None,
           transfer: teacher_lib.TransferPlan | None, teacher_params, mesh, rules,
           cached_stage: int | None = None, cache_dir: str | None = None,
           seed_line: str = "") -> Design:
  """The run's programs on `mesh`, from its config and the models' configs alone. `seed_line`
  (what the student takes from the teacher) opens the first stage's console banner."""
  _, abs_params, p_shardings = sharding.abstract_params(build(s_cfg), example_inputs(s_cfg),
                                                        mesh, rules)
  projection = None
  if t_cfg is not None:
    projection = teacher_lib.init_transfer_params(
        config.kt, s_cfg, t_cfg, jax.random.fold_in(jax.random.key(config.train.seed), 1))
  if projection is not None:
    # Small (width x teacher width): replicated, trained with the transfer losses, never
    # exported (export reads only the student model's parameters).
    abs_proj = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), projection)
    rep = sharding.replicated(mesh)
    abs_params = {**abs_params, teacher_lib.PROJECTION_KEY: abs_proj}
    p_shardings = {**p_shardings,
                   teacher_lib.PROJECTION_KEY: jax.tree.map(lambda _: rep, abs_proj)}
  plans = tuple(_stage_plan(config, stages, i, s_cfg, t_cfg, transfer, abs_params,
                            teacher_params, cached_stage, cache_dir)
                for i in range(len(stages)))
  if seed_line:
    first = dataclasses.replace(plans[0], banner=f"{seed_line}\n{plans[0].banner}")
    plans = (first,) + plans[1:]
  return Design(s_cfg, t_cfg, transfer, abs_params, p_shardings, projection, plans)


def resolve_teacher_vocab(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`data.vocab = "teacher"` as the teacher's own tokenizer file, in a copy of the config (so
  config.json records the file used); the config itself when there is nothing to resolve."""
  if str(config.data.vocab) != distill_config.TEACHER_VOCAB:
    return config
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.data.vocab = teacher_lib.vocab_source(str(config.teacher.checkpoint))
  return resolved


class PretrainTask:
  """Teacher pretraining (`scratch`) or knowledge transfer into a student (every other
  schedule), for `mbert_jax.training.loop.run`."""

  stop_field = distill_config.STOP_FIELD

  def __init__(self, config: ml_collections.ConfigDict):
    self.stages = distill_config.validate_config(config)
    # A micro teacher exists once setup has written it into the workdir.
    micro = micro_teacher.is_micro(str(config.get("teacher", {}).get("checkpoint", "")))
    self.config = config if micro else resolve_teacher_vocab(config)

  def identity(self) -> dict[str, Any]:
    return distill_config.run_identity(self.config)

  def setup(self, workdir: str, mesh, rules) -> Setup:
    """Reads the corpus (and the teacher and its cached targets) and builds every stage."""
    c, stages = self.config, self.stages
    needs_teacher = any(s.needs_teacher for s in stages)
    if needs_teacher and micro_teacher.is_micro(str(c.teacher.checkpoint)):
      c = c.copy_and_resolve_references()
      with c.unlocked():
        c.teacher.checkpoint = micro_teacher.materialize(str(c.teacher.checkpoint), workdir,
                                                         c.data)
      self.config = c = resolve_teacher_vocab(c)
    if needs_teacher:
      self._check_vocabulary()
    pipe = build_pipeline(c.data, workdir, split="train")
    eval_pipe = build_pipeline(c.data, workdir, split="eval")
    seq = c.data.max_seq_length
    s_cfg = distill_config.model_config_from(c.model, pipe.vocab_size, c.train.compute_dtype, seq,
                                             pipe.special_ids)
    schedule_steps = schedule_lib.total_steps(stages)
    end_step = schedule_steps if c.train.steps == -1 else min(int(c.train.steps), schedule_steps)
    # Cached teacher targets: opened (and checked against this run's data and teacher) before
    # anything compiles; None when schedule.teacher_cache is empty.
    cache = teacher_cache.open_for_run(c, pipe) if needs_teacher else None
    cached_stage = teacher_cache.distillation_stage(stages)[0] if cache is not None else None
    sharding.check_batch_divisible(c.data.batch_size, mesh, c.train.grad_accum_steps)

    teacher, t_cfg, transfer, seed_line = None, None, None, ""
    if needs_teacher:
      teacher, t_cfg, transfer = self._open_teacher(workdir, mesh, rules, s_cfg, stages,
                                                    schedule_steps, cached_stage)
      seed_line = self._check_seeding(s_cfg, t_cfg, teacher, stages)
    teacher_params = teacher.params if teacher is not None else None
    d = design(c, stages, s_cfg, t_cfg, transfer, teacher_params, mesh, rules, cached_stage,
               cache.directory if cache is not None else None, seed_line=seed_line)
    # Teacher accuracy and agreement only mean something for a teacher with a trained MLM head.
    eval_teacher = build(t_cfg) if teacher is not None and teacher.has_mlm_head else None
    eval_fn = jax.jit(sharding.under_rules(
        objective.make_eval_step(build(s_cfg), eval_teacher, bool(c.data.next_sentence)),
        mesh, rules))

    def init_params():
      params, _ = sharding.init_params(build(s_cfg), example_inputs(s_cfg), c.train.seed, mesh,
                                       rules)
      if needs_teacher:
        params, report = teacher_lib.init_student_from_teacher(
            params, teacher_params, s_cfg, t_cfg, c.teacher, teacher_fresh=teacher.fresh)
        logging.info("student from teacher: %s", teacher_lib.seed_report_summary(report))
        for line in report.lines():
          logging.info("  %s", line)
      if d.projection is not None:
        params = {**params, teacher_lib.PROJECTION_KEY: jax.device_put(
            d.projection, d.param_shardings[teacher_lib.PROJECTION_KEY])}
      return params

    def batch_at(step: int) -> dict[str, np.ndarray]:
      local = pipe.batch_at(step, jax.process_index(), jax.process_count())
      if cached_stage is not None and schedule_lib.stage_at(stages, step)[0] == cached_stage:
        # The cache checks each row's input digest, so it can never pair targets with other
        # rows.
        local.update(cache.targets_at(step, jax.process_index(), jax.process_count(),
                                      batch=local))
      return local

    def evaluate(params, step: int, final: bool) -> dict[str, float]:
      sums: dict[str, float] = {}
      for i in range(int(c.train.eval_steps)):
        local = eval_pipe.batch_at(i, jax.process_index(), jax.process_count())
        out = jax.device_get(eval_fn(params, teacher_params, sharding.global_batch(local, mesh)))
        for k, v in out.items():
          sums[k] = sums.get(k, 0.0) + float(v)
      return objective.summarise_eval(sums)

    def report() -> dict[str, Any]:
      return {"end_step": end_step, "schedule_steps": schedule_steps,
              "schedule": c.schedule.name, "stages": [s.name for s in stages],
              "params": model_summary.param_table(s_cfg),
              "teacher": c.teacher.checkpoint if needs_teacher else None,
              "teacher_loaded": teacher_params is not None,
              "teacher_cache": cache.directory if cache is not None else None,
              "transfer": transfer.describe() if transfer is not None else None}

    return Setup(
        stages=d.plans, abstract_params=d.abstract_params, param_shardings=d.param_shardings,
        init_params=init_params, batch_at=batch_at, evaluate=evaluate,
        global_batch_size=int(c.data.batch_size), total_steps=end_step, stop_step=end_step,
        files={CONFIG_FILE: c.to_dict(), MODEL_CONFIG_FILE: s_cfg.to_dict()},
        write_side_files=lambda w: pipe.save_vocab(os.path.join(w, TOKENIZER_DIR)),
        report=report)

  def _check_vocabulary(self) -> None:
    """A student vocabulary other than the teacher's, refused before the corpus is tokenized
    (a vocabulary still to be trained, `train:<size>`, is checked once it exists)."""
    c = self.config
    if tokenizer_lib.parse_trained_vocab_size(str(c.data.vocab)) is not None:
      return
    size = tokenizer_lib.load_tokenizer(str(c.data.vocab)).get_vocab_size(with_added_tokens=True)
    teacher_lib.check_vocabulary(
        table_size_for(c.model.get("vocab_size", -1), size),
        teacher_lib.read_teacher_config(c.teacher), teacher_path=c.teacher.checkpoint,
        student_vocab=str(c.data.vocab),
        teacher_vocab=teacher_lib.teacher_vocab_file(c.teacher.checkpoint))

  def _check_seeding(self, s_cfg: ModelConfig, t_cfg, teacher, stages) -> str:
    """What the student will take from the teacher, said on the console (and refused where a
    stage would freeze what could not be copied) before anything compiles; the summary line."""
    c = self.config
    t_shapes = (model_summary.param_shapes(t_cfg) if teacher is None else
                {k: tuple(v.shape) for k, v in
                 traverse_util.flatten_dict(teacher.params, sep="/").items()})
    report = teacher_lib.plan_seed(model_summary.param_shapes(s_cfg), t_shapes, s_cfg, t_cfg,
                                   c.teacher, teacher_fresh=teacher.fresh if teacher else ())
    summary = "student from teacher: " + teacher_lib.seed_report_summary(report)
    (logging.warning if report.skipped else logging.info)("%s", summary)
    for line in teacher_lib.check_frozen_fresh(stages, report, str(c.teacher.frozen_fresh),
                                               str(c.schedule.name)):
      logging.warning("%s", line)
    return summary

  def _open_teacher(self, workdir: str, mesh, rules, s_cfg: ModelConfig, stages,
                    schedule_steps: int, cached_stage: int | None):
    """(teacher or None, its config, the transfer plan). The teacher's parameters are loaded
    unless every stage this run still has to take reads cached targets and the student needs
    no seeding from it (a resumed run)."""
    c = self.config
    start = latest_checkpoint_step(workdir)
    online = start is None or any(
        s.needs_teacher and i != cached_stage
        for i, s in enumerate(stages)
        if i >= schedule_lib.stage_at(stages, min(start, schedule_steps - 1))[0])
    if online:
      teacher = teacher_lib.open_teacher(c.teacher, mesh, rules)
      t_cfg, has_mlm, t_vocab = teacher.config, teacher.has_mlm_head, teacher.vocab_file
    else:
      # The cache holds the teacher's MLM distribution, so it had an MLM head.
      teacher, t_cfg = None, teacher_lib.read_teacher_config(c.teacher)
      has_mlm, t_vocab = True, ""
      logging.info("teacher parameters not loaded: the remaining stages read cached targets "
                   "(%.1f MiB of teacher parameters saved)",
                   model_summary.param_table(t_cfg)["total"] * 4 / 2**20)
    transfer = teacher_lib.check_transfer(
        c.kt, stages, s_cfg, t_cfg, has_mlm, teacher_path=c.teacher.checkpoint,
        student_vocab=str(c.data.vocab), teacher_vocab=t_vocab)
    logging.info("knowledge transfer: %s", transfer.describe())
    return teacher, t_cfg, transfer
