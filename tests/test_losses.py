"""Losses against independent numpy references, plus the properties KT relies on."""

from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbert_jax.distill import attention_losses, feature_losses, losses, transfer_options

NEG = float(np.finfo(np.float32).min)
Outputs = namedtuple("Outputs", ["hidden_states", "attention_scores"])


# ----------------------------------------------------------------------------------------------
# numpy references, written from the formulas in the docstrings, one position / row at a time
# ----------------------------------------------------------------------------------------------

def np_log_softmax(row):
  row = np.asarray(row, np.float64)
  shifted = row - row.max()
  return shifted - np.log(np.exp(shifted).sum())


def np_mlm(logits, labels, weights):
  total, correct, weight_sum = 0.0, 0.0, 0.0
  for b in range(labels.shape[0]):
    for p in range(labels.shape[1]):
      w = float(weights[b, p])
      total += -w * np_log_softmax(logits[b, p])[labels[b, p]]
      correct += w * float(np.argmax(logits[b, p]) == labels[b, p])
      weight_sum += w
  return total / (weight_sum + 1e-5), correct / weight_sum


def np_nsp(logits, labels):
  losses_ = [-np_log_softmax(logits[b])[labels[b]] for b in range(len(labels))]
  accuracy = np.mean([np.argmax(logits[b]) == labels[b] for b in range(len(labels))])
  return np.mean(losses_), accuracy


def np_ln0(vector):
  vector = np.asarray(vector, np.float64)
  mean = vector.sum() / vector.size
  var = ((vector - mean) ** 2).sum() / vector.size
  return (vector - mean) / np.sqrt(var + 1e-12)


def np_token_weights(mask, batch, seq):
  return np.ones((batch, seq)) if mask is None else np.asarray(mask, np.float64)


def np_fmt(student, teacher, normalize, mask=None):
  batch, seq, _ = student.shape
  weights = np_token_weights(mask, batch, seq)
  total = 0.0
  for b in range(batch):
    for t in range(seq):
      s, te = (np_ln0(student[b, t]), np_ln0(teacher[b, t])) if normalize else (
          np.float64(student[b, t]), np.float64(teacher[b, t]))
      total += weights[b, t] * np.mean((te - s) ** 2)
  return total / weights.sum()


def np_moments(vector):
  vector = np.asarray(vector, np.float64)
  mean = vector.mean()
  return mean, np.mean((vector - mean) ** 2)


def np_mean_var(student, teacher_layers, mask=None):
  """teacher_layers: list of [B, T, D]; the per-layer loss is the one-element case."""
  batch, seq, _ = student.shape
  weights = np_token_weights(mask, batch, seq)
  beta = gamma = 0.0
  for teacher in teacher_layers:
    for b in range(batch):
      for t in range(seq):
        ms, vs = np_moments(student[b, t])
        mt, vt = np_moments(teacher[b, t])
        beta += weights[b, t] * (mt - ms) ** 2
        gamma += weights[b, t] * abs(vt - vs)
  denominator = weights.sum() * len(teacher_layers)
  return beta / denominator, gamma / denominator


def np_attention(student, teacher, mask=None, over="all", kind="ce"):
  batch, heads, queries, _ = student.shape
  total, count = 0.0, 0.0
  for b in range(batch):
    for n in range(heads):
      for f in range(queries):
        if over == "real" and mask[b, f] == 0:
          continue
        log_q = np_log_softmax(student[b, n, f])
        log_p = np_log_softmax(teacher[b, n, f])
        p = np.exp(log_p)
        row = -sum(p[k] * log_q[k] for k in range(len(p)) if p[k] > 0)
        if kind == "kl":
          row += sum(p[k] * log_p[k] for k in range(len(p)) if p[k] > 0)
        total += row
        count += 1
  return total / count


def np_distill(student, teacher, labels, weights, alpha, temperature):
  batch, preds, vocab = student.shape
  total = gt = kd = agree = 0.0
  for b in range(batch):
    for p in range(preds):
      log_q = np_log_softmax(student[b, p])
      soft = np.exp(np_log_softmax(np.float64(teacher[b, p]) / temperature))
      target = (1 - alpha) * soft
      target[labels[b, p]] += alpha
      w = float(weights[b, p])
      total += -w * (target * log_q).sum()
      gt += -w * log_q[labels[b, p]]
      kd += -w * (soft * log_q).sum()
      agree += w * float(np.argmax(student[b, p]) == np.argmax(teacher[b, p]))
  denominator = weights.sum() + 1e-5
  return total / denominator, gt / denominator, kd / denominator, agree / weights.sum()


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------

B, T, D, N, P, V = 2, 5, 8, 2, 3, 11
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)


def rng(seed=0):
  return np.random.default_rng(seed)


def hidden(seed, scale=3.0, shift=1.0):
  r = rng(seed)
  return (shift * r.normal(size=(B, T, 1)) + scale * r.normal(size=(B, T, D))).astype(np.float32)


def masked_scores(seed, mask=MASK, neg=NEG):
  """Pre-softmax scores with the large-negative key mask the models produce."""
  scores = 2.0 * rng(seed).normal(size=(B, N, T, T)).astype(np.float32)
  key_is_real = mask[:, None, None, :].astype(bool)
  if np.isinf(neg):
    return np.where(key_is_real, scores, np.float32(neg))
  return scores + (1.0 - key_is_real.astype(np.float32)) * np.float32(neg)


def mlm_batch(seed):
  r = rng(seed)
  logits = 2.0 * r.normal(size=(B, P, V)).astype(np.float32)
  labels = r.integers(0, V, size=(B, P)).astype(np.int32)
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  return logits, labels, weights


def close(actual, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# pre-training losses
# ----------------------------------------------------------------------------------------------

def test_mlm_loss_matches_numpy():
  logits, labels, weights = mlm_batch(1)
  labels[0, 0] = int(np.argmax(logits[0, 0]))  # at least one correct prediction
  loss, accuracy = losses.mlm_loss(logits, labels, weights)
  ref_loss, ref_accuracy = np_mlm(logits, labels, weights)
  close(loss, ref_loss)
  close(accuracy, ref_accuracy)
  assert loss.dtype == jnp.float32


def test_mlm_loss_ignores_zero_weight_slots():
  logits, labels, weights = mlm_batch(2)
  changed = logits.copy()
  changed[weights == 0] += 50.0
  close(losses.mlm_loss(changed, labels, weights)[0], float(losses.mlm_loss(logits, labels,
                                                                            weights)[0]))


def test_nsp_loss_matches_numpy():
  logits = rng(3).normal(size=(4, 2)).astype(np.float32)
  labels = np.array([0, 1, 1, 0], np.int32)
  loss, accuracy = losses.nsp_loss(logits, labels)
  ref_loss, ref_accuracy = np_nsp(logits, labels)
  close(loss, ref_loss)
  close(accuracy, ref_accuracy)


def test_mlm_and_nsp_reject_mismatched_shapes():
  logits, labels, weights = mlm_batch(1)
  with pytest.raises(ValueError, match="labels shape"):
    losses.mlm_loss(logits, labels[:, :2], weights)
  with pytest.raises(ValueError, match="weights shape"):
    losses.mlm_loss(logits, labels, weights[:, :2])
  with pytest.raises(ValueError, match="NSP labels"):
    losses.nsp_loss(np.zeros((4, 2)), np.zeros((3,), np.int32))


@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.2, 2.0), (1.0, 1.0), (0.0, 0.5)])
def test_distillation_mlm_loss_matches_numpy(alpha, temperature):
  student, labels, weights = mlm_batch(4)
  teacher = 3.0 * rng(5).normal(size=student.shape).astype(np.float32)
  student[0, 1] = teacher[0, 1]  # one position where the two agree
  loss, metrics = losses.distillation_mlm_loss(student, teacher, labels, weights, alpha=alpha,
                                               temperature=temperature)
  ref_loss, ref_gt, ref_kd, ref_agree = np_distill(student, teacher, labels, weights, alpha,
                                                   temperature)
  close(loss, ref_loss)
  close(metrics["ground_truth_ce"], ref_gt)
  close(metrics["kd_ce"], ref_kd)
  close(metrics["agreement"], ref_agree)
  close(loss, alpha * float(metrics["ground_truth_ce"]) + (1 - alpha) * float(metrics["kd_ce"]))
  close(metrics["accuracy"], np_mlm(student, labels, weights)[1])


def test_distillation_kl_is_zero_when_student_equals_teacher():
  logits, labels, weights = mlm_batch(6)
  _, metrics = losses.distillation_mlm_loss(logits, logits, labels, weights)
  close(metrics["kd_kl"], 0.0, atol=1e-5)
  close(metrics["agreement"], 1.0)
  assert float(metrics["kd_ce"]) > 0.1  # the CE keeps the teacher's entropy


def test_distillation_rejects_bad_alpha_and_temperature():
  logits, labels, weights = mlm_batch(6)
  with pytest.raises(ValueError, match="alpha"):
    losses.distillation_mlm_loss(logits, logits, labels, weights, alpha=1.5)
  with pytest.raises(ValueError, match="temperature"):
    losses.distillation_mlm_loss(logits, logits, labels, weights, temperature=0.0)
  with pytest.raises(ValueError, match="student shape"):
    losses.distillation_mlm_loss(logits, logits[..., :5], labels, weights)


# ----------------------------------------------------------------------------------------------
# knowledge-transfer losses
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mask", [None, MASK])
def test_feature_map_loss_matches_numpy(normalize, mask):
  student, teacher = hidden(10), hidden(11, scale=7.0, shift=4.0)
  actual = feature_losses.feature_map_loss(student, teacher, normalize=normalize, mask=mask)
  close(actual, np_fmt(student, teacher, normalize, mask), rtol=1e-5)


def test_feature_map_loss_is_scale_invariant_when_normalized():
  student, teacher = hidden(12), hidden(13)
  base = float(feature_losses.feature_map_loss(student, teacher))
  close(feature_losses.feature_map_loss(student, 1e6 * teacher + 5.0), base, rtol=1e-4)


@pytest.mark.parametrize("mask", [None, MASK])
def test_mean_variance_loss_matches_numpy(mask):
  student, teacher = hidden(14), hidden(15, scale=5.0, shift=2.0)
  beta, gamma = feature_losses.mean_variance_loss(student, teacher, mask=mask)
  ref_beta, ref_gamma = np_mean_var(student, [teacher], mask)
  close(beta, ref_beta)
  close(gamma, ref_gamma)


@pytest.mark.parametrize("mask", [None, MASK])
def test_mean_variance_all_teacher_layers_matches_numpy(mask):
  student = hidden(16)
  teacher_layers = [hidden(17 + i, scale=1.0 + i, shift=float(i)) for i in range(4)]
  ref_beta, ref_gamma = np_mean_var(student, teacher_layers, mask)
  for given in (teacher_layers, np.stack(teacher_layers)):
    beta, gamma = feature_losses.mean_variance_loss_all_teacher_layers(student, given, mask=mask)
    close(beta, ref_beta)
    close(gamma, ref_gamma)


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("over", ["all", "real"])
def test_attention_loss_matches_numpy(kind, over):
  student, teacher = masked_scores(20), masked_scores(21)
  actual = attention_losses.attention_loss(student, teacher, attention_mask=MASK, over=over,
                                           kind=kind)
  close(actual, np_attention(student, teacher, MASK, over, kind), rtol=1e-5)


def test_attention_over_real_ignores_padded_query_rows():
  student, teacher = masked_scores(22), masked_scores(23)
  base = float(attention_losses.attention_loss(student, teacher, attention_mask=MASK, over="real"))
  changed = student.copy()
  changed[1, :, 3:, 0] += 10.0  # query rows 3, 4 of example 1 are padding
  close(attention_losses.attention_loss(changed, teacher, attention_mask=MASK, over="real"), base)
  assert abs(float(attention_losses.attention_loss(changed, teacher, attention_mask=MASK)) - float(
      attention_losses.attention_loss(student, teacher, attention_mask=MASK))) > 1e-3


@pytest.mark.parametrize("neg", [NEG, -10000.0])
def test_attention_loss_and_grad_are_finite_with_large_negative_masks(neg):
  mask = MASK.copy()
  mask[1] = 0  # a fully padded example: every key masked
  student, teacher = masked_scores(24, mask, neg), masked_scores(25, mask, neg)
  for kind in ("ce", "kl"):
    value, grad = jax.value_and_grad(
        lambda s: attention_losses.attention_loss(s, teacher, attention_mask=mask, kind=kind)
    )(student)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_attention_loss_stays_finite_if_a_mask_used_minus_inf():
  student, teacher = masked_scores(26, neg=-np.inf), masked_scores(27, neg=-np.inf)
  value, grad = jax.value_and_grad(lambda s: attention_losses.attention_loss(s, teacher))(student)
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(np.asarray(grad)))
  close(value, np_attention(masked_scores(26), masked_scores(27)), rtol=1e-5)


def test_transfer_terms_vanish_when_student_equals_teacher():
  h, scores = hidden(30), masked_scores(31)
  close(feature_losses.feature_map_loss(h, h), 0.0)
  close(feature_losses.feature_map_loss(h, h, normalize=False), 0.0)
  close(feature_losses.mean_variance_loss(h, h), [0.0, 0.0])
  close(feature_losses.mean_variance_loss(h, h, mask=MASK), [0.0, 0.0])
  close(attention_losses.attention_loss(scores, scores, kind="kl"), 0.0, atol=1e-5)
  # The official CE keeps the teacher's entropy, which is positive.
  assert float(attention_losses.attention_loss(scores, scores, kind="ce")) > 0.1


def test_gradients_reach_only_the_student():
  s_h, t_h = hidden(32), hidden(33)
  s_a, t_a = masked_scores(34), masked_scores(35)
  logits, labels, weights = mlm_batch(36)
  teacher_logits = rng(37).normal(size=logits.shape).astype(np.float32)
  cases = {
      "fmt": (lambda s, t: feature_losses.feature_map_loss(s, t), s_h, t_h),
      "mse": (lambda s, t: feature_losses.feature_map_loss(s, t, normalize=False), s_h, t_h),
      "mean_var": (lambda s, t: sum(feature_losses.mean_variance_loss(s, t)), s_h, t_h),
      "mean_var_tf1": (lambda s, t: sum(feature_losses.mean_variance_loss_all_teacher_layers(
          s, jnp.stack([t, 2 * t]))), s_h, t_h),
      "at": (lambda s, t: attention_losses.attention_loss(s, t, kind="kl"), s_a, t_a),
      "kd": (lambda s, t: losses.distillation_mlm_loss(s, t, labels, weights)[0], logits,
             teacher_logits),
  }
  for name, (fn, student, teacher) in cases.items():
    grad_s, grad_t = jax.grad(fn, argnums=(0, 1))(student, teacher)
    assert np.abs(np.asarray(grad_s)).max() > 0, name
    assert np.abs(np.asarray(grad_t)).max() == 0, name


def test_losses_compute_in_float32_for_bfloat16_inputs():
  s, t = jnp.asarray(hidden(40), jnp.bfloat16), jnp.asarray(hidden(41), jnp.bfloat16)
  value = feature_losses.feature_map_loss(s, t)
  assert value.dtype == jnp.float32
  close(value, np_fmt(np.asarray(s, np.float32), np.asarray(t, np.float32), True), rtol=1e-5)


def test_kt_losses_reject_bad_arguments():
  h, scores = hidden(42), masked_scores(43)
  with pytest.raises(ValueError, match="student shape"):
    feature_losses.feature_map_loss(h, h[..., :4])
  with pytest.raises(ValueError, match="mask shape"):
    feature_losses.feature_map_loss(h, h, mask=MASK[:, :3])
  with pytest.raises(ValueError, match="heads must match"):
    attention_losses.attention_loss(scores, scores[:, :1])
  with pytest.raises(ValueError, match="over='real' needs attention_mask"):
    attention_losses.attention_loss(scores, scores, over="real")
  with pytest.raises(ValueError, match="'over' must be one of"):
    attention_losses.attention_loss(scores, scores, over="some")
  with pytest.raises(ValueError, match="'kind' must be one of"):
    attention_losses.attention_loss(scores, scores, kind="mse")


# ----------------------------------------------------------------------------------------------
# layer map and per-layer transfer terms
# ----------------------------------------------------------------------------------------------

def test_layer_map():
  assert transfer_options.layer_map(4, 4) == (1, 2, 3, 4)
  assert transfer_options.layer_map(12, 24) == tuple(range(2, 25, 2))
  assert transfer_options.layer_map(5, 8) == (2, 3, 5, 6, 8)
  assert transfer_options.layer_map(4, 6) == (2, 3, 5, 6)  # 1.5 and 4.5 round up
  assert transfer_options.layer_map(3, 7)[-1] == 7
  with pytest.raises(ValueError, match="more layers"):
    transfer_options.layer_map(6, 4)
  with pytest.raises(ValueError, match="positive int"):
    transfer_options.layer_map(0, 4)


def fake_outputs(seed, depth):
  return Outputs(tuple(hidden(seed + i, scale=1.0 + i) for i in range(depth + 1)),
                 tuple(masked_scores(seed + 100 + i) for i in range(depth)))


def test_transfer_losses_match_single_layer_losses_through_the_layer_map():
  student, teacher = fake_outputs(50, 2), fake_outputs(60, 4)
  terms = losses.transfer_losses(student, teacher, MASK, {}, layers=(2, 1))
  assert set(terms) == {"fmt", "at", "mean", "var"}
  for position, (s_layer, t_layer) in enumerate([(2, 4), (1, 2)]):
    s_h, t_h = student.hidden_states[s_layer], teacher.hidden_states[t_layer]
    close(terms["fmt"][position], np_fmt(s_h, t_h, True), rtol=1e-5)
    close(terms["at"][position], np_attention(student.attention_scores[s_layer - 1],
                                              teacher.attention_scores[t_layer - 1]), rtol=1e-5)
    beta, gamma = np_mean_var(s_h, [t_h])
    close(terms["mean"][position], beta)
    close(terms["var"][position], gamma)


def test_transfer_losses_options_padding_and_tf1_statistics():
  student, teacher = fake_outputs(70, 3), fake_outputs(80, 3)
  cfg = transfer_options.default_transfer_config()
  cfg.normalize_features = False
  cfg.feature_over = "real"
  cfg.attention_over = "real"
  cfg.attention_kind = "kl"
  cfg.tf1_all_layer_stats = True
  terms = losses.transfer_losses(student, teacher, MASK, cfg, layers=(3,))
  s_h, t_h = student.hidden_states[3], teacher.hidden_states[3]
  close(terms["fmt"], [np_fmt(s_h, t_h, False, MASK)], rtol=1e-5)
  close(terms["at"], [np_attention(student.attention_scores[2], teacher.attention_scores[2],
                                   MASK, "real", "kl")], rtol=1e-5)
  beta, gamma = np_mean_var(s_h, list(teacher.hidden_states), MASK)
  close(terms["mean"], [beta])
  close(terms["var"], [gamma])


def test_transfer_losses_zero_for_identical_models_and_truncated_runs():
  outputs = fake_outputs(90, 3)
  truncated = Outputs(outputs.hidden_states[:3], outputs.attention_scores[:2])
  cfg = {"attention_kind": "kl", "num_student_layers": 3, "num_teacher_layers": 3}
  terms = losses.transfer_losses(truncated, truncated, MASK, cfg, layers=(1, 2))
  for term, values in terms.items():
    assert values.shape == (2,)
    close(values, [0.0, 0.0], atol=1e-5)


def test_transfer_losses_explain_missing_layers():
  student, teacher = fake_outputs(100, 2), fake_outputs(110, 4)
  truncated_teacher = Outputs(teacher.hidden_states[:3], teacher.attention_scores[:2])
  cfg = {"num_student_layers": 2, "num_teacher_layers": 4}
  with pytest.raises(ValueError, match="teacher ran 2 layers"):
    losses.transfer_losses(student, truncated_teacher, MASK, cfg, layers=(2,))
  with pytest.raises(ValueError, match="outside 1..2"):
    losses.transfer_losses(student, teacher, MASK, cfg, layers=(3,))
  with pytest.raises(ValueError, match="or neither"):
    losses.transfer_losses(student, teacher, MASK, {"num_student_layers": 2}, layers=(1,))
  with pytest.raises(ValueError, match="at least one"):
    losses.transfer_losses(student, teacher, MASK, cfg, layers=())


def test_kt_section_fields_are_transfer_options():
  from configs import common
  kt = common.kt_section()
  assert set(kt.keys()) <= set(transfer_options.TRANSFER_DEFAULTS)
  for key in kt.keys():
    assert transfer_options.transfer_option(kt, key) == kt[key], key
  assert transfer_options.transfer_option({}, "feature_projection") == "auto"
  assert transfer_options.transfer_option({}, "attention_transfer") == "auto"
  with pytest.raises(KeyError, match="unknown knowledge-transfer option"):
    transfer_options.transfer_option({}, "projection")


def test_transfer_losses_computes_only_the_requested_terms():
  student, teacher = fake_outputs(120, 2), fake_outputs(130, 2)
  full = losses.transfer_losses(student, teacher, MASK, {}, layers=(1, 2))
  part = losses.transfer_losses(student, teacher, MASK, {}, layers=(1, 2), terms=("fmt", "at"))
  assert set(part) == {"fmt", "at"}
  for term in part:
    close(part[term], np.asarray(full[term]))
  with pytest.raises(ValueError, match="non-empty subset"):
    losses.transfer_losses(student, teacher, MASK, {}, layers=(1,), terms=("kd",))
