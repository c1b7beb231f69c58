"""The sparse (top-k) MLM distillation loss against a float64 numpy reference, and its k = V
identity with the online `distillation_mlm_loss` (value and gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbert_jax.distill import losses

B, P, V = 3, 4, 37


def teacher_topk(teacher_logits: np.ndarray, k: int, temperature: float):
  """What the cache stores, in float64: top-k logits minus the top-1, ids, log-normaliser."""
  order = np.argsort(-teacher_logits, axis=-1, kind="stable")[..., :k]
  top = np.take_along_axis(teacher_logits, order, axis=-1)
  values = top - top[..., :1]
  shifted = (teacher_logits - top[..., :1]) / temperature
  normalizer = np.log(np.exp(shifted).sum(-1))
  return values, order, normalizer


# ----------------------------------------------------------------------------------------------
# numpy reference, one position at a time, written from the docstring's definition
# ----------------------------------------------------------------------------------------------

def np_sparse_kd(student, values, indices, normalizer, labels, weights, temperature, alpha):
  """(loss, kd_ce, kd_kl, ground-truth CE, d loss / d student logits), float64."""
  student = np.asarray(student, np.float64)
  grad = np.zeros_like(student)
  kd_total = kl_total = gt_total = 0.0
  denominator = float(np.sum(weights)) + 1e-5
  for b in range(student.shape[0]):
    for p in range(student.shape[1]):
      s = student[b, p] - student[b, p].max()
      q = np.exp(s) / np.exp(s).sum()
      ids = indices[b, p].astype(np.int64)
      t = np.exp(np.asarray(values[b, p], np.float64) / temperature - normalizer[b, p])
      rest = max(1.0 - t.sum(), 0.0)
      unlisted = np.ones(len(q), bool)
      unlisted[ids] = False
      q_rest = q[unlisted].sum()
      ce = -(t * np.log(q[ids])).sum()
      entropy = -(t * np.log(t)).sum()
      target = np.zeros_like(q)
      target[ids] = t
      if unlisted.any() and rest > 0:
        ce -= rest * np.log(q_rest)
        entropy -= rest * np.log(rest)
        target[unlisted] = rest * q[unlisted] / q_rest
      w = float(weights[b, p])
      kd_total += w * ce
      kl_total += w * (ce - entropy)
      gt_total += w * -np.log(q[labels[b, p]])
      onehot = np.eye(len(q))[labels[b, p]]
      grad[b, p] = w * (alpha * (q - onehot) + (1 - alpha) * (q - target)) / denominator
  kd, kl, gt = kd_total / denominator, kl_total / denominator, gt_total / denominator
  return alpha * gt + (1 - alpha) * kd, kd, kl, gt, grad


def _inputs(seed: int):
  rng = np.random.default_rng(seed)
  student = rng.normal(0, 2, (B, P, V)).astype(np.float32)
  teacher = rng.normal(0, 3, (B, P, V)).astype(np.float32)
  labels = rng.integers(0, V, (B, P)).astype(np.int32)
  weights = (rng.random((B, P)) > 0.25).astype(np.float32)
  weights[0, 0] = 1.0
  return student, teacher, labels, weights


def _jax_sparse(student, values, indices, normalizer, labels, weights, temperature, alpha):
  def loss_fn(logits):
    return losses.sparse_kd_loss(logits, jnp.asarray(values, jnp.float32), jnp.asarray(indices),
                                 jnp.asarray(normalizer, jnp.float32), labels, weights,
                                 temperature=temperature, alpha=alpha)
  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(student))
  return loss, metrics, grad


@pytest.mark.parametrize("k", [1, 5, V - 1])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.0, 0.5), (0.5, 0.0)])
def test_matches_numpy_reference(k, temperature, alpha):
  student, teacher, labels, weights = _inputs(k)
  values, indices, normalizer = teacher_topk(teacher.astype(np.float64), k, temperature)
  loss, metrics, grad = _jax_sparse(student, values, indices, normalizer, labels, weights,
                                    temperature, alpha)
  ref_loss, ref_kd, ref_kl, ref_gt, ref_grad = np_sparse_kd(
      student, values, indices, normalizer, labels, weights, temperature, alpha)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  np.testing.assert_allclose(metrics["kd_ce"], ref_kd, rtol=2e-5)
  np.testing.assert_allclose(metrics["kd_kl"], ref_kl, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["ground_truth_ce"], ref_gt, rtol=2e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (1.0, 0.5), (2.0, 0.0), (0.7, 0.3)])
def test_k_equal_vocab_is_the_online_loss(temperature, alpha):
  """k = V: value, every metric and the gradient equal `distillation_mlm_loss`'s."""
  student, teacher, labels, weights = _inputs(7)
  values, indices, normalizer = teacher_topk(teacher.astype(np.float64), V, temperature)
  loss, metrics, grad = _jax_sparse(student, values, indices, normalizer, labels, weights,
                                    temperature, alpha)

  def online(logits):
    return losses.distillation_mlm_loss(logits, jnp.asarray(teacher), labels, weights,
                                        alpha=alpha, temperature=temperature)
  (ref_loss, ref_metrics), ref_grad = jax.value_and_grad(online, has_aux=True)(
      jnp.asarray(student))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for name in ("ground_truth_ce", "kd_ce", "kd_kl", "accuracy", "agreement"):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_kl_is_zero_when_student_matches_teacher_and_positive_otherwise():
  _, teacher, labels, weights = _inputs(3)
  values, indices, normalizer = teacher_topk(teacher.astype(np.float64), 4, 1.0)
  _, same, _ = _jax_sparse(teacher, values, indices, normalizer, labels, weights, 1.0, 0.0)
  other = teacher + np.random.default_rng(0).normal(0, 1, teacher.shape).astype(np.float32)
  _, different, _ = _jax_sparse(other, values, indices, normalizer, labels, weights, 1.0, 0.0)
  assert abs(float(same["kd_kl"])) < 1e-5
  assert float(different["kd_kl"]) > 1e-2
  assert float(same["agreement"]) == 1.0


def test_sixteen_bit_storage_stays_close_to_float32():
  """The cache's dtypes (float16 values, uint8/uint16 ids) change the loss by rounding only."""
  student, teacher, labels, weights = _inputs(11)
  values, indices, normalizer = teacher_topk(teacher.astype(np.float64), 8, 1.0)
  exact = losses.sparse_kd_loss(student, values.astype(np.float32), indices.astype(np.int32),
                                normalizer.astype(np.float32), labels, weights)[0]
  for index_dtype in (np.uint8, np.uint16):
    stored = losses.sparse_kd_loss(student, values.astype(np.float16),
                                   indices.astype(index_dtype), normalizer.astype(np.float32),
                                   labels, weights)[0]
    np.testing.assert_allclose(stored, exact, rtol=2e-3)


def test_shape_errors_name_the_input():
  student, teacher, labels, weights = _inputs(0)
  values, indices, normalizer = teacher_topk(teacher.astype(np.float64), 4, 1.0)
  with pytest.raises(ValueError, match="indices shape"):
    losses.sparse_kd_loss(student, values, indices[..., :3], normalizer, labels, weights)
  with pytest.raises(ValueError, match="log-normaliser"):
    losses.sparse_kd_loss(student, values, indices, normalizer[:, :2], labels, weights)
  with pytest.raises(ValueError, match="must be integers"):
    losses.sparse_kd_loss(student, values, indices.astype(np.float32), normalizer, labels,
                          weights)
  with pytest.raises(ValueError, match="temperature"):
    losses.sparse_kd_loss(student, values, indices, normalizer, labels, weights, temperature=0)
