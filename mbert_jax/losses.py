"""Pre-training and knowledge-transfer losses (spec §8).

Pure functions on arrays: they know model outputs and batches, nothing about optimisers, steps
or stages. Every loss is computed in float32 whatever the input dtype, because the student's
feature maps reach 1e7-1e8 (spec §13.4) and bf16 squares of those lose all precision.

Teacher inputs are always wrapped in `stop_gradient`, so a caller may differentiate a loss with
respect to a tree that contains the teacher without moving it.

Padding: the official codes average every knowledge-transfer term over all positions, padded
ones included (spec §8.2, §14.9). That is the default here (`over='all'`, `mask=None`);
averaging over real tokens only is an option.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array

# TF1 `tf.contrib.layers.layer_norm` epsilon, used by the parameter-free normalisation of FMT.
LAYER_NORM_EPS = 1e-12
# BERT's `masked_lm_weights` denominator guard (TF1 `run_pretraining.py`).
MLM_WEIGHT_EPS = 1e-5

TRANSFER_TERMS = ("fmt", "at", "mean", "var")
ATTENTION_KINDS = ("ce", "kl")
AVERAGE_OVER = ("all", "real")
# How feature maps are compared: the (possibly projected) features themselves, or the
# parameter-free token-by-token similarity matrices (any two widths).
FEATURE_TRANSFERS = ("features", "similarity")
# Student -> teacher width projection for 'features': auto = `shared` exactly when widths differ.
FEATURE_PROJECTIONS = ("auto", "shared", "per_layer", "none")
# auto = per_head when the head counts match, else MiniLMv2 Q-Q/K-K/V-V relations.
ATTENTION_TRANSFERS = ("auto", "per_head", "relation")

# Keys `transfer_losses` reads from its config, with the official TF1 behaviour as default.
TRANSFER_DEFAULTS: dict[str, Any] = {
    "normalize_features": True,    # FMT on LN0-standardised features (official); False = raw MSE
    "feature_over": "all",         # FMT and mean/var averaged over 'all' positions or 'real' tokens
    "attention_over": "all",       # AT averaged over 'all' query rows or 'real' ones
    "attention_kind": "ce",        # 'ce' = official cross-entropy; 'kl' = true KL (0 when equal)
    "tf1_all_layer_stats": False,  # teacher mean/var from all teacher outputs (TF1 quirk, §8.2)
    "num_student_layers": None,    # full model depths for `layer_map`; None = infer from outputs
    "num_teacher_layers": None,
    "feature_transfer": "features",  # 'features' (FMT, projected if widths differ) | 'similarity'
    "feature_projection": "auto",    # auto | shared | per_layer | none (see FEATURE_PROJECTIONS)
    "attention_transfer": "auto",    # auto | per_head | relation (see ATTENTION_TRANSFERS)
    "relation_heads": 0,             # relation heads; 0 = auto (`auto_relation_heads`)
    "layer_map": (),                 # 1-based teacher layer per student layer; () = uniform
}


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def _f32(x: Array) -> Array:
  return jnp.asarray(x, jnp.float32)


def _teacher_f32(x: Array) -> Array:
  return jax.lax.stop_gradient(_f32(x))


def _require_same_shape(student: Array, teacher: Array, what: str) -> None:
  if jnp.shape(student) != jnp.shape(teacher):
    raise ValueError(f"{what}: student shape {jnp.shape(student)} != teacher shape "
                     f"{jnp.shape(teacher)}")


def _require_rank(x: Array, rank: int, what: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f"{what} must have rank {rank}, got shape {jnp.shape(x)}")


def _require_choice(value: str, choices: Sequence[str], what: str) -> None:
  if value not in choices:
    raise ValueError(f"{what} must be one of {tuple(choices)}, got {value!r}")


def _safe_divide(numerator: Array, denominator: Array) -> Array:
  """numerator / denominator, 0 where the denominator is 0 (an all-padding batch has no tokens)."""
  safe = jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(denominator > 0, numerator / safe, 0.0)


def _weighted_mean(values: Array, weights: Array | None) -> Array:
  """Mean of `values`; with `weights` (broadcastable to values) a weighted mean."""
  if weights is None:
    return jnp.mean(values)
  weights = jnp.broadcast_to(_f32(weights), values.shape)
  return _safe_divide(jnp.sum(values * weights), jnp.sum(weights))


def _token_mask(mask: Array | None, hidden: Array, what: str) -> Array | None:
  """Checks a [B, T] token mask against hidden states [..., B, T, D]."""
  if mask is None:
    return None
  if jnp.shape(mask) != jnp.shape(hidden)[-3:-1]:
    raise ValueError(f"{what}: mask shape {jnp.shape(mask)} does not match the [batch, seq] "
                     f"axes {jnp.shape(hidden)[-3:-1]} of the hidden states")
  return _f32(mask)


def _xlogy_where_positive(p: Array, log_q: Array) -> Array:
  """p * log_q with 0 wherever p == 0.

  Masked keys carry probability 0 and a huge negative log-probability; the product is 0
  mathematically but would be NaN if a mask ever produced -inf. Selecting 0 also keeps the
  gradient finite, as the unselected branch's cotangent is 0.
  """
  return jnp.where(p > 0, p * log_q, 0.0)


# ----------------------------------------------------------------------------------------------
# Pre-training losses
# ----------------------------------------------------------------------------------------------

def _label_log_prob(log_probs: Array, labels: Array) -> Array:
  return jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _check_mlm_inputs(logits: Array, labels: Array, weights: Array) -> None:
  _require_rank(logits, 3, "MLM logits [batch, predictions, vocab]")
  if jnp.shape(labels) != jnp.shape(logits)[:2]:
    raise ValueError(f"MLM labels shape {jnp.shape(labels)} != logits' [batch, predictions] "
                     f"{jnp.shape(logits)[:2]}")
  if jnp.shape(weights) != jnp.shape(labels):
    raise ValueError(f"MLM weights shape {jnp.shape(weights)} != labels shape "
                     f"{jnp.shape(labels)}")


def _weighted_accuracy(predictions: Array, labels: Array, weights: Array) -> Array:
  correct = (predictions == labels).astype(jnp.float32)
  return _safe_divide(jnp.sum(weights * correct), jnp.sum(weights))


def mlm_loss(logits: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
  """Masked-LM cross-entropy as BERT: sum(w * CE) / (sum(w) + 1e-5), and weighted accuracy.

  logits [B, P, V] at the masked positions, labels [B, P] token ids, weights [B, P]
  (`masked_lm_weights`: 1 for a real prediction, 0 for padding slots).
  """
  _check_mlm_inputs(logits, labels, weights)
  weights = _f32(weights)
  log_probs = jax.nn.log_softmax(_f32(logits), axis=-1)
  per_position = -_label_log_prob(log_probs, labels)
  loss = jnp.sum(weights * per_position) / (jnp.sum(weights) + MLM_WEIGHT_EPS)
  accuracy = _weighted_accuracy(jnp.argmax(logits, axis=-1), labels, weights)
  return loss, accuracy


def nsp_loss(logits: Array, labels: Array) -> tuple[Array, Array]:
  """Next-sentence cross-entropy (mean over the batch) and accuracy.

  logits [B, 2]; labels [B] with 0 = B continues A, 1 = random (BERT convention).
  """
  _require_rank(logits, 2, "NSP logits [batch, 2]")
  if jnp.shape(labels) != jnp.shape(logits)[:1]:
    raise ValueError(f"NSP labels shape {jnp.shape(labels)} != batch {jnp.shape(logits)[:1]}")
  log_probs = jax.nn.log_softmax(_f32(logits), axis=-1)
  loss = -jnp.mean(_label_log_prob(log_probs, labels))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, accuracy


def distillation_mlm_loss(student_logits: Array, teacher_logits: Array, labels: Array,
                          weights: Array, *, alpha: float = 0.5,
                          temperature: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """PD-stage MLM loss (spec §8.3): CE against y = alpha*onehot + (1-alpha)*softmax(teacher).

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
  _require_same_shape(student_logits, teacher_logits, "MLM distillation logits")
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha (ground-truth ratio) must be in [0, 1], got {alpha}")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  weights = _f32(weights)
  denominator = jnp.sum(weights) + MLM_WEIGHT_EPS

  student_log_probs = jax.nn.log_softmax(_f32(student_logits), axis=-1)
  teacher_log_probs = jax.nn.log_softmax(_teacher_f32(teacher_logits) / temperature, axis=-1)
  teacher_probs = jnp.exp(teacher_log_probs)

  gt_per_position = -_label_log_prob(student_log_probs, labels)
  kd_per_position = -jnp.sum(_xlogy_where_positive(teacher_probs, student_log_probs), axis=-1)
  teacher_entropy = -jnp.sum(_xlogy_where_positive(teacher_probs, teacher_log_probs), axis=-1)

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
# Knowledge-transfer losses (one layer each)
# ----------------------------------------------------------------------------------------------

def token_moments(hidden: Array) -> tuple[Array, Array]:
  """Per-token mean and population variance over the feature axis (TF1 `tf.nn.moments`)."""
  hidden = _f32(hidden)
  mean = jnp.mean(hidden, axis=-1)
  variance = jnp.mean(jnp.square(hidden - mean[..., None]), axis=-1)
  return mean, variance


def parameter_free_layer_norm(hidden: Array, eps: float = LAYER_NORM_EPS) -> Array:
  """LayerNorm with gamma=1, beta=0 (TF1's `layer_norm` on a fresh scope, eps 1e-12)."""
  mean, variance = token_moments(hidden)
  return (_f32(hidden) - mean[..., None]) * jax.lax.rsqrt(variance[..., None] + eps)


def feature_map_loss(student_h: Array, teacher_h: Array, *, normalize: bool = True,
                     mask: Array | None = None) -> Array:
  """Feature-map transfer: mean over B, T, D of (LN0(teacher) - LN0(student))^2.

  `normalize=False` gives the plain MSE of the raw features (the paper's formula). `mask` [B, T]
  (1 = real token) averages over real tokens only; None averages over all positions (official).
  """
  _require_rank(student_h, 3, "student hidden states [batch, seq, hidden]")
  _require_same_shape(student_h, teacher_h, "feature map transfer")
  token_weights = _token_mask(mask, student_h, "feature map transfer")
  if normalize:
    student, teacher = parameter_free_layer_norm(student_h), parameter_free_layer_norm(
        jax.lax.stop_gradient(teacher_h))
  else:
    student, teacher = _f32(student_h), _teacher_f32(teacher_h)
  per_token = jnp.mean(jnp.square(teacher - student), axis=-1)
  return _weighted_mean(per_token, token_weights)


def _moment_discrepancy(student_stats: tuple[Array, Array], teacher_stats: tuple[Array, Array],
                        token_weights: Array | None) -> tuple[Array, Array]:
  """beta = mean (mu_t - mu_s)^2, gamma = mean |var_t - var_s|.

  Teacher statistics may carry extra leading axes (one entry per teacher layer); they broadcast
  against the student's [B, T], so the averages also run over those axes (TF1 quirk).
  """
  student_mean, student_var = student_stats
  teacher_mean, teacher_var = (jax.lax.stop_gradient(s) for s in teacher_stats)
  beta_per_token = jnp.square(teacher_mean - student_mean)
  gamma_per_token = jnp.abs(teacher_var - student_var)
  return (_weighted_mean(beta_per_token, token_weights),
          _weighted_mean(gamma_per_token, token_weights))


def mean_variance_loss(student_h: Array, teacher_h: Array, *,
                       mask: Array | None = None) -> tuple[Array, Array]:
  """Per-layer mean/variance transfer (project default, spec §1.2): returns (beta, gamma).

  beta = mean over tokens of (mu_teacher - mu_student)^2; gamma = mean of |var_t - var_s|,
  with per-token mean / population variance over the feature axis.
  """
  _require_rank(student_h, 3, "student hidden states [batch, seq, hidden]")
  _require_same_shape(student_h, teacher_h, "mean/variance transfer")
  token_weights = _token_mask(mask, student_h, "mean/variance transfer")
  return _moment_discrepancy(token_moments(student_h), token_moments(teacher_h), token_weights)


def stacked_token_moments(hidden_states: Sequence[Array] | Array) -> tuple[Array, Array]:
  """Moments of every hidden state, stacked to [L, B, T], without stacking the [B, T, D] inputs."""
  if isinstance(hidden_states, (list, tuple)):
    if not hidden_states:
      raise ValueError("need at least one teacher hidden state")
    moments = [token_moments(h) for h in hidden_states]
    return jnp.stack([m for m, _ in moments]), jnp.stack([v for _, v in moments])
  _require_rank(hidden_states, 4, "stacked teacher hidden states [layers, batch, seq, hidden]")
  return token_moments(hidden_states)


def mean_variance_loss_all_teacher_layers(
    student_h: Array, teacher_hidden_states: Sequence[Array] | Array, *,
    mask: Array | None = None) -> tuple[Array, Array]:
  """TF1's mean/variance transfer (spec §8.2 quirk): teacher statistics come from ALL teacher
  outputs (embedding output included, stacked [Lt+1, B, T, D] or given as a sequence) and are
  broadcast against the student layer's, so beta/gamma average the discrepancy over every
  teacher output instead of comparing with the matching layer.
  """
  _require_rank(student_h, 3, "student hidden states [batch, seq, hidden]")
  teacher_stats = stacked_token_moments(teacher_hidden_states)
  if teacher_stats[0].shape[1:] != jnp.shape(student_h)[:2]:
    raise ValueError(f"mean/variance transfer: teacher [batch, seq] {teacher_stats[0].shape[1:]}"
                     f" != student {jnp.shape(student_h)[:2]}")
  token_weights = _token_mask(mask, student_h, "mean/variance transfer")
  return _moment_discrepancy(token_moments(student_h), teacher_stats, token_weights)


def attention_loss(student_scores: Array, teacher_scores: Array, *,
                   attention_mask: Array | None = None, over: str = "all",
                   kind: str = "ce") -> Array:
  """Attention transfer on masked pre-softmax scores [B, N, F, T] (F queries, T keys).

  kind='ce' (official TF1/TF2): mean over B, N, F of sum_T -softmax(teacher) * log_softmax(student);
    equals KL(teacher || student) + H(teacher), so it has the KL's gradient but is not 0 at a
    perfect match.
  kind='kl': the true KL divergence (teacher entropy subtracted), 0 when the maps are equal.
  over='all' averages over every query row (official); over='real' only over real query rows,
    which needs `attention_mask` [B, F] (1 = real token).
  Masked keys must carry a large *finite* negative score (spec §1.1); 0 * log(tiny) terms are
  forced to 0 so even -inf would not produce NaN.
  """
  _require_choice(over, AVERAGE_OVER, "attention loss 'over'")
  _require_choice(kind, ATTENTION_KINDS, "attention loss 'kind'")
  _require_rank(student_scores, 4, "student attention scores [batch, heads, queries, keys]")
  _require_same_shape(student_scores, teacher_scores, "attention transfer (heads must match)")
  row_weights = None
  if over == "real":
    if attention_mask is None:
      raise ValueError("attention loss over='real' needs attention_mask [batch, seq]")
    batch, _, queries, _ = jnp.shape(student_scores)
    if jnp.shape(attention_mask) != (batch, queries):
      raise ValueError(f"attention_mask shape {jnp.shape(attention_mask)} != [batch, queries] "
                       f"{(batch, queries)}")
    row_weights = _f32(attention_mask)[:, None, :]

  student_log_probs = jax.nn.log_softmax(_f32(student_scores), axis=-1)
  teacher_log_probs = jax.nn.log_softmax(_teacher_f32(teacher_scores), axis=-1)
  teacher_probs = jnp.exp(teacher_log_probs)
  per_row = -jnp.sum(_xlogy_where_positive(teacher_probs, student_log_probs), axis=-1)
  if kind == "kl":
    per_row = per_row + jnp.sum(_xlogy_where_positive(teacher_probs, teacher_log_probs), axis=-1)
  return _weighted_mean(per_row, row_weights)


# ----------------------------------------------------------------------------------------------
# Transfer across widths and head counts (teachers of any shape)
# ----------------------------------------------------------------------------------------------

def project_features(hidden: Array, projection: Mapping[str, Array], layer: int) -> Array:
  """Student features [B, T, Hs] mapped to the teacher width by a learned linear map (float32).

  `projection` is {'kernel': [Hs, Ht], 'bias': [Ht]} (one map shared by every layer) or
  {'kernel': [Ls, Hs, Ht], 'bias': [Ls, Ht]} (one per student layer, indexed by the 1-based
  `layer`). Float32 because MobileBERT features reach 1e7.
  """
  kernel, bias = projection["kernel"], projection["bias"]
  if jnp.ndim(kernel) == 3:
    if not 1 <= layer <= kernel.shape[0]:
      raise ValueError(f"per-layer projection has {kernel.shape[0]} layers, asked for layer "
                       f"{layer}")
    kernel, bias = kernel[layer - 1], bias[layer - 1]
  elif jnp.ndim(kernel) != 2:
    raise ValueError(f"projection kernel must be [Hs, Ht] or [Ls, Hs, Ht], got shape "
                     f"{jnp.shape(kernel)}")
  if jnp.shape(hidden)[-1] != kernel.shape[0]:
    raise ValueError(f"projection expects student width {kernel.shape[0]}, features have "
                     f"{jnp.shape(hidden)[-1]}")
  return jnp.dot(_f32(hidden), _f32(kernel)) + _f32(bias)


def token_similarity(hidden: Array, *, normalize: bool = True) -> Array:
  """[B, T, T] cosine similarities between the tokens of one feature map (float32).

  With `normalize`, each token is first LN0-standardised (centred), so a large offset shared by
  every feature (common in NoNorm MobileBERT) does not make all tokens look alike.
  """
  x = parameter_free_layer_norm(hidden) if normalize else _f32(hidden)
  x = x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + LAYER_NORM_EPS)
  return jnp.einsum("btd,bsd->bts", x, x)


def similarity_loss(student_h: Array, teacher_h: Array, *, normalize: bool = True,
                    mask: Array | None = None) -> Array:
  """Parameter-free feature transfer between any two widths: mean squared difference of the
  token-similarity matrices. `mask` [B, T] restricts the average to pairs of real tokens.
  """
  _require_rank(student_h, 3, "student hidden states [batch, seq, hidden]")
  _require_rank(teacher_h, 3, "teacher hidden states [batch, seq, hidden]")
  if jnp.shape(student_h)[:2] != jnp.shape(teacher_h)[:2]:
    raise ValueError(f"similarity transfer: student [batch, seq] {jnp.shape(student_h)[:2]} != "
                     f"teacher {jnp.shape(teacher_h)[:2]}")
  token_weights = _token_mask(mask, student_h, "similarity transfer")
  pair_weights = None
  if token_weights is not None:
    pair_weights = token_weights[:, :, None] * token_weights[:, None, :]
  student = token_similarity(student_h, normalize=normalize)
  teacher = token_similarity(jax.lax.stop_gradient(teacher_h), normalize=normalize)
  return _weighted_mean(jnp.square(teacher - student), pair_weights)


def auto_relation_heads(student_width: int, teacher_width: int, student_heads: int,
                        teacher_heads: int) -> int:
  """Relation heads when `relation_heads` = 0: the most, up to the larger attention head count,
  that split both Q/K/V widths evenly (BERT-large 1024/16 -> MobileBERT 128: 16; BERT-base
  768/12 -> 128: 8), so each relation head is about as wide as the models' own heads.
  """
  common = math.gcd(int(student_width), int(teacher_width))
  cap = max(int(student_heads), int(teacher_heads), 1)
  return max(n for n in range(1, min(cap, common) + 1) if common % n == 0)


def resolve_relation_heads(relation_heads: int, student_width: int, teacher_width: int,
                           student_heads: int, teacher_heads: int) -> int:
  """The relation head count to use; ValueError when it does not divide both widths."""
  if not isinstance(relation_heads, int) or isinstance(relation_heads, bool) or relation_heads < 0:
    raise ValueError(f"kt.relation_heads must be an int >= 0 (0 = auto), got {relation_heads!r}")
  if relation_heads == 0:
    return auto_relation_heads(student_width, teacher_width, student_heads, teacher_heads)
  for who, width in (("student", student_width), ("teacher", teacher_width)):
    if width % relation_heads:
      divisors = [n for n in range(1, math.gcd(student_width, teacher_width) + 1)
                  if student_width % n == 0 and teacher_width % n == 0]
      raise ValueError(f"kt.relation_heads={relation_heads} does not divide the {who}'s Q/K/V "
                       f"width {width} (student {student_width}, teacher {teacher_width}); "
                       f"choose one of {divisors[-8:]} or 0 (auto)")
  return relation_heads


def _relation_log_probs(x: Array, num_heads: int, key_mask: Array | None) -> Array:
  """log softmax(A A^T / sqrt(d)) per relation head: x [B, T, W] -> [B, R, T, T], float32."""
  batch, seq, width = jnp.shape(x)
  d = width // num_heads
  heads = _f32(x).reshape(batch, seq, num_heads, d)
  scores = jnp.einsum("btrd,bsrd->brts", heads, heads) * (1.0 / math.sqrt(d))
  if key_mask is not None:
    # Selecting (not adding) the floor keeps huge MobileBERT scores from overflowing to -inf.
    floor = jnp.finfo(jnp.float32).min
    scores = jnp.where(key_mask[:, None, None, :] > 0, scores, floor)
  return jax.nn.log_softmax(scores, axis=-1)


def relation_loss(student_x: Array, teacher_x: Array, num_heads: int, *,
                  attention_mask: Array | None = None, over: str = "all") -> Array:
  """MiniLMv2 self-relation transfer for one of Q, K or V ([B, T, W] before the head split).

  Both sides are split into `num_heads` relation heads (each with its own width W / num_heads),
  relation = softmax(A A^T / sqrt(d)) over keys, and the loss is KL(teacher || student) averaged
  over batch, relation heads and query rows: 0 exactly when the relations agree, whatever the
  two widths. Padded keys (`attention_mask` 0) are excluded from both softmaxes; over='real'
  also averages only over real query rows.
  """
  _require_choice(over, AVERAGE_OVER, "relation loss 'over'")
  _require_rank(student_x, 3, "student Q/K/V [batch, seq, width]")
  _require_rank(teacher_x, 3, "teacher Q/K/V [batch, seq, width]")
  if jnp.shape(student_x)[:2] != jnp.shape(teacher_x)[:2]:
    raise ValueError(f"relation transfer: student [batch, seq] {jnp.shape(student_x)[:2]} != "
                     f"teacher {jnp.shape(teacher_x)[:2]}")
  for who, x in (("student", student_x), ("teacher", teacher_x)):
    if jnp.shape(x)[-1] % num_heads:
      raise ValueError(f"relation transfer: {num_heads} relation heads do not divide the {who}'s "
                       f"width {jnp.shape(x)[-1]}")
  key_mask = None
  if attention_mask is not None:
    key_mask = _token_mask(attention_mask, student_x, "relation transfer")
  if over == "real" and key_mask is None:
    raise ValueError("relation loss over='real' needs attention_mask [batch, seq]")
  student = _relation_log_probs(student_x, num_heads, key_mask)
  teacher = jax.lax.stop_gradient(_relation_log_probs(teacher_x, num_heads, key_mask))
  teacher_probs = jnp.exp(teacher)
  per_row = jnp.sum(_xlogy_where_positive(teacher_probs, teacher)
                    - _xlogy_where_positive(teacher_probs, student), axis=-1)
  row_weights = key_mask[:, None, :] if over == "real" else None
  return _weighted_mean(per_row, row_weights)


def relation_transfer_loss(student_qkv: Sequence[Array], teacher_qkv: Sequence[Array],
                           num_heads: int, *, attention_mask: Array | None = None,
                           over: str = "all") -> Array:
  """Sum of the query-query, key-key and value-value relation losses (MiniLMv2's objective)."""
  if len(student_qkv) != 3 or len(teacher_qkv) != 3:
    raise ValueError("relation transfer needs (queries, keys, values) from both models")
  return sum(relation_loss(s, t, num_heads, attention_mask=attention_mask, over=over)
             for s, t in zip(student_qkv, teacher_qkv))


def resolve_attention_transfer(mode: str, student_heads: int, teacher_heads: int) -> str:
  """'per_head' or 'relation' for a configured mode; ValueError for per_head across head counts."""
  _require_choice(mode, ATTENTION_TRANSFERS, "kt.attention_transfer")
  if mode == "auto":
    return "per_head" if student_heads == teacher_heads else "relation"
  if mode == "per_head" and student_heads != teacher_heads:
    raise ValueError(f"kt.attention_transfer='per_head' compares attention maps head by head, "
                     f"but the student has {student_heads} heads and the teacher "
                     f"{teacher_heads}: set kt.attention_transfer='relation' (or 'auto')")
  return mode


def resolve_feature_projection(feature_transfer: str, feature_projection: str,
                               student_width: int, teacher_width: int) -> str:
  """'none', 'shared' or 'per_layer'; ValueError when features of different widths would meet
  without a projection."""
  _require_choice(feature_transfer, FEATURE_TRANSFERS, "kt.feature_transfer")
  _require_choice(feature_projection, FEATURE_PROJECTIONS, "kt.feature_projection")
  if feature_transfer == "similarity":
    if feature_projection in ("shared", "per_layer"):
      raise ValueError(f"kt.feature_projection={feature_projection!r} has nothing to project: "
                       "kt.feature_transfer='similarity' is parameter-free; set "
                       "kt.feature_projection='auto' or 'none'")
    return "none"
  if feature_projection == "auto":
    return "shared" if student_width != teacher_width else "none"
  if feature_projection == "none" and student_width != teacher_width:
    raise ValueError(f"kt.feature_projection='none' but the student's feature maps are "
                     f"{student_width} wide and the teacher's {teacher_width}: set "
                     "kt.feature_projection='auto' (or 'shared'/'per_layer'), or "
                     "kt.feature_transfer='similarity'")
  return feature_projection


# ----------------------------------------------------------------------------------------------
# Layer mapping and per-layer transfer terms
# ----------------------------------------------------------------------------------------------

def layer_map(num_student_layers: int, num_teacher_layers: int) -> tuple[int, ...]:
  """Teacher hidden-state index (1-based; 0 is the embedding output) for student layers 1..Ls.

  Identity for equal depths; for a shallower student, layer i -> round(i * Lt / Ls), so the
  last student layer always learns from the last teacher layer. Ties round up, which keeps the
  map strictly increasing.
  """
  for name, value in (("num_student_layers", num_student_layers),
                      ("num_teacher_layers", num_teacher_layers)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if num_student_layers > num_teacher_layers:
    raise ValueError(f"student has more layers ({num_student_layers}) than the teacher "
                     f"({num_teacher_layers}): no layer-to-layer transfer map exists")
  return tuple((2 * i * num_teacher_layers + num_student_layers) // (2 * num_student_layers)
               for i in range(1, num_student_layers + 1))


def _config_value(cfg: Mapping[str, Any] | Any, key: str) -> Any:
  """Reads `key` from a dict or ConfigDict, falling back to the official default."""
  if cfg is None:
    return TRANSFER_DEFAULTS[key]
  getter = getattr(cfg, "get", None)
  if getter is None:
    raise TypeError(f"transfer config must be a dict or ConfigDict, got {type(cfg).__name__}")
  value = getter(key, None)
  return TRANSFER_DEFAULTS[key] if value is None else value


def transfer_option(cfg: Mapping[str, Any] | Any, key: str) -> Any:
  """The value `transfer_losses` uses for a kt config key (its TRANSFER_DEFAULTS when unset)."""
  if key not in TRANSFER_DEFAULTS:
    raise KeyError(f"unknown knowledge-transfer option {key!r}; known: {sorted(TRANSFER_DEFAULTS)}")
  return _config_value(cfg, key)


def default_transfer_config():
  """The `cfg` for `transfer_losses` as a ConfigDict, official TF1 behaviour except §1.2."""
  cfg = ml_collections.ConfigDict()
  for key, value in TRANSFER_DEFAULTS.items():
    if value is None:
      cfg[key] = ml_collections.config_dict.placeholder(int)
    else:
      cfg[key] = value
  return cfg


def _positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def resolve_layer_map(custom: Sequence[int] | None, num_student_layers: int,
                      num_teacher_layers: int | None) -> tuple[int, ...]:
  """Teacher layer (1-based) for each student layer: `custom` (kt.layer_map) when non-empty,
  else the uniform `layer_map`. A custom map may repeat teacher layers, so a student deeper
  than its teacher (MobileBERT's 24 layers from BERT-base's 12) can still learn layer-wise.
  `num_teacher_layers` None skips the range check (the caller checks what ran).
  """
  custom = tuple(custom or ())
  if not custom:
    if num_teacher_layers is not None and num_student_layers > num_teacher_layers:
      repeat = [-(-i * num_teacher_layers // num_student_layers)
                for i in range(1, num_student_layers + 1)]
      raise ValueError(f"the student has more layers ({num_student_layers}) than the teacher "
                       f"({num_teacher_layers}), so the uniform layer map does not exist: set "
                       f"kt.layer_map to one teacher layer per student layer, e.g. {repeat}")
    return layer_map(num_student_layers, num_teacher_layers)
  if len(custom) != num_student_layers:
    raise ValueError(f"kt.layer_map has {len(custom)} entries but the student has "
                     f"{num_student_layers} layers: give one 1-based teacher layer per student "
                     "layer, or leave it empty for the uniform map")
  for i, value in enumerate(custom, start=1):
    if not _positive_int(value) or (num_teacher_layers is not None
                                    and value > num_teacher_layers):
      top = "" if num_teacher_layers is None else f"..{num_teacher_layers}"
      raise ValueError(f"kt.layer_map[{i - 1}] = {value!r} (student layer {i}) is not a teacher "
                       f"layer 1{top}; 0 (the embeddings) cannot be a target")
  return custom


def teacher_depth(mapping: Sequence[int], num_student_layers_run: int | None) -> int | None:
  """Teacher layers to run when the student runs its first `num_student_layers_run` layers
  (None = the whole student, so the whole teacher too)."""
  if num_student_layers_run is None:
    return None
  return max(mapping[:num_student_layers_run])


def _resolve_layer_map(cfg: Any, student_out: Any, teacher_out: Any) -> tuple[int, ...]:
  """Full-depth map from the config; inferred from the outputs only when the config is silent.

  Inference is right when neither model is truncated or both have the same depth; a truncated
  run with different depths must pass num_student_layers / num_teacher_layers.
  """
  num_student = _config_value(cfg, "num_student_layers")
  num_teacher = _config_value(cfg, "num_teacher_layers")
  custom = tuple(_config_value(cfg, "layer_map") or ())
  if (num_student is None) != (num_teacher is None):
    raise ValueError("set both num_student_layers and num_teacher_layers, or neither")
  if num_student is None:
    if custom:
      return resolve_layer_map(custom, len(custom), None)
    num_student = len(student_out.hidden_states) - 1
    num_teacher = len(teacher_out.hidden_states) - 1
  return resolve_layer_map(custom, int(num_student), int(num_teacher))


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
  neither model has to return Q/K/V. See TRANSFER_DEFAULTS for the config keys.
  """
  layers = tuple(layers)
  terms = tuple(terms)
  if not layers:
    raise ValueError("transfer_losses needs at least one student layer")
  if not terms or set(terms) - set(TRANSFER_TERMS):
    raise ValueError(f"terms must be a non-empty subset of {TRANSFER_TERMS}, got {terms}")
  normalize = bool(_config_value(cfg, "normalize_features"))
  feature_over = _config_value(cfg, "feature_over")
  attention_over = _config_value(cfg, "attention_over")
  attention_kind = _config_value(cfg, "attention_kind")
  all_layer_stats = bool(_config_value(cfg, "tf1_all_layer_stats"))
  feature_transfer = _config_value(cfg, "feature_transfer")
  projection_mode = _config_value(cfg, "feature_projection")
  _require_choice(feature_over, AVERAGE_OVER, "feature_over")
  _require_choice(feature_transfer, FEATURE_TRANSFERS, "kt.feature_transfer")
  _require_choice(projection_mode, FEATURE_PROJECTIONS, "kt.feature_projection")
  if feature_transfer == "similarity" and projection is not None:
    raise ValueError("kt.feature_transfer='similarity' is parameter-free: pass projection=None")
  if projection is not None and projection_mode == "none":
    raise ValueError("kt.feature_projection='none' but projection params were passed")
  if feature_over == "real" and attention_mask is None:
    raise ValueError("feature_over='real' needs attention_mask [batch, seq]")
  token_mask = attention_mask if feature_over == "real" else None

  mapping = _resolve_layer_map(cfg, student_out, teacher_out)
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
      attention_mode = resolve_attention_transfer(_config_value(cfg, "attention_transfer"),
                                                  student_heads, teacher_heads)
    if wants_features:
      if feature_transfer == "similarity":
        student_f = student_h
        if "fmt" in terms:
          per_term["fmt"].append(
              similarity_loss(student_h, teacher_h, normalize=normalize, mask=token_mask))
      else:
        student_f = _student_features(student_h, teacher_h, projection, projection_mode, layer)
        if "fmt" in terms:
          per_term["fmt"].append(
              feature_map_loss(student_f, teacher_h, normalize=normalize, mask=token_mask))
      if "mean" in terms or "var" in terms:
        weights = _token_mask(token_mask, student_f, "mean/variance transfer")
        if jnp.shape(student_f)[:2] != jnp.shape(teacher_h)[:2]:
          raise ValueError(f"mean/variance transfer: student [batch, seq] "
                           f"{jnp.shape(student_f)[:2]} != teacher {jnp.shape(teacher_h)[:2]}")
        stats = teacher_stats if teacher_stats is not None else token_moments(teacher_h)
        beta, gamma = _moment_discrepancy(token_moments(student_f), stats, weights)
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
            int(_config_value(cfg, "relation_heads")), jnp.shape(student_qkv[0])[-1],
            jnp.shape(teacher_qkv[0])[-1], student_heads, teacher_heads)
      per_term["at"].append(relation_transfer_loss(
          student_qkv, teacher_qkv, relation_heads, attention_mask=attention_mask,
          over=attention_over))
  return {term: jnp.stack(values) for term, values in per_term.items()}


# ----------------------------------------------------------------------------------------------
# Sparse MLM distillation: the teacher known only by its top-k logits (mbert_jax.teacher_cache)
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
    raise ValueError(f"top-k teacher indices must be integers, got {jnp.asarray(topk_indices).dtype}")
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
  weights = _f32(weights)
  denominator = jnp.sum(weights) + MLM_WEIGHT_EPS
  indices = jnp.asarray(topk_indices).astype(jnp.int32)

  teacher_log_probs = (_teacher_f32(topk_values) / temperature
                       - _teacher_f32(log_normalizer)[..., None])
  teacher_probs = jnp.exp(teacher_log_probs)
  # Rounding of 16-bit values can push the listed mass a hair over 1; the rest is then 0.
  listed_log_mass = jnp.minimum(jax.nn.logsumexp(teacher_log_probs, axis=-1), 0.0)
  teacher_rest = -jnp.expm1(listed_log_mass)

  student_log_probs = jax.nn.log_softmax(_f32(student_logits), axis=-1)
  listed = jnp.put_along_axis(jnp.zeros(jnp.shape(student_logits), jnp.bool_), indices, True,
                              axis=-1, inplace=False)
  student_rest_log, has_rest = _log_mass_outside(student_log_probs, listed)
  student_listed = jnp.take_along_axis(student_log_probs, indices, axis=-1)

  def rest_term(log_q: Array) -> Array:
    return jnp.where(has_rest, _xlogy_where_positive(teacher_rest, log_q), 0.0)

  kd_per_position = -(jnp.sum(_xlogy_where_positive(teacher_probs, student_listed), axis=-1)
                      + rest_term(student_rest_log))
  teacher_entropy = -(jnp.sum(_xlogy_where_positive(teacher_probs, teacher_log_probs), axis=-1)
                      + rest_term(jnp.log(teacher_rest)))
  gt_per_position = -_label_log_prob(student_log_probs, labels)

  return _mixed_mlm_result(weights, denominator, gt_per_position, kd_per_position,
                           teacher_entropy, alpha, jnp.argmax(student_logits, axis=-1), labels,
                           indices[..., 0])
