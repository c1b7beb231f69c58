"""The losses a distillation stage sums: masked-LM, next-sentence and the teacher's MLM
distribution (full, or top-k from the teacher cache), plus `transfer_losses`, which gathers the
layer-wise knowledge-transfer terms of `feature_losses` and `attention_losses` for the layers a
stage trains. The MobileBERT paper's "Training Objectives" section defines the terms; the
defaults follow the official TF1 code.

Pure functions on arrays: they know model outputs and batches, nothing about optimisers, steps
or stages. Every loss is computed in float32 whatever the input dtype, and teacher inputs are
always wrapped in `stop_gradient`, so a caller may differentiate a loss with respect to a tree
that contains the teacher without moving it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from mbert_jax.distill.attention_losses import attention_loss, relation_transfer_loss
from mbert_jax.distill.feature_losses import (feature_map_loss, moment_discrepancy,
                                              project_features, similarity_loss,
                                              stacked_token_moments, token_moments)
from mbert_jax.distill.loss_utils import (AVERAGE_OVER, Array, f32, require_choice, require_rank,
                                          require_same_shape, safe_divide, teacher_f32,
                                          token_mask, xlogy_where_positive)
from mbert_jax.distill.transfer_options import (FEATURE_PROJECTIONS, FEATURE_TRANSFERS,
                                                configured_layer_map, resolve_attention_transfer,
                                                resolve_relation_heads, transfer_option)

# BERT's `masked_lm_weights` denominator guard (TF1 `run_pretraining.py`).
MLM_WEIGHT_EPS = 1e-5

TRANSFER_TERMS = ("fmt", "at", "mean", "var")


# ----------------------------------------------------------------------------------------------
# Pre-training losses
# ----------------------------------------------------------------------------------------------

def _label_log_prob(log_probs: Array, labels: Array) -> Array:
  return jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _check_mlm_inputs(logits: Array, labels: Array, weights: Array) -> None:
  require_rank(logits, 3, "MLM logits [batch, predictions, vocab]")
  if jnp.shape(labels) != jnp.shape(logits)[:2]:
    raise ValueError(f"MLM labels shape {jnp.shape(labels)} != logits' [batch, predictions] "
                     f"{jnp.shape(logits)[:2]}")
  if jnp.shape(weights) != jnp.shape(labels):
    raise ValueError(f"MLM weights shape {jnp.shape(weights)} != labels shape "
                     f"{jnp.shape(labels)}")


def _weighted_accuracy(predictions: Array, labels: Array, weights: Array) -> Array:
  correct = (predictions == labels).astype(jnp.float32)
  return safe_divide(jnp.sum(weights * correct), jnp.sum(weights))


def mlm_loss(logits: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
  """Masked-LM cross-entropy as BERT: sum(w * CE) / (sum(w) + 1e-5), and weighted accuracy.

  logits [B, P, V] at the masked positions, labels [B, P] token ids, weights [B, P]
  (`masked_lm_weights`: 1 for a real prediction, 0 for padding slots).
  """
  _check_mlm_inputs(logits, labels, weights)
  weights = f32(weights)
  log_probs = jax.nn.log_softmax(f32(logits), axis=-1)
  per_position = -_label_log_prob(log_probs, labels)
  loss = jnp.sum(weights * per_position) / (jnp.sum(weights) + MLM_WEIGHT_EPS)
  accuracy = _weighted_accuracy(jnp.argmax(logits, axis=-1), labels, weights)
  return loss, accuracy


def nsp_loss(logits: Array, labels: Array) -> tuple[Array, Array]:
  """Next-sentence cross-entropy (mean over the batch) and accuracy.

  logits [B, 2]; labels [B] with 0 = B continues A, 1 = random (BERT convention).
  """
  require_rank(logits, 2, "NSP logits [batch, 2]")
  if jnp.shape(labels) != jnp.shape(logits)[:1]:
    raise ValueError(f"NSP labels shape {jnp.shape(labels)} != batch {jnp.shape(logits)[:1]}")
  log_probs = jax.nn.log_softmax(f32(logits), axis=-1)
  loss = -jnp.mean(_label_log_prob(log_probs, labels))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, accuracy


def distillation_mlm_loss(student_logits: Array, teacher_logits: Array, labels: Array,
                          weights: Array, *, alpha: float = 0.5,
                          temperature: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """Pre-training distillation (PD) MLM loss, TF1's `distill_ground_truth_ratio` mix: CE
  against y = alpha*onehot + (1-alpha)*softmax(teacher).

  loss = sum(w * CE(y, student)) / (sum(w) + 1e-5)
       = alpha * ground_truth_ce + (1 - alpha) * kd_ce      (both with the same denominator).

  Temperature. TF1 multiplies the teacher's final *hidden state* by T before its MLM head;
  because the head's transform ends in a LayerNorm this is not a logit rescaling, and the caller
  must do it before computing `teacher_logits` if it wants TF1's behaviour. Here `temperature`
  is the standard one: teacher logits are divided by it before the softmax (student logits are
  left alone and there is no T^2 factor, matching TF1's one-sided use). At T = 1 (README value)
  both readings are the identity.

  Returns (loss, metrics) with metrics:
    ground_truth_ce: weighted CE against the labels (BERT's masked_lm_loss);
    kd_ce:           weighted CE against the teacher distribution (KL + teacher entropy);
    kd_kl:           weighted KL(teacher || student), the paper's L_KD (0 when they agree);
    accuracy:        student top-1 vs labels; agreement: student vs teacher top-1 (weighted).
  """
  _check_mlm_inputs(student_logits, labels, weights)
  require_same_shape(student_logits, teacher_logits, "MLM distillation logits")
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha (ground-truth ratio) must be in [0, 1], got {alpha}")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  weights = f32(weights)
  denominator = jnp.sum(weights) + MLM_WEIGHT_EPS

  student_log_probs = jax.nn.log_softmax(f32(student_logits), axis=-1)
  teacher_log_probs = jax.nn.log_softmax(teacher_f32(teacher_logits) / temperature, axis=-1)
  teacher_probs = jnp.exp(teacher_log_probs)

  gt_per_position = -_label_log_prob(student_log_probs, labels)
  kd_per_position = -jnp.sum(xlogy_where_positive(teacher_probs, student_log_probs), axis=-1)
  teacher_entropy = -jnp.sum(xlogy_where_positive(teacher_probs, teacher_log_probs), axis=-1)

  return _mixed_mlm_result(weights, denominator, gt_per_position, kd_per_position,
                           teacher_entropy, alpha, jnp.argmax(student_logits, axis=-1), labels,
                           jnp.argmax(teacher_logits, axis=-1))


def _mixed_mlm_result(weights, denominator, gt_per_position, kd_per_position, teacher_entropy,
                      alpha, student_top1, labels, teacher_top1) -> tuple[Array, dict[str, Array]]:
  """Weighted means of the per-position terms, the mixed loss and its metrics (shared by the
  full-vocabulary and the top-k distillation losses)."""
  ground_truth_ce = jnp.sum(weights * gt_per_position) / denominator
  kd_ce = jnp.sum(weights * kd_per_position) / denominator
  kd_kl = jnp.sum(weights * (kd_per_position - teacher_entropy)) / denominator
  loss = alpha * ground_truth_ce + (1.0 - alpha) * kd_ce
  metrics = {
      "ground_truth_ce": ground_truth_ce,
      "kd_ce": kd_ce,
      "kd_kl": kd_kl,
      "accuracy": _weighted_accuracy(student_top1, labels, weights),
      "agreement": _weighted_accuracy(student_top1, teacher_top1, weights),
  }
  return loss, metrics

# ----------------------------------------------------------------------------------------------
# Sparse MLM distillation: the teacher known only by its top-k logits (distill.teacher_cache)
# ----------------------------------------------------------------------------------------------

def _check_topk_inputs(student_logits: Array, topk_values: Array, topk_indices: Array,
                       log_normalizer: Array) -> None:
  batch_predictions = tuple(jnp.shape(student_logits)[:2])
  vocab = jnp.shape(student_logits)[-1]
  if jnp.ndim(topk_values) != 3 or tuple(jnp.shape(topk_values)[:2]) != batch_predictions:
    raise ValueError(f"top-k teacher values shape {jnp.shape(topk_values)} is not [batch, "
                     f"predictions, k] with [batch, predictions] = {batch_predictions}")
  if jnp.shape(topk_indices) != jnp.shape(topk_values):
    raise ValueError(f"top-k teacher indices shape {jnp.shape(topk_indices)} != values shape "
                     f"{jnp.shape(topk_values)}")
  if not jnp.issubdtype(jnp.asarray(topk_indices).dtype, jnp.integer):
    raise ValueError(f"top-k teacher indices must be integers, got "
                     f"{jnp.asarray(topk_indices).dtype}")
  if not 1 <= jnp.shape(topk_values)[-1] <= vocab:
    raise ValueError(f"top-k: k = {jnp.shape(topk_values)[-1]} must lie in [1, vocab = {vocab}]")
  if tuple(jnp.shape(log_normalizer)) != batch_predictions:
    raise ValueError(f"teacher log-normaliser shape {jnp.shape(log_normalizer)} != [batch, "
                     f"predictions] {batch_predictions}")


def _log_mass_outside(log_probs: Array, listed: Array) -> tuple[Array, Array]:
  """(log of the probability outside the listed entries, whether any entry is outside).

  Summing the unlisted probabilities directly (a masked log-sum-exp) stays exact where
  1 - sum(listed) would cancel. Rows with nothing outside get a dummy finite row, so neither
  the value nor the gradient sees a log-sum-exp over nothing; callers mask them out.
  """
  has_rest = ~jnp.all(listed, axis=-1)
  outside = jnp.where(listed, -jnp.inf, log_probs)
  outside = jnp.where(has_rest[..., None], outside, 0.0)
  return jax.nn.logsumexp(outside, axis=-1), has_rest


def sparse_kd_loss(student_logits: Array, topk_values: Array, topk_indices: Array,
                   log_normalizer: Array, labels: Array, weights: Array, *,
                   temperature: float = 1.0, alpha: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """`distillation_mlm_loss` against a teacher known by its top-k logits only (cached targets).

  The teacher's distribution at a position is kept exactly on k + 1 outcomes: the k listed
  tokens, p_i = exp(topk_values_i / T - log_normalizer), and "any other token", with the
  remaining mass r = 1 - sum_i p_i. The student's distribution q is grouped the same way, so

    kd_ce = -sum_i p_i log q(token_i) - r log q(unlisted)

  is a cross-entropy between two proper distributions (kd_kl >= 0, 0 when the grouped
  distributions agree). Its gradient wrt the student logits is q - y, where y is p on the
  listed tokens and spreads r over the others in proportion to the student's own
  probabilities. With k = V nothing is unlisted and this is `distillation_mlm_loss` exactly.

  student_logits [B, P, V]; labels, weights [B, P] as in `mlm_loss`.
  topk_values [B, P, k]: teacher logits of the listed tokens, in any dtype and with any shift
    common to a position (the cache stores logit minus the top-1 logit in 16 bits), sorted in
    descending order so entry 0 is the teacher's top-1 (used for `agreement`).
  topk_indices [B, P, k]: their vocabulary ids (any integer dtype).
  log_normalizer [B, P]: log sum over the WHOLE vocabulary of exp(teacher logit / T), with the
    same shift and at the same temperature T as here; it is what keeps p a distribution.
  temperature divides the teacher's logits only, no T^2 factor (as `distillation_mlm_loss`).

  Returns (alpha * ground_truth_ce + (1 - alpha) * kd_ce, metrics) with the metrics of
  `distillation_mlm_loss`: ground_truth_ce, kd_ce, kd_kl, accuracy, agreement.
  """
  _check_mlm_inputs(student_logits, labels, weights)
  _check_topk_inputs(student_logits, topk_values, topk_indices, log_normalizer)
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha (ground-truth ratio) must be in [0, 1], got {alpha}")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  weights = f32(weights)
  denominator = jnp.sum(weights) + MLM_WEIGHT_EPS
  indices = jnp.asarray(topk_indices).astype(jnp.int32)

  teacher_log_probs = (teacher_f32(topk_values) / temperature
                       - teacher_f32(log_normalizer)[..., None])
  teacher_probs = jnp.exp(teacher_log_probs)
  # Rounding of 16-bit values can push the listed mass a hair over 1; the rest is then 0.
  listed_log_mass = jnp.minimum(jax.nn.logsumexp(teacher_log_probs, axis=-1), 0.0)
  teacher_rest = -jnp.expm1(listed_log_mass)

  student_log_probs = jax.nn.log_softmax(f32(student_logits), axis=-1)
  listed = jnp.put_along_axis(jnp.zeros(jnp.shape(student_logits), jnp.bool_), indices, True,
                              axis=-1, inplace=False)
  student_rest_log, has_rest = _log_mass_outside(student_log_probs, listed)
  student_listed = jnp.take_along_axis(student_log_probs, indices, axis=-1)

  def rest_term(log_q: Array) -> Array:
    return jnp.where(has_rest, xlogy_where_positive(teacher_rest, log_q), 0.0)

  kd_per_position = -(jnp.sum(xlogy_where_positive(teacher_probs, student_listed), axis=-1)
                      + rest_term(student_rest_log))
  teacher_entropy = -(jnp.sum(xlogy_where_positive(teacher_probs, teacher_log_probs), axis=-1)
                      + rest_term(jnp.log(teacher_rest)))
  gt_per_position = -_label_log_prob(student_log_probs, labels)

  return _mixed_mlm_result(weights, denominator, gt_per_position, kd_per_position,
                           teacher_entropy, alpha, jnp.argmax(student_logits, axis=-1), labels,
                           indices[..., 0])

# ----------------------------------------------------------------------------------------------
# Layer-wise knowledge transfer: every term for the layers a stage trains
# ----------------------------------------------------------------------------------------------

def _full_depth_layer_map(cfg: Any, student_out: Any, teacher_out: Any) -> tuple[int, ...]:
  """Full-depth map from the config; inferred from the outputs only when the config is silent.

  Inference is right when neither model is truncated or both have the same depth; a truncated
  run with different depths must pass num_student_layers / num_teacher_layers.
  """
  num_student = transfer_option(cfg, "num_student_layers")
  num_teacher = transfer_option(cfg, "num_teacher_layers")
  custom = tuple(transfer_option(cfg, "layer_map") or ())
  if (num_student is None) != (num_teacher is None):
    raise ValueError("set both num_student_layers and num_teacher_layers, or neither")
  if num_student is None:
    if custom:
      return configured_layer_map(custom, len(custom), None)
    num_student = len(student_out.hidden_states) - 1
    num_teacher = len(teacher_out.hidden_states) - 1
  return configured_layer_map(custom, int(num_student), int(num_teacher))


def _check_available(layer: int, available: int, who: str) -> None:
  if not 1 <= layer <= available:
    raise ValueError(f"transfer needs {who} layer {layer}, but the {who} ran {available} layers "
                     f"(run it with num_layers >= {layer})")


def _layer_qkv(out: Any, layer: int, who: str) -> tuple[Array, Array, Array]:
  qkv = getattr(out, "qkv", ()) or ()
  if len(qkv) < layer:
    raise ValueError(f"relation attention transfer needs the {who}'s queries/keys/values of "
                     f"layer {layer}: run the {who} with return_qkv=True")
  return qkv[layer - 1]


def _student_features(student_h: Array, teacher_h: Array, projection: Any, mode: str,
                      layer: int) -> Array:
  """The student feature map as compared with the teacher's under feature_transfer='features'."""
  if projection is not None:
    return project_features(student_h, projection, layer)
  student_width, teacher_width = jnp.shape(student_h)[-1], jnp.shape(teacher_h)[-1]
  if mode in ("shared", "per_layer"):
    raise ValueError(f"kt.feature_projection={mode!r} but no projection params were passed: "
                     "give transfer_losses the state's params['kt_projection'] "
                     "(teacher.init_transfer_params)")
  if student_width != teacher_width:
    raise ValueError(f"feature maps are {student_width} (student) vs {teacher_width} (teacher) "
                     "wide: pass the projection params (kt.feature_projection='auto', "
                     "teacher.init_transfer_params) or set kt.feature_transfer='similarity'")
  return student_h


def transfer_losses(student_out: Any, teacher_out: Any, attention_mask: Array | None,
                    cfg: Mapping[str, Any] | Any, layers: Sequence[int],
                    projection: Mapping[str, Array] | None = None,
                    terms: Sequence[str] = TRANSFER_TERMS) -> dict[str, Array]:
  """Per-layer knowledge-transfer terms for the listed student layers (1-based).

  `student_out` / `teacher_out` provide `.hidden_states` (embedding output first),
  `.attention_scores` (one [B, N, T, T] per layer) and, for relation transfer, `.qkv` (one
  (q, k, v) per layer, `return_qkv=True`), possibly truncated. Each student layer i is compared
  with teacher layer `kt.layer_map[i - 1]` (uniform map when empty); both must have been run.

  Feature terms ('fmt', 'mean', 'var'): with feature_transfer='features' the student's map goes
  through `projection` (params['kt_projection'], from `teacher.init_transfer_params`) when one
  is given, and FMT and mean/variance compare the projected map with the teacher's; with
  'similarity' FMT compares token-similarity matrices and mean/var the raw per-token moments
  (both width-free, no parameters). Attention term ('at'): per-head attention maps, or the sum
  of MiniLMv2's Q-Q, K-K, V-V relation KLs over `relation_heads` heads (kt.attention_transfer).

  Returns the requested `terms` (default all of 'fmt', 'at', 'mean', 'var'), each a float32
  array [len(layers)] in the order of `layers`, unweighted, so the trainer applies the stage's
  weights and logs each layer. Leave 'at' out of `terms` when the stage does not weight it, so
  neither model has to return Q/K/V. See transfer_options.TRANSFER_DEFAULTS for the config keys.
  """
  layers = tuple(layers)
  terms = tuple(terms)
  if not layers:
    raise ValueError("transfer_losses needs at least one student layer")
  if not terms or set(terms) - set(TRANSFER_TERMS):
    raise ValueError(f"terms must be a non-empty subset of {TRANSFER_TERMS}, got {terms}")
  normalize = bool(transfer_option(cfg, "normalize_features"))
  feature_over = transfer_option(cfg, "feature_over")
  attention_over = transfer_option(cfg, "attention_over")
  attention_kind = transfer_option(cfg, "attention_kind")
  all_layer_stats = bool(transfer_option(cfg, "tf1_all_layer_stats"))
  feature_transfer = transfer_option(cfg, "feature_transfer")
  projection_mode = transfer_option(cfg, "feature_projection")
  require_choice(feature_over, AVERAGE_OVER, "feature_over")
  require_choice(feature_transfer, FEATURE_TRANSFERS, "kt.feature_transfer")
  require_choice(projection_mode, FEATURE_PROJECTIONS, "kt.feature_projection")
  if feature_transfer == "similarity" and projection is not None:
    raise ValueError("kt.feature_transfer='similarity' is parameter-free: pass projection=None")
  if projection is not None and projection_mode == "none":
    raise ValueError("kt.feature_projection='none' but projection params were passed")
  if feature_over == "real" and attention_mask is None:
    raise ValueError("feature_over='real' needs attention_mask [batch, seq]")
  feature_mask = attention_mask if feature_over == "real" else None

  mapping = _full_depth_layer_map(cfg, student_out, teacher_out)
  student_depth = len(student_out.hidden_states) - 1
  teacher_depth_run = len(teacher_out.hidden_states) - 1
  wants_features = any(t in terms for t in ("fmt", "mean", "var"))
  # TF1 takes the statistics of every teacher output that exists; computed once for all layers.
  teacher_stats = None
  if all_layer_stats and ("mean" in terms or "var" in terms):
    teacher_stats = stacked_token_moments(teacher_out.hidden_states)
  attention_mode = relation_heads = None

  per_term: dict[str, list[Array]] = {term: [] for term in terms}
  for layer in layers:
    if not 1 <= layer <= len(mapping):
      raise ValueError(f"student layer {layer} outside 1..{len(mapping)}")
    teacher_layer = mapping[layer - 1]
    _check_available(layer, student_depth, "student")
    _check_available(teacher_layer, teacher_depth_run, "teacher")
    student_h = student_out.hidden_states[layer]
    teacher_h = teacher_out.hidden_states[teacher_layer]
    student_heads = jnp.shape(student_out.attention_scores[layer - 1])[1]
    teacher_heads = jnp.shape(teacher_out.attention_scores[teacher_layer - 1])[1]
    if "at" in terms and attention_mode is None:
      attention_mode = resolve_attention_transfer(transfer_option(cfg, "attention_transfer"),
                                                  student_heads, teacher_heads)
    if wants_features:
      if feature_transfer == "similarity":
        student_f = student_h
        if "fmt" in terms:
          per_term["fmt"].append(
              similarity_loss(student_h, teacher_h, normalize=normalize, mask=feature_mask))
      else:
        student_f = _student_features(student_h, teacher_h, projection, projection_mode, layer)
        if "fmt" in terms:
          per_term["fmt"].append(
              feature_map_loss(student_f, teacher_h, normalize=normalize, mask=feature_mask))
      if "mean" in terms or "var" in terms:
        weights = token_mask(feature_mask, student_f, "mean/variance transfer")
        if jnp.shape(student_f)[:2] != jnp.shape(teacher_h)[:2]:
          raise ValueError(f"mean/variance transfer: student [batch, seq] "
                           f"{jnp.shape(student_f)[:2]} != teacher {jnp.shape(teacher_h)[:2]}")
        stats = teacher_stats if teacher_stats is not None else token_moments(teacher_h)
        beta, gamma = moment_discrepancy(token_moments(student_f), stats, weights)
        if "mean" in terms:
          per_term["mean"].append(beta)
        if "var" in terms:
          per_term["var"].append(gamma)
    if attention_mode == "per_head":
      per_term["at"].append(
          attention_loss(student_out.attention_scores[layer - 1],
                         teacher_out.attention_scores[teacher_layer - 1],
                         attention_mask=attention_mask, over=attention_over, kind=attention_kind))
    elif attention_mode == "relation":
      student_qkv = _layer_qkv(student_out, layer, "student")
      teacher_qkv = _layer_qkv(teacher_out, teacher_layer, "teacher")
      if relation_heads is None:
        relation_heads = resolve_relation_heads(
            int(transfer_option(cfg, "relation_heads")), jnp.shape(student_qkv[0])[-1],
            jnp.shape(teacher_qkv[0])[-1], student_heads, teacher_heads)
      per_term["at"].append(relation_transfer_loss(
          student_qkv, teacher_qkv, relation_heads, attention_mask=attention_mask,
          over=attention_over))
  return {term: jnp.stack(values) for term, values in per_term.items()}

