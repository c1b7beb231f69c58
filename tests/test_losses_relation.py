"""Transfer from teachers of another width, head count or depth: float64 numpy references for
the projected feature terms, MiniLMv2 relation transfer and similarity transfer; zero losses
between identical networks; finiteness with padding; gradients into the projection."""

from __future__ import annotations

import collections
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbert_jax.distill import attention_losses, feature_losses, losses, transfer_options
from mbert_jax.models import build, preset

Outputs = collections.namedtuple("Outputs", ["hidden_states", "attention_scores", "qkv"])

B, T = 2, 7
MASK = np.array([[1] * T, [1] * 4 + [0] * (T - 4)], np.int32)


# ----------------------------------------------------------------------------- numpy references
def np_ln0(x):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-12)


def np_weighted_mean(values, weights):
  if weights is None:
    return values.mean()
  weights = np.broadcast_to(weights, values.shape)
  return (values * weights).sum() / weights.sum()


def np_fmt(student, teacher, mask=None):
  per_token = ((np_ln0(teacher) - np_ln0(student)) ** 2).mean(-1)
  return np_weighted_mean(per_token, None if mask is None else mask.astype(np.float64))


def np_mean_var(student, teacher, mask=None):
  s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
  beta = (t.mean(-1) - s.mean(-1)) ** 2
  gamma = np.abs(t.var(-1) - s.var(-1))
  weights = None if mask is None else mask.astype(np.float64)
  return np_weighted_mean(beta, weights), np_weighted_mean(gamma, weights)


def np_relation(student, teacher, heads, mask=None, over="all"):
  """KL(teacher || student) of softmax(A A^T / sqrt(d)) rows, per relation head, keys masked."""
  s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
  batch, seq, _ = s.shape
  keys = np.ones((batch, seq)) if mask is None else mask.astype(np.float64)
  total, count = 0.0, 0.0
  for b in range(batch):
    real = keys[b] > 0
    for r in range(heads):
      dists = []
      for x in (s, t):
        d = x.shape[-1] // heads
        a = x[b, :, r * d:(r + 1) * d]
        scores = a @ a.T / math.sqrt(d)
        scores = scores[:, real]
        scores = scores - scores.max(-1, keepdims=True)
        dists.append(np.exp(scores) / np.exp(scores).sum(-1, keepdims=True))
      ps, pt = dists
      kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)
      rows = np.ones(seq) if over == "all" else keys[b]
      total += (kl * rows).sum()
      count += rows.sum()
  return total / count


def np_similarity(student, teacher, normalize=True, mask=None):
  def sim(x):
    x = np_ln0(x) if normalize else np.asarray(x, np.float64)
    x = x / np.sqrt((x ** 2).sum(-1, keepdims=True) + 1e-12)
    return np.einsum("btd,bsd->bts", x, x)
  diff = (sim(teacher) - sim(student)) ** 2
  weights = None
  if mask is not None:
    m = mask.astype(np.float64)
    weights = m[:, :, None] * m[:, None, :]
  return np_weighted_mean(diff, weights)


# ----------------------------------------------------------------------------- fixtures
def rand(seed, *shape, scale=2.0, shift=0.5):
  return (np.random.default_rng(seed).normal(size=shape) * scale + shift).astype(np.float32)


def fake_outputs(seed, depth, width, heads, qkv_width):
  hidden = tuple(rand(seed + i, B, T, width, scale=1.0 + i) for i in range(depth + 1))
  scores = tuple(rand(seed + 50 + i, B, heads, T, T) for i in range(depth))
  qkv = tuple(tuple(rand(seed + 100 + 3 * i + j, B, T, qkv_width) for j in range(3))
              for i in range(depth))
  return Outputs(hidden, scores, qkv)


def projection(seed, hs, ht, layers=None):
  rng = np.random.default_rng(seed)
  lead = () if layers is None else (layers,)
  return {"kernel": jnp.asarray(rng.normal(size=lead + (hs, ht)) / math.sqrt(hs), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=lead + (ht,)) * 0.1, jnp.float32)}


def close(actual, expected, rtol=2e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def init(cfg, seed=0):
  model = build(cfg)
  ids = jnp.zeros((1, 4), jnp.int32)
  return model, nn.unbox(model.init(jax.random.key(seed), ids)["params"])


def batch(vocab, seed=0):
  ids = np.random.default_rng(seed).integers(1, vocab, (B, T)).astype(np.int32)
  return jnp.asarray(ids * MASK), jnp.asarray(MASK)


STUDENT = preset("mobilebert_micro", num_hidden_layers=2, vocab_size=97)
# Another width (96 vs 64), head count (6 vs 4), Q/K/V width (96 vs 32) and depth (3 vs 2).
TEACHER = preset("bert_base_micro", num_hidden_layers=3, vocab_size=97, hidden_size=96,
                 embedding_size=96, intra_bottleneck_size=96, num_attention_heads=6,
                 intermediate_size=128)


# ----------------------------------------------------------------------------- projection path
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("over", ["all", "real"])
def test_projected_feature_terms_match_numpy(per_layer, over):
  student, teacher = fake_outputs(1, 2, 6, 2, 8), fake_outputs(20, 4, 10, 2, 8)
  proj = projection(3, 6, 10, layers=2 if per_layer else None)
  cfg = {"feature_over": over, "feature_projection": "per_layer" if per_layer else "shared"}
  terms = losses.transfer_losses(student, teacher, MASK, cfg, layers=(1, 2), projection=proj,
                                 terms=("fmt", "mean", "var"))
  assert set(terms) == {"fmt", "mean", "var"}
  mask = MASK if over == "real" else None
  for position, (s_layer, t_layer) in enumerate([(1, 2), (2, 4)]):
    kernel = np.asarray(proj["kernel"], np.float64)
    bias = np.asarray(proj["bias"], np.float64)
    if per_layer:
      kernel, bias = kernel[s_layer - 1], bias[s_layer - 1]
    projected = np.asarray(student.hidden_states[s_layer], np.float64) @ kernel + bias
    teacher_h = teacher.hidden_states[t_layer]
    close(terms["fmt"][position], np_fmt(projected, teacher_h, mask))
    beta, gamma = np_mean_var(projected, teacher_h, mask)
    close(terms["mean"][position], beta)
    close(terms["var"][position], gamma)


def test_project_features_checks_shapes():
  proj = projection(0, 6, 10, layers=2)
  with pytest.raises(ValueError, match="per-layer projection has 2 layers"):
    feature_losses.project_features(rand(0, B, T, 6), proj, 3)
  with pytest.raises(ValueError, match="expects student width 6"):
    feature_losses.project_features(rand(0, B, T, 5), proj, 1)


def test_projection_receives_gradients_through_transfer_losses():
  student, teacher = fake_outputs(5, 2, 6, 2, 8), fake_outputs(30, 2, 10, 2, 8)
  for layers in (None, 2):
    proj = projection(7, 6, 10, layers=layers)

    def total(p):
      terms = losses.transfer_losses(student, teacher, MASK, {}, (1, 2), projection=p,
                                     terms=("fmt", "mean", "var"))
      return sum(jnp.sum(v) for v in terms.values())

    grads = jax.grad(total)(proj)
    for name, g in grads.items():
      g = np.asarray(g)
      assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name
      if layers:  # every layer's own projection is trained by its own layer's terms
        assert all(np.abs(g[i]).max() > 0 for i in range(layers)), name


def test_different_widths_without_projection_say_what_to_do():
  student, teacher = fake_outputs(5, 2, 6, 2, 8), fake_outputs(30, 2, 10, 2, 8)
  with pytest.raises(ValueError, match="feature_transfer='similarity'"):
    losses.transfer_losses(student, teacher, MASK, {}, (1,), terms=("fmt",))
  with pytest.raises(ValueError, match="no projection params were passed"):
    losses.transfer_losses(fake_outputs(5, 2, 10, 2, 8), teacher, MASK,
                           {"feature_projection": "shared"}, (1,), terms=("fmt",))
  with pytest.raises(ValueError, match="parameter-free"):
    losses.transfer_losses(student, teacher, MASK, {"feature_transfer": "similarity"}, (1,),
                           projection=projection(0, 6, 10), terms=("fmt",))


# ----------------------------------------------------------------------------- relation transfer
@pytest.mark.parametrize("over,masked", [("all", False), ("all", True), ("real", True)])
def test_relation_loss_matches_numpy(over, masked):
  s, t = rand(1, B, T, 8, scale=1.5), rand(2, B, T, 12, scale=1.5)
  mask = MASK if masked else None
  got = attention_losses.relation_loss(s, t, 4, attention_mask=mask, over=over)
  close(got, np_relation(s, t, 4, mask, over), rtol=1e-5)


def test_relation_transfer_loss_sums_queries_keys_values():
  s = [rand(i, B, T, 8) for i in range(3)]
  t = [rand(10 + i, B, T, 12) for i in range(3)]
  got = attention_losses.relation_transfer_loss(s, t, 2, attention_mask=MASK)
  close(got, sum(np_relation(a, b, 2, MASK) for a, b in zip(s, t)), rtol=1e-5)


def test_relation_loss_rejects_heads_that_do_not_divide():
  with pytest.raises(ValueError, match="do not divide the teacher's width 12"):
    attention_losses.relation_loss(rand(0, B, T, 8), rand(1, B, T, 12), 8)


def test_relation_heads_auto_and_validation():
  assert transfer_options.auto_relation_heads(128, 1024, 4, 16) == 16   # MobileBERT <- BERT-large
  assert transfer_options.auto_relation_heads(128, 768, 4, 12) == 8     # MobileBERT <- BERT-base
  assert transfer_options.auto_relation_heads(32, 384, 4, 12) == 8      # micro <- MiniLM-L6
  assert transfer_options.resolve_relation_heads(0, 128, 1024, 4, 16) == 16
  assert transfer_options.resolve_relation_heads(32, 128, 1024, 4, 16) == 32
  with pytest.raises(ValueError, match="kt.relation_heads=12 does not divide the student"):
    transfer_options.resolve_relation_heads(12, 128, 768, 4, 12)
  with pytest.raises(ValueError, match=">= 0"):
    transfer_options.resolve_relation_heads(-1, 128, 768, 4, 12)


def test_model_exposes_qkv_only_when_asked(pair):
  params, ids, mask = pair.s_params, pair.ids, pair.mask
  model = build(STUDENT)
  plain = model.apply({"params": params}, ids, attention_mask=mask, num_layers=1)
  assert plain.qkv == ()
  out = model.apply({"params": params}, ids, attention_mask=mask, return_qkv=True, num_layers=1)
  assert len(out.qkv) == 1
  q, k, v = out.qkv[0]
  width = STUDENT.num_attention_heads * STUDENT.head_dim
  assert q.shape == k.shape == v.shape == (B, T, width)
  # The exposed Q and K are exactly what the attention scores were computed from.
  n, d = STUDENT.num_attention_heads, STUDENT.head_dim
  split = lambda x: np.asarray(x, np.float64).reshape(B, T, n, d)
  scores = np.einsum("bqnd,bknd->bnqk", split(q), split(k)) / math.sqrt(d)
  real = np.broadcast_to(np.asarray(mask)[:, None, None, :] > 0, scores.shape)
  close(np.asarray(out.attention_scores[0])[real], scores[real], rtol=1e-5, atol=1e-5)


def _run(cfg, params, ids, mask):
  return build(cfg).apply({"params": params}, ids, attention_mask=mask, return_qkv=True)


Pair = collections.namedtuple("Pair", ["s_params", "ids", "mask", "student", "teacher"])


@pytest.fixture(scope="module")
def pair() -> Pair:
  """A micro MobileBERT and a BERT of every other shape, run once on a padded batch."""
  _, s_params = init(STUDENT, seed=1)
  _, t_params = init(TEACHER, seed=2)
  ids, mask = batch(STUDENT.vocab_size, seed=3)
  return Pair(s_params, ids, mask, _run(STUDENT, s_params, ids, mask),
              _run(TEACHER, t_params, ids, mask))


def test_relation_loss_is_zero_for_the_same_network_and_finite_with_padding(pair):
  s_params, ids, mask, student, teacher = pair
  for over in ("all", "real"):
    cfg = {"attention_transfer": "relation", "attention_over": over}
    same = losses.transfer_losses(student, student, mask, cfg, (1, 2), terms=("at",))
    assert np.all(np.asarray(same["at"]) == 0.0), same
    other = losses.transfer_losses(student, teacher, mask, cfg, (1, 2), terms=("at",))
    assert np.all(np.isfinite(other["at"])) and np.all(np.asarray(other["at"]) > 0)

  def at_loss(p):
    out = _run(STUDENT, p, ids, mask)
    return jnp.sum(losses.transfer_losses(out, teacher, mask, {}, (1, 2), terms=("at",))["at"])

  grads = jax.tree.leaves(jax.grad(at_loss)(s_params))
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert max(float(np.abs(g).max()) for g in grads) > 0


def test_transfer_losses_with_a_teacher_of_every_other_shape(pair):
  """Width 64 vs 96 (projected), 4 vs 6 heads (relations, auto), depth 2 vs 3 (uniform map)."""
  _, _, mask, student, teacher = pair
  proj = projection(8, STUDENT.hidden_size, TEACHER.hidden_size)
  cfg = {"num_student_layers": 2, "num_teacher_layers": 3}
  terms = jax.jit(lambda s, t, p: losses.transfer_losses(s, t, mask, cfg, (1, 2), projection=p))(
      student, teacher, proj)
  heads = transfer_options.auto_relation_heads(32, 96, 4, 6)
  assert heads == 4   # gcd(32, 96) = 32: the most relation heads up to 6 dividing it
  for position, (s_layer, t_layer) in enumerate(zip((1, 2), transfer_options.layer_map(2, 3))):
    projected = (np.asarray(student.hidden_states[s_layer], np.float64)
                 @ np.asarray(proj["kernel"], np.float64) + np.asarray(proj["bias"]))
    close(terms["fmt"][position], np_fmt(projected, teacher.hidden_states[t_layer]), rtol=1e-4)
    relation = sum(np_relation(a, b, heads, np.asarray(mask))
                   for a, b in zip(student.qkv[s_layer - 1], teacher.qkv[t_layer - 1]))
    close(terms["at"][position], relation, rtol=1e-4)
  with pytest.raises(ValueError, match="'per_head' compares attention maps head by head"):
    losses.transfer_losses(student, teacher, mask, {**cfg, "attention_transfer": "per_head"},
                           (1,), projection=proj)
  without_qkv = student.replace(qkv=())
  with pytest.raises(ValueError, match="run the student with return_qkv=True"):
    losses.transfer_losses(without_qkv, teacher, mask, cfg, (1,), projection=proj)


# ----------------------------------------------------------------------------- similarity
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_similarity_loss_matches_numpy(normalize, masked):
  s, t = rand(1, B, T, 6), rand(2, B, T, 10)
  mask = MASK if masked else None
  close(feature_losses.similarity_loss(s, t, normalize=normalize, mask=mask),
        np_similarity(s, t, normalize, mask), rtol=1e-5)


def test_similarity_transfer_zero_for_the_same_network_finite_with_padding(pair):
  _, _, mask, student, teacher = pair
  for over in ("all", "real"):
    cfg = {"feature_transfer": "similarity", "feature_over": over}
    same = losses.transfer_losses(student, student, mask, cfg, (1, 2),
                                  terms=("fmt", "mean", "var"))
    for term, values in same.items():
      assert np.all(np.abs(np.asarray(values)) < 1e-6), (term, values)
    other = losses.transfer_losses(student, teacher, mask, cfg, (1, 2),
                                   terms=("fmt", "mean", "var"))
    for term, values in other.items():
      assert np.all(np.isfinite(values)), term
    # Similarity FMT and raw-moment terms, whatever the widths.
    s_h, t_h = student.hidden_states[2], teacher.hidden_states[transfer_options.layer_map(2, 3)[1]]
    weights = np.asarray(mask) if over == "real" else None
    close(other["fmt"][1], np_similarity(s_h, t_h, True, weights), rtol=1e-4)
    beta, gamma = np_mean_var(s_h, t_h, weights)
    close(other["mean"][1], beta, rtol=1e-4)
    close(other["var"][1], gamma, rtol=1e-4)


# ----------------------------------------------------------------------------- depth mismatch
def test_custom_layer_map_lets_a_deeper_student_learn_from_repeated_teacher_layers():
  student, teacher = fake_outputs(40, 4, 6, 2, 8), fake_outputs(60, 2, 6, 2, 8)
  cfg = {"layer_map": (1, 1, 2, 2), "num_student_layers": 4, "num_teacher_layers": 2}
  terms = losses.transfer_losses(student, teacher, MASK, cfg, (1, 2, 3, 4))
  for position, t_layer in enumerate((1, 1, 2, 2)):
    close(terms["fmt"][position],
          np_fmt(student.hidden_states[position + 1], teacher.hidden_states[t_layer]))
  assert transfer_options.teacher_depth((1, 1, 2, 2), 2) == 1
  assert transfer_options.teacher_depth((1, 1, 2, 2), None) is None
  with pytest.raises(ValueError, match="kt.layer_map has 3 entries but the student has 4"):
    transfer_options.configured_layer_map((1, 1, 2), 4, 2)
  with pytest.raises(ValueError, match=r"kt.layer_map\[3\] = 3 .* not a teacher layer 1..2"):
    transfer_options.configured_layer_map((1, 1, 2, 3), 4, 2)
  with pytest.raises(ValueError, match=r"set kt.layer_map .* e.g. \[1, 1, 2, 2\]"):
    transfer_options.configured_layer_map((), 4, 2)
