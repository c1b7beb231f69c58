"""Attention transfer, one layer at a time, in the two forms a teacher's shape allows.

  per head: the student's attention distributions against the teacher's, head by head
    (MobileBERT's AT; needs equal head counts);
  relation: MiniLMv2's self-relations softmax(A A^T / sqrt(d)) of the queries, keys and values,
    split into relation heads of their own, so any two widths and head counts can meet.

Both are float32 and keep the teacher behind `stop_gradient`. Which one a run uses, and with
how many relation heads, is decided in `transfer_options`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from mbert_jax.distill.loss_utils import (AVERAGE_OVER, Array, f32, require_choice, require_rank,
                                          require_same_shape, teacher_f32, token_mask,
                                          weighted_mean, xlogy_where_positive)

ATTENTION_KINDS = ("ce", "kl")
# Teacher scores at or below this are masked keys: half float32's minimum, far below any real
# score and above the minimum itself plus any score it was added to.
MASKED_SCORE = float(jnp.finfo(jnp.float32).min) / 2


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
  Masked keys: a teacher score at or below MASKED_SCORE (the pre-norm teachers' float32-minimum
  mask, on padding and outside a local layer's window) is probability 0, whatever the student
  puts there, and 0 * log(tiny) terms are forced to 0 so even -inf would not produce NaN. A
  query row whose every key is masked (a padded query of a local layer, whose window holds only
  padding) carries no distribution: it is left out of the average, in both `over` modes.
  """
  require_choice(over, AVERAGE_OVER, "attention loss 'over'")
  require_choice(kind, ATTENTION_KINDS, "attention loss 'kind'")
  require_rank(student_scores, 4, "student attention scores [batch, heads, queries, keys]")
  require_same_shape(student_scores, teacher_scores, "attention transfer (heads must match)")
  row_weights = None
  if over == "real":
    if attention_mask is None:
      raise ValueError("attention loss over='real' needs attention_mask [batch, seq]")
    batch, _, queries, _ = jnp.shape(student_scores)
    if jnp.shape(attention_mask) != (batch, queries):
      raise ValueError(f"attention_mask shape {jnp.shape(attention_mask)} != [batch, queries] "
                       f"{(batch, queries)}")
    row_weights = f32(attention_mask)[:, None, :]

  teacher = teacher_f32(teacher_scores)
  visible = teacher > MASKED_SCORE
  has_keys = jnp.any(visible, axis=-1)
  row_weights = has_keys.astype(jnp.float32) * (1.0 if row_weights is None else row_weights)
  # Rows without a visible key get a dummy finite row (their weight is 0).
  teacher = jnp.where(visible | ~has_keys[..., None], teacher, -jnp.inf)
  student_log_probs = jax.nn.log_softmax(f32(student_scores), axis=-1)
  teacher_log_probs = jax.nn.log_softmax(teacher, axis=-1)
  teacher_probs = jnp.where(visible, jnp.exp(teacher_log_probs), 0.0)
  per_row = -jnp.sum(xlogy_where_positive(teacher_probs, student_log_probs), axis=-1)
  if kind == "kl":
    per_row = per_row + jnp.sum(xlogy_where_positive(teacher_probs, teacher_log_probs), axis=-1)
  return weighted_mean(per_row, row_weights)


def _relation_log_probs(x: Array, num_heads: int, key_mask: Array | None) -> Array:
  """log softmax(A A^T / sqrt(d)) per relation head: x [B, T, W] -> [B, R, T, T], float32."""
  batch, seq, width = jnp.shape(x)
  d = width // num_heads
  heads = f32(x).reshape(batch, seq, num_heads, d)
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
  require_choice(over, AVERAGE_OVER, "relation loss 'over'")
  require_rank(student_x, 3, "student Q/K/V [batch, seq, width]")
  require_rank(teacher_x, 3, "teacher Q/K/V [batch, seq, width]")
  if jnp.shape(student_x)[:2] != jnp.shape(teacher_x)[:2]:
    raise ValueError(f"relation transfer: student [batch, seq] {jnp.shape(student_x)[:2]} != "
                     f"teacher {jnp.shape(teacher_x)[:2]}")
  for who, x in (("student", student_x), ("teacher", teacher_x)):
    if jnp.shape(x)[-1] % num_heads:
      raise ValueError(f"relation transfer: {num_heads} relation heads do not divide the {who}'s "
                       f"width {jnp.shape(x)[-1]}")
  key_mask = None
  if attention_mask is not None:
    key_mask = token_mask(attention_mask, student_x, "relation transfer")
  if over == "real" and key_mask is None:
    raise ValueError("relation loss over='real' needs attention_mask [batch, seq]")
  student = _relation_log_probs(student_x, num_heads, key_mask)
  teacher = jax.lax.stop_gradient(_relation_log_probs(teacher_x, num_heads, key_mask))
  teacher_probs = jnp.exp(teacher)
  per_row = jnp.sum(xlogy_where_positive(teacher_probs, teacher)
                    - xlogy_where_positive(teacher_probs, student), axis=-1)
  row_weights = key_mask[:, None, :] if over == "real" else None
  return weighted_mean(per_row, row_weights)


def relation_transfer_loss(student_qkv: Sequence[Array], teacher_qkv: Sequence[Array],
                           num_heads: int, *, attention_mask: Array | None = None,
                           over: str = "all") -> Array:
  """Sum of the query-query, key-key and value-value relation losses (MiniLMv2's objective)."""
  if len(student_qkv) != 3 or len(teacher_qkv) != 3:
    raise ValueError("relation transfer needs (queries, keys, values) from both models")
  return sum(relation_loss(s, t, num_heads, attention_mask=attention_mask, over=over)
             for s, t in zip(student_qkv, teacher_qkv))
