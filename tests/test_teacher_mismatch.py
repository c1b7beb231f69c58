"""Teachers whose width, head count, depth, heads or vocabulary differ from the student's:
seeding reports, transfer parameters, the checks made before compilation, and the presets."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import common, distill_mobilebert
from mbert_jax.models import build, example_inputs
from mbert_jax.distill import schedule
from mbert_jax.distill import teacher
from mbert_jax.models import ModelConfig, build, preset
from mbert_jax.models.config import from_hf_config
from mbert_jax.models.summary import param_shapes

STUDENT = preset("mobilebert_micro", vocab_size=97)
WIDE_BERT = preset("bert_base_micro", vocab_size=97, hidden_size=96, embedding_size=96,
                   intra_bottleneck_size=96, num_attention_heads=6, intermediate_size=128,
                   num_hidden_layers=6)


def kt(**overrides) -> ml_collections.ConfigDict:
  c = common.kt_section()
  for key, value in overrides.items():
    c[key] = value
  return c


def teacher_section(**overrides) -> ml_collections.ConfigDict:
  c = common.teacher_section()
  for key, value in overrides.items():
    c[key] = value
  return c


def stages(name="pkt", num_layers=4, **overrides):
  c = schedule.default_schedule_config()
  c.name = name
  c.steps_per_layer, c.distill_steps, c.warmup_steps = 10, 20, 0
  for key, value in overrides.items():
    c[key] = value
  return schedule.build_schedule(c, num_layers)


def random_tree(cfg: ModelConfig, seed: int):
  """Parameters of the right shapes without compiling an init."""
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict(
      {tuple(k.split("/")): jnp.asarray(rng.normal(size=s), jnp.float32)
       for k, s in param_shapes(cfg).items()})


# ----------------------------------------------------------------------------- seeding
def test_wider_teacher_seeds_only_what_fits_and_reports_the_rest():
  params, t_params = random_tree(STUDENT, 0), random_tree(WIDE_BERT, 1)
  seeded, report = teacher.init_student_from_teacher(params, t_params, STUDENT, WIDE_BERT,
                                                     teacher_section())
  flat_s = traverse_util.flatten_dict(seeded, sep="/")
  flat_t = traverse_util.flatten_dict(t_params, sep="/")
  flat_before = traverse_util.flatten_dict(params, sep="/")
  # Vocabulary-sized and 2-class vectors have the same shape whatever the width.
  assert set(report.copied) == {"cls/predictions/output_bias", "cls/seq_relationship/bias"}
  for path in report.copied:
    np.testing.assert_array_equal(flat_s[path], flat_t[path])
  reasons = dict(report.skipped)
  assert reasons["embeddings/word_embeddings/embedding"] == (
      "shape (97, 16) vs (97, 96) (student vs teacher)")
  assert reasons["embeddings/embedding_transformation/kernel"] == "missing in teacher"
  assert reasons["embeddings/norm/scale"].startswith(
      "switched off (teacher.copy_embedding_norm=auto: student no_norm vs teacher layer_norm")
  assert reasons["cls/predictions/transform/dense/kernel"].startswith("shape (64, 64) vs (96, 96)")
  for path, _ in report.skipped:
    np.testing.assert_array_equal(flat_s[path], flat_before[path])
  assert not any(p.startswith("encoder/") for p in report.copied + tuple(reasons))
  # The loop's existing use: `params, copied = ...; len(copied); for path in copied`.
  assert len(report) == 2 and sorted(report) == sorted(report.copied)
  assert "fresh embeddings/embedding_transformation/kernel: missing in teacher" in report.lines()
  assert "kept fresh" in teacher.seed_report_summary(report)


def test_switched_off_and_fresh_teacher_heads_are_not_copied():
  params, t_params = random_tree(STUDENT, 0), random_tree(WIDE_BERT, 1)
  _, report = teacher.init_student_from_teacher(
      params, t_params, STUDENT, WIDE_BERT, teacher_section(copy_nsp_head=False),
      teacher_fresh=("cls/predictions/output_bias",))
  reasons = dict(report.skipped)
  assert report.copied == ()
  assert reasons["cls/seq_relationship/bias"] == "switched off (teacher.copy_nsp_head=False)"
  assert reasons["cls/predictions/output_bias"] == (
      "missing in teacher checkpoint (initialised fresh on import)")


def test_same_shape_teacher_still_seeds_everything():
  ib = preset("ib_bert_large_micro", vocab_size=97)
  params, t_params = random_tree(STUDENT, 2), random_tree(ib, 3)
  seeded, report = teacher.init_student_from_teacher(params, t_params, STUDENT, ib,
                                                     teacher_section())
  assert "embeddings/word_embeddings/embedding" in report.copied
  assert "cls/predictions/transform/dense/kernel" in report.copied
  assert {why for _, why in report.skipped} == {
      "switched off (teacher.copy_embedding_norm=auto: student no_norm vs teacher layer_norm)"}
  # A real copy (not an alias of the teacher's buffer: the student's state gets donated).
  s = seeded["embeddings"]["word_embeddings"]["embedding"]
  t = t_params["embeddings"]["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(s, t)
  assert s is not t


# ----------------------------------------------------------------------------- transfer params
def test_init_transfer_params_shapes_and_modes():
  key = jax.random.key(0)
  assert teacher.init_transfer_params(kt(), STUDENT, preset("ib_bert_large_micro"), key) is None
  shared = teacher.init_transfer_params(kt(), STUDENT, WIDE_BERT, key)
  assert {k: v.shape for k, v in shared.items()} == {"kernel": (64, 96), "bias": (96,)}
  assert all(v.dtype == jnp.float32 and not isinstance(v, nn.Partitioned)
             for v in shared.values())
  per_layer = teacher.init_transfer_params(kt(feature_projection="per_layer"), STUDENT,
                                           WIDE_BERT, key)
  assert {k: v.shape for k, v in per_layer.items()} == {"kernel": (4, 64, 96), "bias": (4, 96)}
  assert not np.allclose(per_layer["kernel"][0], per_layer["kernel"][1])
  # Forced on equal widths: starts as the identity, i.e. as the unprojected transfer.
  same = teacher.init_transfer_params(kt(feature_projection="shared"), STUDENT,
                                      preset("ib_bert_large_micro"), key)
  np.testing.assert_array_equal(same["kernel"], np.eye(64))
  assert teacher.init_transfer_params(kt(feature_transfer="similarity"), STUDENT, WIDE_BERT,
                                      key) is None
  with pytest.raises(ValueError, match="kt.feature_projection='none' but the student's feature"):
    teacher.init_transfer_params(kt(feature_projection="none"), STUDENT, WIDE_BERT, key)


def test_projection_lives_beside_the_student_params():
  """The student model ignores params[PROJECTION_KEY], so the loop can keep one tree."""
  model = build(preset("mobilebert_micro", vocab_size=97, num_hidden_layers=1))
  ids = jnp.ones((1, 4), jnp.int32)
  params = dict(nn.unbox(model.init(jax.random.key(0), ids)["params"]))
  plain = model.apply({"params": params}, ids)
  params[teacher.PROJECTION_KEY] = teacher.init_transfer_params(kt(), STUDENT, WIDE_BERT,
                                                                jax.random.key(1))
  np.testing.assert_array_equal(model.apply({"params": params}, ids).hidden_states[-1],
                                plain.hidden_states[-1])


# ----------------------------------------------------------------------------- check_transfer
def test_check_transfer_resolves_a_teacher_of_every_other_shape():
  plan = teacher.check_transfer(kt(), stages(), STUDENT, WIDE_BERT, True)
  assert plan.projection == "shared" and plan.attention_transfer == "relation"
  assert plan.relation_heads == 4 and plan.needs_qkv   # gcd(32, 96) = 32, at most 6 heads
  assert plan.layer_map == (2, 3, 5, 6)
  assert plan.teacher_layers(2) == 3 and plan.teacher_layers(None) is None
  assert "relation (4 relation heads)" in plan.describe()
  same = teacher.check_transfer(kt(), stages(), STUDENT, preset("ib_bert_large_micro",
                                                                vocab_size=97), True)
  assert same.projection == "none" and same.attention_transfer == "per_head"
  assert not same.needs_qkv


def test_check_transfer_layer_map_errors():
  with pytest.raises(ValueError, match="kt.layer_map has 2 entries but the student has 4"):
    teacher.check_transfer(kt(layer_map=(1, 2)), stages(), STUDENT, WIDE_BERT, True)
  with pytest.raises(ValueError, match=r"kt.layer_map\[3\] = 7 \(student layer 4\).*1..6"):
    teacher.check_transfer(kt(layer_map=(1, 2, 3, 7)), stages(), STUDENT, WIDE_BERT, True)
  shallow = WIDE_BERT.replace(num_hidden_layers=2)
  with pytest.raises(ValueError, match=r"more layers \(4\) than the teacher \(2\).*kt.layer_map"):
    teacher.check_transfer(kt(), stages(), STUDENT, shallow, True)
  plan = teacher.check_transfer(kt(layer_map=(1, 1, 2, 2)), stages(), STUDENT, shallow, True)
  assert plan.teacher_layers(3) == 2


def test_check_transfer_attention_and_projection_errors():
  with pytest.raises(ValueError, match="student has 4 heads and the teacher 6.*'relation'"):
    teacher.check_transfer(kt(attention_transfer="per_head"), stages(), STUDENT, WIDE_BERT,
                           True)
  with pytest.raises(ValueError, match="kt.relation_heads=3 does not divide the student's "
                                       "Q/K/V width 32"):
    teacher.check_transfer(kt(relation_heads=3), stages(), STUDENT, WIDE_BERT, True)
  with pytest.raises(ValueError, match="64 wide and the teacher's 96.*feature_transfer="
                                       "'similarity'"):
    teacher.check_transfer(kt(feature_projection="none"), stages(), STUDENT, WIDE_BERT, True)
  # Terms no stage weights are not checked: PD alone reads neither features nor attention.
  plan = teacher.check_transfer(kt(attention_transfer="per_head", feature_projection="none"),
                                stages("pd_only"), STUDENT, WIDE_BERT, True)
  assert plan.attention_transfer == "none" and plan.projection == "none"
  similarity = teacher.check_transfer(kt(feature_transfer="similarity"), stages(), STUDENT,
                                      WIDE_BERT, True)
  assert similarity.projection == "none"


def test_check_transfer_refuses_kd_from_a_teacher_without_mlm_head():
  with pytest.raises(ValueError, match=r"stage\(s\) 'pd' weight the 'kd' term.*at /t/minilm "
                                       r"has no MLM head.*schedule.alpha=1.0"):
    teacher.check_transfer(kt(), stages(), STUDENT, WIDE_BERT, False, teacher_path="/t/minilm")
  plan = teacher.check_transfer(kt(), stages(alpha=1.0), STUDENT, WIDE_BERT, False)
  assert plan.attention_transfer == "relation"


def test_check_transfer_refuses_another_vocabulary():
  other = WIDE_BERT.replace(vocab_size=30522)
  with pytest.raises(ValueError, match=r"97 tokens \(data.vocab=train:2048\).*/t/bert has "
                                       r"30522 \(vocab file /t/bert/vocab.txt\).*set "
                                       r"data.vocab=/t/bert/vocab.txt"):
    teacher.check_transfer(kt(), stages(), STUDENT, other, True, teacher_path="/t/bert",
                           student_vocab="train:2048", teacher_vocab="/t/bert/vocab.txt")


# ----------------------------------------------------------------------------- presets
def _student(c) -> ModelConfig:
  d = c.model.to_dict()
  if d["vocab_size"] == -1:
    d["vocab_size"] = 30522
  return ModelConfig.from_dict(d).validate()


@pytest.mark.parametrize("name,heads,layer_map", [("bert_large", 16, ()),
                                                  ("bert_base", 8, "repeat")])
def test_full_size_presets_pass_the_checks(name, heads, layer_map):
  c = distill_mobilebert.get_config(f"teacher={name}")
  c.teacher.checkpoint = "/models/" + name
  assert c.data.vocab == "/models/" + name          # the student reads the teacher's vocabulary
  assert c.schedule.name == "pkt_tf2"               # embeddings cannot come from a wider teacher
  s_cfg, t_cfg = _student(c), preset(name)
  built = schedule.build_schedule(c.schedule, s_cfg.num_hidden_layers)
  plan = teacher.check_transfer(c.kt, built, s_cfg, t_cfg, True)
  assert plan.projection == "shared" and plan.relation_heads == heads
  if layer_map == "repeat":
    assert plan.layer_map == tuple(i for i in range(1, 13) for _ in range(2))
  else:
    assert plan.layer_map == tuple(range(1, 25))
  for stage in built:
    depth = plan.teacher_layers(stage.num_layers)
    assert depth is None or depth <= t_cfg.num_hidden_layers
  kernel = jax.eval_shape(lambda k: teacher.init_transfer_params(c.kt, s_cfg, t_cfg, k),
                          jax.random.key(0))["kernel"]
  assert kernel.shape == (512, t_cfg.hidden_size)


@pytest.mark.parametrize("name", ["bert_large", "bert_base"])
def test_smoke_presets_pass_the_checks_with_the_packaged_teacher(name):
  c = distill_mobilebert.get_config(f"teacher={name},smoke")
  if not c.teacher.checkpoint:
    pytest.skip(distill_mobilebert.packaged_teacher_problem())
  with open(os.path.join(c.teacher.checkpoint, "config.json")) as f:
    t_cfg = from_hf_config(json.load(f)).validate()
  assert c.data.vocab == c.teacher.checkpoint and c.schedule.alpha == 1.0
  s_cfg = _student(c)
  built = schedule.build_schedule(c.schedule, s_cfg.num_hidden_layers)
  plan = teacher.check_transfer(c.kt, built, s_cfg, t_cfg, teacher_has_mlm_head=False)
  assert plan.projection == "shared" and plan.attention_transfer == "relation"
  expected = (2, 3, 5, 6) if name == "bert_large" else (1, 2, 3, 3, 4, 5, 6, 6)
  assert plan.layer_map == expected
  c.schedule.alpha = 0.5
  with pytest.raises(ValueError, match="schedule.alpha=1.0"):
    teacher.check_transfer(c.kt, schedule.build_schedule(c.schedule, s_cfg.num_hidden_layers),
                           s_cfg, t_cfg, teacher_has_mlm_head=False)


def test_default_preset_is_unchanged():
  c = distill_mobilebert.get_config("smoke")
  assert c.schedule.name == "pkt" and c.data.vocab == "train:2048" and c.kt.layer_map == ()
  with pytest.raises(ValueError, match="teacher='gpt2'"):
    distill_mobilebert.get_config("teacher=gpt2")


def test_packaged_teacher_through_the_pre_compile_path_and_one_gradient():
  """What the loop will do with teacher=bert_large,smoke: open the real bare-encoder teacher,
  check, seed, add the projection, and differentiate one PKT stage's transfer terms."""
  from mbert_jax.distill import losses
  from mbert_jax.training import sharding
  c = distill_mobilebert.get_config("teacher=bert_large,smoke")
  if not c.teacher.checkpoint:
    pytest.skip(distill_mobilebert.packaged_teacher_problem())
  mesh, rules = sharding.make_mesh(c.mesh), sharding.rules_from_config(c.mesh)
  with pytest.warns(UserWarning, match="initialised fresh"):
    t = teacher.open_teacher(c.teacher, mesh, rules)
  assert t.layout == "BertModel" and not t.has_mlm_head and t.vocab_file.endswith("vocab.txt")
  s_cfg = _student(c)
  stages = schedule.build_schedule(c.schedule, s_cfg.num_hidden_layers)
  plan = teacher.check_transfer(c.kt, stages, s_cfg, t.config, t.has_mlm_head,
                                teacher_path=t.path, student_vocab=c.data.vocab,
                                teacher_vocab=t.vocab_file)
  params, _ = sharding.init_params(build(s_cfg), example_inputs(s_cfg), 0, mesh, rules)
  params, report = teacher.init_student_from_teacher(params, t.params, s_cfg, t.config,
                                                     c.teacher, teacher_fresh=t.fresh)
  # The bare encoder's heads were random: even the same-shape MLM output bias is not copied.
  assert report.copied == ()
  assert dict(report.skipped)["cls/predictions/output_bias"].startswith("missing in teacher")
  params = {**params, teacher.PROJECTION_KEY: teacher.init_transfer_params(
      c.kt, s_cfg, t.config, jax.random.key(0))}

  stage = stages[1]                        # pkt_tf2 layer 2: student depth 2, teacher depth 3
  t_layers = plan.teacher_layers(stage.num_layers)
  assert t_layers == 3
  ids = jnp.asarray(np.random.default_rng(0).integers(1000, 30000, (2, 16)), jnp.int32)
  mask = jnp.ones_like(ids).at[1, 10:].set(0)
  s_model, t_model = build(s_cfg), build(t.config)
  kt_cfg = {**c.kt.to_dict(), "num_student_layers": s_cfg.num_hidden_layers,
            "num_teacher_layers": t.config.num_hidden_layers}

  def loss(p):
    s_out = s_model.apply({"params": p}, ids, attention_mask=mask, num_layers=stage.num_layers,
                          heads=False, return_qkv=plan.needs_qkv)
    t_out = t_model.apply({"params": t.params}, ids, attention_mask=mask, num_layers=t_layers,
                          heads=False, return_qkv=plan.needs_qkv)
    terms = losses.transfer_losses(s_out, t_out, mask, kt_cfg, stage.transfer_layers,
                                   projection=p[teacher.PROJECTION_KEY])
    return sum(stage.weight(k) * jnp.sum(v) for k, v in terms.items())

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value) and value > 0
  for tree in (grads[teacher.PROJECTION_KEY], grads["encoder"]["layers"]["attention"]):
    leaves = [np.asarray(g) for g in jax.tree.leaves(tree)]
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert max(float(np.abs(g).max()) for g in leaves) > 0
