"""Feature-map transfer, one layer at a time: the student's hidden states against the teacher's.

Three comparisons, all float32 and all with the teacher behind `stop_gradient`:
  feature map transfer (FMT): MSE of the parameter-free-LayerNorm'd maps (official TF1);
  mean/variance transfer: per-token mean and variance over the feature axis;
  similarity transfer: token-by-token similarity matrices, for maps of any two widths.
Maps of different widths can also meet through a learned projection (`project_features`).

Padding: the official TF1 and TF2 codes average every term over all positions, padded ones
included, so that is the default here (`mask=None`); a [B, T] mask averages over real tokens.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from mbert_jax.distill.loss_utils import (Array, f32, require_rank, require_same_shape,
                                          teacher_f32, token_mask, weighted_mean)

# TF1 `tf.contrib.layers.layer_norm` epsilon, used by the parameter-free normalisation of FMT.
LAYER_NORM_EPS = 1e-12


def token_moments(hidden: Array) -> tuple[Array, Array]:
  """Per-token mean and population variance over the feature axis (TF1 `tf.nn.moments`)."""
  hidden = f32(hidden)
  mean = jnp.mean(hidden, axis=-1)
  variance = jnp.mean(jnp.square(hidden - mean[..., None]), axis=-1)
  return mean, variance


def parameter_free_layer_norm(hidden: Array, eps: float = LAYER_NORM_EPS) -> Array:
  """LayerNorm with gamma=1, beta=0 (TF1's `layer_norm` on a fresh scope, eps 1e-12)."""
  mean, variance = token_moments(hidden)
  return (f32(hidden) - mean[..., None]) * jax.lax.rsqrt(variance[..., None] + eps)


def feature_map_loss(student_h: Array, teacher_h: Array, *, normalize: bool = True,
                     mask: Array | None = None) -> Array:
  """Feature-map transfer: mean over B, T, D of (LN0(teacher) - LN0(student))^2.

  `normalize=False` gives the plain MSE of the raw features (the paper's formula). `mask` [B, T]
  (1 = real token) averages over real tokens only; None averages over all positions (official).
  """
  require_rank(student_h, 3, "student hidden states [batch, seq, hidden]")
  require_same_shape(student_h, teacher_h, "feature map transfer")
  token_weights = token_mask(mask, student_h, "feature map transfer")
  if normalize:
    student, teacher = parameter_free_layer_norm(student_h), parameter_free_layer_norm(
        jax.lax.stop_gradient(teacher_h))
  else:
    student, teacher = f32(student_h), teacher_f32(teacher_h)
  per_token = jnp.mean(jnp.square(teacher - student), axis=-1)
  return weighted_mean(per_token, token_weights)


def moment_discrepancy(student_stats: tuple[Array, Array], teacher_stats: tuple[Array, Array],
                       token_weights: Array | None) -> tuple[Array, Array]:
  """beta = mean (mu_t - mu_s)^2, gamma = mean |var_t - var_s|.

  Teacher statistics may carry extra leading axes (one entry per teacher layer); they broadcast
  against the student's [B, T], so the averages also run over those axes (TF1 quirk).
  """
  student_mean, student_var = student_stats
  teacher_mean, teacher_var = (jax.lax.stop_gradient(s) for s in teacher_stats)
  beta_per_token = jnp.square(teacher_mean - student_mean)
  gamma_per_token = jnp.abs(teacher_var - student_var)
  return (weighted_mean(beta_per_token, token_weights),
          weighted_mean(gamma_per_token, token_weights))


def mean_variance_loss(student_h: Array, teacher_h: Array, *,
                       mask: Array | None = None) -> tuple[Array, Array]:
  """Per-layer mean/variance transfer, this project's default: returns (beta, gamma).

  beta = mean over tokens of (mu_teacher - mu_student)^2; gamma = mean of |var_t - var_s|,
  with per-token mean / population variance over the feature axis. Each student layer is
  compared with its own teacher layer (TF1 compares with every teacher output instead:
  `mean_variance_loss_all_teacher_layers`, kt.tf1_all_layer_stats).
  """
  require_rank(student_h, 3, "student hidden states [batch, seq, hidden]")
  require_same_shape(student_h, teacher_h, "mean/variance transfer")
  token_weights = token_mask(mask, student_h, "mean/variance transfer")
  return moment_discrepancy(token_moments(student_h), token_moments(teacher_h), token_weights)


def stacked_token_moments(hidden_states: Sequence[Array] | Array) -> tuple[Array, Array]:
  """Moments of every hidden state, stacked to [L, B, T], without stacking the [B, T, D] inputs."""
  if isinstance(hidden_states, (list, tuple)):
    if not hidden_states:
      raise ValueError("need at least one teacher hidden state")
    moments = [token_moments(h) for h in hidden_states]
    return jnp.stack([m for m, _ in moments]), jnp.stack([v for _, v in moments])
  require_rank(hidden_states, 4, "stacked teacher hidden states [layers, batch, seq, hidden]")
  return token_moments(hidden_states)


def mean_variance_loss_all_teacher_layers(
    student_h: Array, teacher_hidden_states: Sequence[Array] | Array, *,
    mask: Array | None = None) -> tuple[Array, Array]:
  """TF1's mean/variance transfer (a quirk of the official code): teacher statistics come from
  ALL teacher outputs (embedding output included, stacked [Lt+1, B, T, D] or given as a
  sequence) and are broadcast against the student layer's, so beta/gamma average the
  discrepancy over every teacher output instead of comparing with the matching layer.
  """
  require_rank(student_h, 3, "student hidden states [batch, seq, hidden]")
  teacher_stats = stacked_token_moments(teacher_hidden_states)
  if teacher_stats[0].shape[1:] != jnp.shape(student_h)[:2]:
    raise ValueError(f"mean/variance transfer: teacher [batch, seq] {teacher_stats[0].shape[1:]}"
                     f" != student {jnp.shape(student_h)[:2]}")
  token_weights = token_mask(mask, student_h, "mean/variance transfer")
  return moment_discrepancy(token_moments(student_h), teacher_stats, token_weights)


# ----------------------------------------------------------------------------------------------
# Feature maps of different widths
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
  return jnp.dot(f32(hidden), f32(kernel)) + f32(bias)


def token_similarity(hidden: Array, *, normalize: bool = True) -> Array:
  """[B, T, T] cosine similarities between the tokens of one feature map (float32).

  With `normalize`, each token is first LN0-standardised (centred), so a large offset shared by
  every feature (common in NoNorm MobileBERT) does not make all tokens look alike.
  """
  x = parameter_free_layer_norm(hidden) if normalize else f32(hidden)
  x = x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + LAYER_NORM_EPS)
  return jnp.einsum("btd,bsd->bts", x, x)


def similarity_loss(student_h: Array, teacher_h: Array, *, normalize: bool = True,
                    mask: Array | None = None) -> Array:
  """Parameter-free feature transfer between any two widths: mean squared difference of the
  token-similarity matrices. `mask` [B, T] restricts the average to pairs of real tokens.
  """
  require_rank(student_h, 3, "student hidden states [batch, seq, hidden]")
  require_rank(teacher_h, 3, "teacher hidden states [batch, seq, hidden]")
  if jnp.shape(student_h)[:2] != jnp.shape(teacher_h)[:2]:
    raise ValueError(f"similarity transfer: student [batch, seq] {jnp.shape(student_h)[:2]} != "
                     f"teacher {jnp.shape(teacher_h)[:2]}")
  token_weights = token_mask(mask, student_h, "similarity transfer")
  pair_weights = None
  if token_weights is not None:
    pair_weights = token_weights[:, :, None] * token_weights[:, None, :]
  student = token_similarity(student_h, normalize=normalize)
  teacher = token_similarity(jax.lax.stop_gradient(teacher_h), normalize=normalize)
  return weighted_mean(jnp.square(teacher - student), pair_weights)
