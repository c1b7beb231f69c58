"""What one stage of pretraining or knowledge transfer computes, as pure functions of the
params and a batch: the student's (possibly truncated) forward, the teacher's forward, the
transfer / distillation / MLM / NSP terms weighted as the stage says, the held-out evaluation
(MLM accuracy and loss, teacher agreement), and the analytic FLOPs of a step.

Nothing here reads a file or a config section: `distill.task` builds a `LossContext` per stage
and hands `compute_loss` to the loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mbert_jax.distill import losses
from mbert_jax.distill import schedule as schedule_lib
from mbert_jax.distill import teacher as teacher_lib
from mbert_jax.distill import teacher_outputs
from mbert_jax.models import ModelConfig, layers
from mbert_jax.models import summary as model_summary
from mbert_jax.training.task import ParamSubset

TERMS_NEEDING_HEADS = ("mlm", "kd")


@dataclasses.dataclass(frozen=True)
class LossContext:
  """Everything static one stage's loss closes over."""
  model: Any
  teacher: Any | None
  stage: schedule_lib.Stage
  kt: dict
  dropout: bool
  plan: Any = None              # teacher.TransferPlan (None: no teacher)
  cached_targets: bool = False  # kd from the batch's cached top-k teacher logits
  nsp: bool = True              # the batches carry next-sentence labels (data.next_sentence)


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


def trained_depth(stage, num_layers: int) -> int | None:
  """The encoder depth a truncated stage trains, when the update may skip the layers above
  it: they do not run (no gradient), their multiplier is 0
  (`stage.GroupMultipliers.encoder_vector` gates them) and, the optimizer being reset at the
  stage's start, their moments are 0. None: update every layer slice."""
  if (stage.num_layers is None or not 0 < stage.num_layers < num_layers
      or not stage.reset_optimizer):
    return None
  return stage.num_layers


def first_layers_subset(n: int | None) -> ParamSubset | None:
  """The `StagePlan.trained` part of a stage that trains only the first `n` encoder layers."""
  if n is None:
    return None
  return ParamSubset(take=lambda tree: layers.first_layers(tree, n),
                     put=layers.write_first_layers, description=f"encoder layers 1..{n}")


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
    if stage.transfer_layers and ctx.plan is not None:
      teacher = teacher_outputs.adapt(teacher, ctx.teacher.cfg, teacher_params,
                                      ctx.plan.teacher_feature_norm, ctx.plan.relation_rotary)
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
  if ctx.nsp:
    nsp, nsp_acc = losses.nsp_loss(student.nsp_logits, batch["next_sentence_labels"])
    terms["nsp_loss"], terms["nsp_accuracy"] = nsp, nsp_acc
    if stage.weight("nsp") > 0:
      total = total + stage.weight("nsp") * nsp
  total = total / stage.loss_divisor
  terms["loss"] = total
  return total, terms


def make_eval_step(model, teacher, nsp: bool = True):
  """Sums over one held-out batch: student (and teacher) MLM, NSP when the data has it,
  top-1 agreement."""
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
    sums = {"weight": jnp.sum(w), "mlm_nll": jnp.sum(w * nll),
            "mlm_correct": jnp.sum(w * (pred == labels)),
            "examples": jnp.asarray(labels.shape[0], jnp.float32)}
    if nsp and out.nsp_logits is not None:
      nsp_pred = jnp.argmax(out.nsp_logits, -1)
      sums["nsp_correct"] = jnp.sum(nsp_pred == batch["next_sentence_labels"]).astype(
          jnp.float32)
    if teacher is not None:
      t_out = run(teacher, teacher_params, batch)
      t_pred = jnp.argmax(t_out.mlm_logits, -1)
      sums["teacher_mlm_correct"] = jnp.sum(w * (t_pred == labels))
      sums["agreement"] = jnp.sum(w * (t_pred == pred))
    return sums

  return step


def summarise_eval(sums: dict[str, float]) -> dict[str, float]:
  w = max(sums["weight"], 1e-9)
  out = {"eval/mlm_loss": sums["mlm_nll"] / w, "eval/mlm_accuracy": sums["mlm_correct"] / w}
  if "nsp_correct" in sums:
    out["eval/nsp_accuracy"] = sums["nsp_correct"] / max(sums["examples"], 1)
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
