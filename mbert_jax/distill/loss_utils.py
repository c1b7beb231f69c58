"""What every loss module shares: float32 casts, the teacher's stop-gradient, masked means and
the shape checks that turn a wrong input into a message instead of a broadcast.

Losses run in float32 whatever the input dtype: MobileBERT's NoNorm feature maps reach
1e7-1e8, and bf16 squares of those lose all precision.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

# What a knowledge-transfer average runs over: every position, or real (unpadded) tokens only.
AVERAGE_OVER = ("all", "real")


def f32(x: Array) -> Array:
  return jnp.asarray(x, jnp.float32)


def teacher_f32(x: Array) -> Array:
  """A teacher input in float32, cut from the gradient so the teacher never moves."""
  return jax.lax.stop_gradient(f32(x))


def require_same_shape(student: Array, teacher: Array, what: str) -> None:
  if jnp.shape(student) != jnp.shape(teacher):
    raise ValueError(f"{what}: student shape {jnp.shape(student)} != teacher shape "
                     f"{jnp.shape(teacher)}")


def require_rank(x: Array, rank: int, what: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f"{what} must have rank {rank}, got shape {jnp.shape(x)}")


def require_choice(value: str, choices: Sequence[str], what: str) -> None:
  if value not in choices:
    raise ValueError(f"{what} must be one of {tuple(choices)}, got {value!r}")


def safe_divide(numerator: Array, denominator: Array) -> Array:
  """numerator / denominator, 0 where the denominator is 0 (an all-padding batch has no tokens)."""
  safe = jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(denominator > 0, numerator / safe, 0.0)


def weighted_mean(values: Array, weights: Array | None) -> Array:
  """Mean of `values`; with `weights` (broadcastable to values) a weighted mean."""
  if weights is None:
    return jnp.mean(values)
  weights = jnp.broadcast_to(f32(weights), values.shape)
  return safe_divide(jnp.sum(values * weights), jnp.sum(weights))


def token_mask(mask: Array | None, hidden: Array, what: str) -> Array | None:
  """Checks a [B, T] token mask against hidden states [..., B, T, D]; float32 or None."""
  if mask is None:
    return None
  if jnp.shape(mask) != jnp.shape(hidden)[-3:-1]:
    raise ValueError(f"{what}: mask shape {jnp.shape(mask)} does not match the [batch, seq] "
                     f"axes {jnp.shape(hidden)[-3:-1]} of the hidden states")
  return f32(mask)


def xlogy_where_positive(p: Array, log_q: Array) -> Array:
  """p * log_q with 0 wherever p == 0.

  Masked keys carry probability 0 and a huge negative log-probability; the product is 0
  mathematically but would be NaN if a mask ever produced -inf. Selecting 0 also keeps the
  gradient finite, as the unselected branch's cotangent is 0.
  """
  return jnp.where(p > 0, p * log_q, 0.0)
