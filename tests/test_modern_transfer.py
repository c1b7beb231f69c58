"""ModernBERT and EuroBERT as teachers: every transfer term on their outputs against numpy
references (banded per-head attention KL, rotated and grouped-query MiniLMv2 relations, the
pre-norm feature maps through the teacher's final norm), the checks made before compilation,
and distillation runs through the loop from a Hugging Face ModernBERT directory."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

# The numpy references multiply 0 by -inf where a key is masked before selecting 0.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

from configs import common
from train_util import metrics_rows, tiny_student_config

from mbert_jax import launch
from mbert_jax.data import build_pipeline
from mbert_jax.distill import losses, schedule, teacher, teacher_cache, teacher_outputs
from mbert_jax.distill.attention_losses import attention_loss, relation_transfer_loss
from mbert_jax.interop import hf_export
from mbert_jax.models import build, modern_preset, preset

SEQ = 24
STUDENT = preset("mobilebert_micro", vocab_size=97)


# ----------------------------------------------------------------------------- helpers
def init(cfg, seed=0):
  model = build(cfg)
  return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32),
                             masked_positions=jnp.zeros((1, 1), jnp.int32))["params"])


def randomized(params, seed, scale=0.15):
  """Every leaf random, norms around 1: attention far from uniform, norms not the identity."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      (1.0 + 0.3 * jax.random.normal(k, x.shape)) if x.ndim == 1 and x.shape[0] <= 128
      else scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (3, SEQ))
  mask = np.ones_like(ids)
  mask[1, 17:] = 0
  mask[2, 6:] = 0
  return jnp.asarray(ids * mask, jnp.int32), jnp.asarray(mask, jnp.int32)


def teacher_forward(cfg, params, ids, mask, **kw):
  return build(cfg).apply({"params": params}, ids, None, mask, heads=False, **kw)


def np_rotate(x, theta):
  """Rotate-half RoPE of x [B, T, heads, d] written out: pairs (i, i + d/2) turn by
  position * theta^(-2i/d)."""
  d = x.shape[-1]
  pos = np.arange(x.shape[1], dtype=np.float64)[:, None]
  freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
  angle = pos * freq[None, :]
  cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]
  a, b = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def np_log_softmax(x, visible):
  x = np.where(visible, x, -np.inf)
  m = np.max(x, axis=-1, keepdims=True)
  lse = m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
  return np.where(visible, x - lse, -np.inf)


def np_relation_kl(student, teacher_x, heads, mask):
  """MiniLMv2 KL(teacher || student) of x x^T / sqrt(d) per relation head, padded keys out."""
  total = 0.0
  for s, t in zip(student, teacher_x):
    per = []
    for x in (s, t):
      b, n, w = x.shape
      h = x.reshape(b, n, heads, w // heads).astype(np.float64)
      scores = np.einsum("btrd,bsrd->brts", h, h) / np.sqrt(w // heads)
      per.append(np_log_softmax(scores, mask[:, None, None, :] > 0))
    log_q, log_p = per
    p = np.exp(log_p)
    terms = np.where(p > 0, p * (log_p - np.where(p > 0, log_q, 0.0)), 0.0)
    total += np.mean(np.sum(terms, axis=-1))
  return total


# ----------------------------------------------------------------------------- attention
def test_banded_attention_kl_matches_numpy_and_stays_finite():
  """Per-head attention transfer on a ModernBERT teacher's local layers: the keys outside the
  window (and padding) carry float32's minimum; they must count as probability 0."""
  cfg = modern_preset("modernbert_micro", vocab_size=97)  # window +-8 on layers 2 and 3
  assert cfg.half_window * 2 + 1 < SEQ
  params = randomized(init(cfg), 1)
  ids, mask = batch(97)
  out = teacher_forward(cfg, params, ids, mask, return_qkv=True)
  student = jax.random.normal(jax.random.key(3), (3, 4, SEQ, SEQ)) * 2.0
  student = jnp.where(mask[:, None, None, :] > 0, student, -10000.0)
  np_mask = np.asarray(mask)
  pos = np.arange(SEQ)
  for layer in range(cfg.num_hidden_layers):
    scores = out.attention_scores[layer]
    q, k, _ = (np.asarray(x, np.float64).reshape(3, SEQ, 4, 16) for x in out.qkv[layer])
    is_global = cfg.global_layers[layer]
    theta = cfg.rope_theta if is_global else cfg.local_rope_theta
    q, k = np_rotate(q, theta), np_rotate(k, theta)
    ref_scores = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    visible = np.broadcast_to(np_mask[:, None, None, :] > 0, ref_scores.shape)
    if not is_global:
      visible = visible & (np.abs(pos[:, None] - pos[None, :]) <= cfg.half_window)
      assert np.sum(np.asarray(scores) <= np.finfo(np.float32).min / 2) > 0
    # A padded query of a local layer may see no key at all: it has no distribution and is
    # left out of the average.
    rows_kept = visible.any(-1)
    if not is_global:
      assert not rows_kept.all()
    log_p = np_log_softmax(ref_scores, visible | ~rows_kept[..., None])
    log_q = np.asarray(jax.nn.log_softmax(student, axis=-1), np.float64)
    p = np.where(visible, np.exp(log_p), 0.0)
    kl = np.sum(np.where(visible, p * (log_p - log_q), 0.0), axis=-1)
    ce = np.sum(np.where(visible, -p * log_q, 0.0), axis=-1)
    for kind, expected in (("kl", kl[rows_kept].mean()), ("ce", ce[rows_kept].mean())):
      got = attention_loss(student, scores, kind=kind)
      np.testing.assert_allclose(float(got), expected, rtol=1e-4, err_msg=f"{layer} {kind}")
    grad = jax.grad(lambda s: attention_loss(s, scores, kind="kl"))(student)
    assert np.all(np.isfinite(np.asarray(grad)))
  # Same scores compared with themselves: exactly no divergence, banded or not.
  for scores in out.attention_scores:
    assert abs(float(attention_loss(scores, scores, kind="kl"))) < 1e-5


# ----------------------------------------------------------------------------- relations
@pytest.mark.parametrize("rotary", ["rotated", "none"])
def test_rotated_grouped_query_relations_match_numpy(rotary):
  """A EuroBERT teacher with 4 query heads over 2 key/value heads: Q rotated (or not), K
  rotated and expanded to 4 heads, V expanded; relations against a student of another width."""
  cfg = modern_preset("eurobert_micro", vocab_size=97)
  assert cfg.num_kv_groups == 2
  params = randomized(init(cfg), 2)
  ids, mask = batch(97, seed=1)
  out = teacher_forward(cfg, params, ids, mask, return_qkv=True)
  adapted = teacher_outputs.adapt(out, cfg, params, "none", rotary)
  rng = np.random.default_rng(4)
  student = tuple(jnp.asarray(rng.normal(size=(3, SEQ, 32)), jnp.float32) for _ in range(3))
  np_mask = np.asarray(mask)
  for layer in range(cfg.num_hidden_layers):
    q, k, v = (np.asarray(x, np.float64) for x in out.qkv[layer])
    q, k, v = q.reshape(3, SEQ, 4, 16), k.reshape(3, SEQ, 2, 16), v.reshape(3, SEQ, 2, 16)
    if rotary == "rotated":
      q, k = np_rotate(q, cfg.rope_theta), np_rotate(k, cfg.rope_theta)
    # Query heads 0, 1 read key/value head 0; heads 2, 3 read head 1.
    k, v = k[:, :, [0, 0, 1, 1]], v[:, :, [0, 0, 1, 1]]
    ref_t = [x.reshape(3, SEQ, 64) for x in (q, k, v)]
    for i, x in enumerate(ref_t):
      np.testing.assert_allclose(np.asarray(adapted.qkv[layer][i]), x, rtol=1e-4, atol=1e-5)
    got = relation_transfer_loss(student, adapted.qkv[layer], 4, attention_mask=mask)
    expected = np_relation_kl([np.asarray(s, np.float64) for s in student], ref_t, 4, np_mask)
    np.testing.assert_allclose(float(got), expected, rtol=2e-4)


def test_rotation_changes_the_query_relations():
  cfg = modern_preset("modernbert_micro", vocab_size=97)
  params = randomized(init(cfg), 5, scale=0.5)
  ids, mask = batch(97, seed=2)
  out = teacher_forward(cfg, params, ids, mask, return_qkv=True)
  rotated = teacher_outputs.adapt(out, cfg, params, "none", "rotated")
  plain = teacher_outputs.adapt(out, cfg, params, "none", "none")
  for layer in range(cfg.num_hidden_layers):
    np.testing.assert_array_equal(np.asarray(plain.qkv[layer][2]),
                                  np.asarray(rotated.qkv[layer][2]))  # values never rotate
    self_rel = relation_transfer_loss(plain.qkv[layer], rotated.qkv[layer], 4,
                                      attention_mask=mask)
    assert float(self_rel) > 1e-3


# ----------------------------------------------------------------------------- feature maps
def np_norm(x, scale, kind, eps):
  x = np.asarray(x, np.float64)
  if kind == "rms_norm":
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale
  c = x - x.mean(-1, keepdims=True)
  return c / np.sqrt(np.mean(c * c, -1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("name", ["modernbert_micro", "eurobert_micro"])
def test_teacher_states_through_the_final_norm(name):
  cfg = modern_preset(name, vocab_size=97)
  params = randomized(init(cfg), 6)
  ids, mask = batch(97)
  scale = np.asarray(params["encoder"]["final_norm"]["scale"], np.float64)
  for depth in (None, 2):  # all layers (last already normalised) and a truncated run
    out = teacher_forward(cfg, params, ids, mask, num_layers=depth)
    normed = teacher_outputs.normalized_states(out, cfg, params, "final_norm")
    last = len(out.hidden_states) - 1
    for i, (raw, got) in enumerate(zip(out.hidden_states, normed)):
      if i == last and depth is None:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(raw))
      else:
        np.testing.assert_allclose(np.asarray(got), np_norm(raw, scale, cfg.norm_type,
                                                            cfg.norm_eps), rtol=1e-4, atol=1e-5)
    plain = teacher_outputs.normalized_states(out, cfg, params, "layer_norm")
    c = np.asarray(out.hidden_states[1], np.float64)
    c = c - c.mean(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(plain[1]), c / np.sqrt(np.mean(c * c, -1,
                                                                         keepdims=True)),
                               rtol=1e-4, atol=1e-5)
    assert teacher_outputs.normalized_states(out, cfg, params, "none") == out.hidden_states


# ----------------------------------------------------------------------------- before compile
def kt(**overrides) -> ml_collections.ConfigDict:
  c = common.kt_section()
  for key, value in overrides.items():
    c[key] = value
  return c


def stages(name="pkt_tf2", num_layers=4):
  c = schedule.default_schedule_config()
  c.name = name
  c.steps_per_layer, c.distill_steps, c.warmup_steps = 10, 20, 0
  return schedule.build_schedule(c, num_layers)


def test_check_transfer_resolves_modern_teachers():
  modern = modern_preset("modernbert_micro", vocab_size=97)
  plan = teacher.check_transfer(kt(), stages(), STUDENT, modern, True)
  assert (plan.attention_transfer, plan.teacher_feature_norm, plan.projection) == (
      "per_head", "final_norm", "none")
  assert "final_norm" in plan.describe()
  gqa = modern_preset("eurobert_micro", vocab_size=97, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=8)
  plan = teacher.check_transfer(kt(), stages(), STUDENT, gqa, True)
  # Relations over 8 query heads x 8 = 64 (teacher) and 32 (student) wide Q/K/V: 8 heads.
  assert (plan.attention_transfer, plan.relation_heads, plan.relation_rotary) == (
      "relation", 8, "rotated")
  plan = teacher.check_transfer(kt(relation_rotary="none", teacher_feature_norm="none"),
                                stages(), STUDENT, gqa, True)
  assert (plan.relation_rotary, plan.teacher_feature_norm) == ("none", "none")


def test_check_transfer_refuses_in_one_line():
  gqa = modern_preset("eurobert_micro", vocab_size=97, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=8)
  cases = [
      (kt(attention_transfer="per_head"), gqa,
       r"per_head.*student has 4 heads and the teacher 8.*attention_transfer='relation'"),
      (kt(teacher_feature_norm="final_norm"), preset("bert_base_micro", vocab_size=97),
       r"post-norm.*teacher_feature_norm='auto'"),
      (kt(teacher_feature_norm="rms"), gqa, r"kt.teacher_feature_norm must be one of"),
      (kt(relation_rotary="yes"), gqa, r"kt.relation_rotary must be one of"),
  ]
  for options, t_cfg, pattern in cases:
    with pytest.raises(ValueError, match=pattern) as e:
      teacher.check_transfer(options, stages(), STUDENT, t_cfg, True)
    assert "\n" not in str(e.value)


def test_transfer_losses_on_an_adapted_modern_teacher_are_finite_with_gradients():
  """The loss path the objective runs: adapt the teacher, then every term, per head and as
  relations, with the gradient reaching the student."""
  student_params = init(STUDENT, 7)
  ids, mask = batch(97, seed=3)
  for t_cfg, attention in ((modern_preset("modernbert_micro", vocab_size=97), "per_head"),
                           (modern_preset("eurobert_micro", vocab_size=97), "relation")):
    t_params = randomized(init(t_cfg), 8)
    t_out = teacher_forward(t_cfg, t_params, ids, mask, return_qkv=True)
    t_out = teacher_outputs.adapt(t_out, t_cfg, t_params, "final_norm", "rotated")
    options = kt(attention_transfer=attention)
    options.num_student_layers, options.num_teacher_layers = 4, 4

    def total(p):
      s_out = build(STUDENT).apply({"params": p}, ids, jnp.zeros_like(ids), mask, heads=False,
                                   return_qkv=attention == "relation")
      terms = losses.transfer_losses(s_out, t_out, mask, options, (1, 2, 3, 4))
      return sum(jnp.sum(v) for v in terms.values()), terms

    (value, terms), grads = jax.value_and_grad(total, has_aux=True)(student_params)
    assert set(terms) == {"fmt", "at", "mean", "var"}
    assert all(np.all(np.isfinite(np.asarray(v))) for v in terms.values())
    flat = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in flat)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in flat)


# ----------------------------------------------------------------------------- through the loop
@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("modern_kt_data"))


def modern_teacher_dir(directory, data_cache, name, seed, **overrides):
  """A random-init ModernBERT/EuroBERT masked-LM directory in Hugging Face's layout, written by
  our export (no torch), beside the tiny runs' tokenizer: its vocabulary is the student's."""
  c = tiny_student_config(data_cache, "", layers=2)
  c.data.vocab = "train:512"
  pipe = build_pipeline(c.data, None, split="train")
  pipe.save_vocab(directory + "_tokenizer")
  cfg = modern_preset(name, vocab_size=pipe.vocab_size, max_position_embeddings=32,
                      **overrides)
  hf_export.save_modern(cfg, randomized(init(cfg), seed), directory,
                        tokenizer_dir=directory + "_tokenizer")
  return directory


def student_config(data_cache, teacher_dir, **kt_fields):
  c = tiny_student_config(data_cache, teacher_dir, preset="pkt_tf2", steps_per_layer=2,
                          distill_steps=2, layers=2)
  c.data.vocab = teacher_dir
  c.schedule.alpha = 0.5  # PD reads the teacher's MLM distribution
  for k, v in kt_fields.items():
    c.kt[k] = v
  return c


def test_modernbert_teacher_through_the_loop(tmp_path, data_cache):
  """Per-head attention (the 16-token window is shorter than the 32-token rows), feature maps
  through the teacher's final norm, PD from its MLM logits."""
  teacher_dir = modern_teacher_dir(str(tmp_path / "teacher"), data_cache, "modernbert_micro", 9)
  with open(os.path.join(teacher_dir, "config.json")) as f:
    assert json.load(f)["model_type"] == "modernbert"
  report = launch.run_config(student_config(data_cache, teacher_dir), str(tmp_path / "run"))
  assert report["status"] == "completed"
  assert "per_head" in report["transfer"] and "final_norm" in report["transfer"]
  rows = metrics_rows(str(tmp_path / "run"))
  layer_rows = [r for r in rows if "fmt_loss" in r]
  pd_rows = [r for r in rows if "kd_loss" in r]
  assert layer_rows and pd_rows
  for r in layer_rows:
    assert all(np.isfinite(r[k]) and r[k] > 0 for k in ("fmt_loss", "at_loss", "mean_loss"))
  assert all(np.isfinite(r["kd_loss"]) and np.isfinite(r["loss"]) for r in pd_rows)


@pytest.mark.slow
def test_grouped_query_eurobert_teacher_through_the_loop(tmp_path, data_cache):
  """8 query heads over 2 key/value heads against a 4-head student: rotated relations."""
  teacher_dir = modern_teacher_dir(str(tmp_path / "teacher"), data_cache, "eurobert_micro", 10,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=8)
  report = launch.run_config(student_config(data_cache, teacher_dir), str(tmp_path / "run"))
  assert report["status"] == "completed"
  assert "relation" in report["transfer"] and "rotated" in report["transfer"]
  rows = [r for r in metrics_rows(str(tmp_path / "run")) if "at_loss" in r]
  assert rows and all(np.isfinite(r["at_loss"]) and r["at_loss"] > 0 for r in rows)


@pytest.mark.slow
def test_cached_top_k_logits_of_a_modernbert_teacher(tmp_path, data_cache):
  """The cache writer runs a ModernBERT teacher; at k = vocabulary size in float32 the cached
  PD stage trains as the online one does."""
  teacher_dir = modern_teacher_dir(str(tmp_path / "teacher"), data_cache, "modernbert_micro", 9)
  online = student_config(data_cache, teacher_dir)
  cached = student_config(data_cache, teacher_dir)
  cache_dir = str(tmp_path / "cache")
  cached.schedule.teacher_cache = cache_dir
  cached.teacher_cache.k = 512
  cached.teacher_cache.value_dtype = "float32"
  teacher_cache.write_cache(cached, cache_dir, progress=False)
  runs = {}
  for name, c in (("online", online), ("cached", cached)):
    assert launch.run_config(c, str(tmp_path / name))["status"] == "completed"
    runs[name] = {r["step"]: r for r in metrics_rows(str(tmp_path / name)) if "kd_loss" in r}
  assert runs["online"] and runs["online"].keys() == runs["cached"].keys()
  for step, row in runs["online"].items():
    np.testing.assert_allclose(runs["cached"][step]["kd_loss"], row["kd_loss"], rtol=2e-5)


# ----------------------------------------------------------------------------- no silent waste
def shapes(cfg):
  from mbert_jax.models.summary import param_shapes
  return param_shapes(cfg)


def test_pkt_refuses_to_freeze_embeddings_no_teacher_could_seed():
  t_cfg = modern_preset("modernbert_micro", vocab_size=97)
  report = teacher.plan_seed(shapes(STUDENT), shapes(t_cfg), STUDENT, t_cfg,
                             common.teacher_section())
  assert "embeddings/word_embeddings/embedding" in dict(report.skipped)
  for name in ("pkt", "pkt_freeze", "jkt"):
    with pytest.raises(ValueError, match=r"freezes .*embeddings/.*schedule.name=pkt_tf2.*"
                                         r"teacher.frozen_fresh=warn") as e:
      teacher.check_frozen_fresh(stages(name), report, "refuse", name)
    assert "\n" not in str(e.value)
  warned = teacher.check_frozen_fresh(stages("pkt"), report, "warn", "pkt")
  assert len(warned) == 4 and all("pkt_tf2" in w for w in warned)
  assert teacher.check_frozen_fresh(stages("pkt_tf2"), report, "refuse", "pkt_tf2") == []


def test_a_same_shape_teacher_passes_and_only_its_switched_off_norm_is_named():
  """IB-BERT -> MobileBERT (the official pairing): everything copies but the embedding norm,
  which copy_embedding_norm=auto keeps at the NoNorm identity on purpose."""
  t_cfg = preset("ib_bert_large_micro", vocab_size=97)
  report = teacher.plan_seed(shapes(STUDENT), shapes(t_cfg), STUDENT, t_cfg,
                             common.teacher_section())
  assert "embeddings/word_embeddings/embedding" in report.copied
  warned = teacher.check_frozen_fresh(stages("pkt"), report, "refuse", "pkt")
  assert warned and all("embeddings/norm" in w and "pkt_tf2" not in w for w in warned)


def test_pkt_with_a_modern_teacher_is_refused_in_the_run_and_the_list_is_said(
    tmp_path, data_cache, caplog):
  teacher_dir = modern_teacher_dir(str(tmp_path / "teacher"), data_cache, "modernbert_micro", 9)
  c = student_config(data_cache, teacher_dir)
  c.schedule.name = "pkt"
  with pytest.raises(ValueError, match="schedule.name=pkt_tf2"):
    launch.run_config(c, str(tmp_path / "run"))
  said = [r for r in caplog.records if r.levelname == "WARNING" and "student from teacher" in
          r.getMessage()]
  assert said and "kept fresh" in said[0].getMessage()
  assert "embeddings/word_embeddings/embedding" in said[0].getMessage()
  assert not os.path.isdir(os.path.join(str(tmp_path / "run"), "checkpoints"))


def test_another_vocabulary_is_refused_before_the_corpus_is_tokenized(tmp_path, data_cache):
  teacher_dir = modern_teacher_dir(str(tmp_path / "teacher"), data_cache, "modernbert_micro", 9)
  other = str(tmp_path / "other")
  cfg = modern_preset("modernbert_micro", vocab_size=300, max_position_embeddings=32)
  hf_export.save_modern(cfg, init(cfg), other, tokenizer_dir=teacher_dir + "_tokenizer")
  c = student_config(data_cache, other)
  c.data.vocab = teacher_dir + "_tokenizer"
  c.data.cache_dir = str(tmp_path / "fresh_cache")
  os.makedirs(c.data.cache_dir)
  with pytest.raises(ValueError, match=r"vocabulary has 512 tokens .* has 300") as e:
    launch.run_config(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert os.listdir(c.data.cache_dir) == []  # nothing read, trained or tokenized
