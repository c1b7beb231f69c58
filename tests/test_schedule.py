"""Schedule presets expand to the official strategies' stages; multipliers, LR and stage lookup."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mbert_jax.distill import schedule
from mbert_jax.distill.stage import GroupMultipliers, LRSchedule, Stage

L = 4  # student layers in these tests


def config(**overrides):
  c = schedule.default_schedule_config()
  c.steps_per_layer = 100
  c.distill_steps = 1000
  c.warmup_steps = 50
  c.update(overrides)
  return c


def bg(t, period):
  """Independent transcription of TF1's ramp min(0.9 + 0.1 sqrt(1 - t/P), 10 t/P)."""
  return min(0.9 + 0.1 * math.sqrt(1 - t / period), 10 * t / period)


def fake_params(num_layers=L, with_pooler=True):
  """A params tree following docs/CONTRACTS.md, encoder leaves stacked on a layer axis."""
  def z(*shape):
    return np.zeros(shape, np.float32)

  def dense(i, o, stacked=True):
    lead = (num_layers,) if stacked else ()
    return {"kernel": z(*lead, i, o), "bias": z(*lead, o)}

  def norm(h, stacked=True):
    lead = (num_layers,) if stacked else ()
    return {"scale": z(*lead, h), "bias": z(*lead, h)}

  layer = {
      "bottleneck_input": {"dense": dense(8, 4), "norm": norm(4)},
      "bottleneck_attention": {"dense": dense(8, 4), "norm": norm(4)},
      "attention": {"query": dense(4, 4), "key": dense(4, 4), "value": dense(8, 4),
                    "output": {"dense": dense(4, 4), "norm": norm(4)}},
      "ffn_0": {"intermediate": dense(4, 6), "output": {"dense": dense(6, 4), "norm": norm(4)}},
      "intermediate": dense(4, 6),
      "output": {"dense": dense(6, 4), "norm": norm(4),
                 "bottleneck": {"dense": dense(4, 8), "norm": norm(8)}},
  }
  params = {
      "embeddings": {"word_embeddings": {"embedding": z(11, 2)},
                     "embedding_transformation": dense(6, 8, stacked=False),
                     "position_embeddings": {"embedding": z(16, 8)},
                     "token_type_embeddings": {"embedding": z(2, 8)},
                     "norm": norm(8, stacked=False)},
      "encoder": {"layers": layer},
      "cls": {"predictions": {"transform": {"dense": dense(8, 8, stacked=False),
                                            "norm": norm(8, stacked=False)},
                              "extra_output_weights": z(11, 6), "output_bias": z(11)},
              "seq_relationship": dense(8, 2, stacked=False)},
  }
  if with_pooler:
    params["pooler"] = {"dense": dense(8, 8, stacked=False)}
  return params


def multipliers_by_group(stage, step, params=None):
  """{group: value at step or None}, checking every leaf of a group agrees."""
  tree = schedule.lr_multiplier_tree(stage, fake_params() if params is None else params)
  found = {}
  for path, fn in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None):
    name = "/".join(k.key for k in path)
    value = None if fn is None else np.asarray(fn(step))
    group = schedule.parameter_group(name)
    if group in found:
      if value is None or found[group] is None:
        assert value is None and found[group] is None, name
      else:
        np.testing.assert_allclose(value, found[group], rtol=1e-6, err_msg=name)
    found[group] = value
  return found


# ----------------------------------------------------------------------------------------------
# ramp and learning rates
# ----------------------------------------------------------------------------------------------

def test_phase_ramp_values():
  period = 1000
  assert float(schedule.phase_ramp(0, period)) == 0.0
  for t in (10, 50, 99, 100, 101, 500, 999, 1000):
    assert float(schedule.phase_ramp(t, period)) == pytest.approx(bg(t, period), rel=1e-6)
  # linear over the first ~10%, ~1.0 at its peak, then a slow decay to 0.9
  assert float(schedule.phase_ramp(50, period)) == pytest.approx(0.5)
  peak = max(float(schedule.phase_ramp(t, period)) for t in range(90, 110))
  assert 0.99 < peak <= 1.0
  assert float(schedule.phase_ramp(period, period)) == pytest.approx(0.9)
  decay = [float(schedule.phase_ramp(t, period)) for t in range(100, 1001, 100)]
  assert all(a >= b for a, b in zip(decay, decay[1:]))
  # traced steps work too (the trainer calls it inside jit)
  assert float(jax.jit(schedule.phase_ramp, static_argnums=1)(jnp.int32(50), period)) == \
      pytest.approx(0.5)


def test_linear_lr_warms_up_then_decays_from_step_zero():
  lr = LRSchedule("linear", base_lr=1.5e-3, warmup_steps=10_000, end_factor=1e-4)
  total = 500_000
  assert float(lr(0, total)) == 0.0
  assert float(lr(5_000, total)) == pytest.approx(0.75e-3)
  expected_at_warmup_end = 1.5e-3 * ((1 - 1e-4) * (1 - 10_000 / total) + 1e-4)
  assert float(lr(10_000, total)) == pytest.approx(expected_at_warmup_end, rel=1e-6)
  assert float(lr(10_000, total)) == pytest.approx(1.47e-3, rel=1e-3)  # decay runs from step 0
  assert float(lr(total, total)) == pytest.approx(1.5e-7, rel=1e-4)
  assert float(lr(2 * total, total)) == pytest.approx(1.5e-7, rel=1e-4)


def test_polynomial_and_constant_lr():
  poly = LRSchedule("polynomial", base_lr=1.0, end_factor=0.0, power=2.0)
  assert float(poly(25, 100)) == pytest.approx(0.75 ** 2)
  constant = LRSchedule("constant", base_lr=2e-3, warmup_steps=10)
  assert float(constant(5, 100)) == pytest.approx(1e-3)
  assert float(constant(10, 100)) == pytest.approx(2e-3)
  assert float(constant(99, 100)) == pytest.approx(2e-3)
  with pytest.raises(ValueError, match="lr kind"):
    LRSchedule("cosine")
  with pytest.raises(ValueError, match="base_lr"):
    LRSchedule("constant", base_lr=0.0)


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------

def check_pd_stage(stage, c, steps=None):
  assert stage.steps == (c.distill_steps if steps is None else steps)
  assert stage.num_layers is None
  assert stage.weight("mlm") == c.alpha and stage.weight("kd") == 1 - c.alpha
  assert stage.weight("nsp") == 1.0
  assert stage.multipliers == GroupMultipliers(1.0, 1.0, 1.0)
  assert stage.reset_optimizer and not stage.phase_ramp
  assert stage.lr == LRSchedule("linear", base_lr=c.learning_rate, warmup_steps=c.warmup_steps,
                                end_factor=1e-4)


def test_pkt_preset():
  c = config(name="pkt")
  stages = schedule.build_schedule(c, L)
  assert [s.name for s in stages] == [f"pkt_layer_{i}" for i in range(1, L + 1)] + ["pd"]
  for layer, stage in enumerate(stages[:-1], start=1):
    assert stage.steps == 100 and stage.num_layers == layer
    assert stage.transfer_layers == (layer,)
    assert dict(stage.loss_weights) == pytest.approx(
        {"fmt": 100 / L, "at": 1 / L, "mean": 5000 / L, "var": 5 / L})
    assert stage.loss_divisor == 1.0 and stage.reset_optimizer and stage.phase_ramp
    assert stage.lr == LRSchedule("constant", base_lr=1.5e-3) and stage.needs_teacher
    assert float(stage.learning_rate(37)) == pytest.approx(1.5e-3)
  check_pd_stage(stages[-1], c)
  assert schedule.total_steps(stages) == L * 100 + 1000


def test_pkt_multipliers_follow_tf1():
  stage = schedule.build_schedule(config(name="pkt"), L)[2]  # layer 3
  at_start = multipliers_by_group(stage, 0)
  assert at_start["embeddings"] is None and at_start["heads"] is None
  np.testing.assert_array_equal(at_start["encoder"], np.zeros(L))  # bg(0) = 0: moments reset
  for t in (5, 10, 60):
    ramp = bg(t, 100)
    np.testing.assert_allclose(multipliers_by_group(stage, t)["encoder"],
                               [0.3 * ramp, 0.3 * ramp, 3.0 * ramp, 0.0], rtol=1e-6)


def test_pkt_freeze_freezes_lower_layers():
  stages = schedule.build_schedule(config(name="pkt_freeze"), L)
  assert len(stages) == L + 1
  values = multipliers_by_group(stages[2], 60)
  np.testing.assert_allclose(values["encoder"], [0.0, 0.0, 3.0 * bg(60, 100), 0.0], rtol=1e-6)
  first = multipliers_by_group(stages[0], 60)["encoder"]
  np.testing.assert_allclose(first, [3.0 * bg(60, 100), 0, 0, 0], rtol=1e-6)


def test_pkt_tf2_preset():
  c = config(name="pkt_tf2")
  stages = schedule.build_schedule(c, L)
  assert len(stages) == L + 1
  for layer, stage in enumerate(stages[:-1], start=1):
    assert stage.num_layers == layer and stage.transfer_layers == (layer,)
    assert dict(stage.loss_weights) == {"fmt": 100.0, "at": 1.0, "mean": 5000.0, "var": 5.0}
    assert stage.loss_divisor == layer  # TF2: / (0-based stage_id + 1)
    assert stage.reset_optimizer and not stage.phase_ramp
    values = multipliers_by_group(stage, 0)
    assert float(values["embeddings"]) == 1.0 and values["heads"] is None
    np.testing.assert_array_equal(values["encoder"], [1.0] * layer + [0.0] * (L - layer))
  check_pd_stage(stages[-1], c)


def test_jkt_preset():
  c = config(name="jkt")
  transfer, pd = schedule.build_schedule(c, L)
  assert transfer.steps == L * 100  # default: PKT's budget
  assert transfer.transfer_layers == (1, 2, 3, 4) and transfer.num_layers is None
  assert dict(transfer.loss_weights) == pytest.approx(
      {"fmt": 100 / L, "at": 1 / L, "mean": 5000 / L, "var": 5 / L})
  values = multipliers_by_group(transfer, 0)
  assert values["embeddings"] is None and values["heads"] is None
  np.testing.assert_array_equal(values["encoder"], np.ones(L))  # no ramp
  check_pd_stage(pd, c)
  assert schedule.build_schedule(config(name="jkt", transfer_steps=77), L)[0].steps == 77


def test_akt_preset():
  c = config(name="akt", transfer_steps=300)
  (stage,) = schedule.build_schedule(c, L)
  assert stage.steps == 1000  # distill_steps is the whole akt run (config contract)
  assert stage.transfer_layers == (1, 2, 3, 4) and stage.needs_teacher
  assert dict(stage.loss_weights) == pytest.approx(
      {"mlm": 0.5, "kd": 0.5, "nsp": 1.0, "fmt": 100 / L, "at": 1 / L, "mean": 5000 / L,
       "var": 5 / L})
  values = multipliers_by_group(stage, 500)
  assert float(values["embeddings"]) == 1.0 and float(values["heads"]) == 1.0
  np.testing.assert_array_equal(values["encoder"], np.ones(L))
  assert stage.lr.kind == "linear" and stage.lr.warmup_steps == 50


def test_pd_only_and_scratch_presets():
  c = config(name="pd_only")
  (pd,) = schedule.build_schedule(c, L)
  check_pd_stage(pd, c)
  assert pd.needs_teacher and pd.alpha == 0.5 and pd.temperature == 1.0
  (scratch,) = schedule.build_schedule(config(name="scratch"), L)
  assert dict(scratch.loss_weights) == {"mlm": 1.0, "nsp": 1.0}
  assert not scratch.needs_teacher and scratch.alpha == 1.0
  assert scratch.steps == 1000
  (no_teacher,) = schedule.build_schedule(config(name="pd_only", alpha=1.0, nsp_factor=0.0), L)
  assert dict(no_teacher.loss_weights) == {"mlm": 1.0} and not no_teacher.needs_teacher


def test_schedule_config_errors():
  with pytest.raises(ValueError, match="unknown schedule 'nope'"):
    schedule.build_schedule(config(name="nope"), L)
  with pytest.raises(ValueError, match="unknown schedule config key"):
    schedule.build_schedule({"name": "pkt", "steps_per_phase": 3}, L)
  with pytest.raises(ValueError, match="steps must be an int >= 1"):
    schedule.build_schedule(config(name="pkt", steps_per_layer=0), L)
  with pytest.raises(ValueError, match="alpha"):
    schedule.build_schedule(config(name="pd_only", alpha=1.5), L)
  with pytest.raises(ValueError, match="num_student_layers"):
    schedule.build_schedule(config(), 0)


# ----------------------------------------------------------------------------------------------
# stage lookup
# ----------------------------------------------------------------------------------------------

def test_stage_at_boundaries():
  stages = schedule.build_schedule(config(name="pkt"), L)  # 4 x 100 + 1000
  assert schedule.stage_at(stages, 0) == (0, 0)
  assert schedule.stage_at(stages, 99) == (0, 99)
  assert schedule.stage_at(stages, 100) == (1, 0)
  assert schedule.stage_at(stages, 399) == (3, 99)
  assert schedule.stage_at(stages, 400) == (4, 0)
  assert schedule.stage_at(stages, 1399) == (4, 999)
  with pytest.raises(ValueError, match="past the end"):
    schedule.stage_at(stages, 1400)
  with pytest.raises(ValueError, match="global_step"):
    schedule.stage_at(stages, -1)
  with pytest.raises(ValueError, match="empty"):
    schedule.stage_at([], 0)


# ----------------------------------------------------------------------------------------------
# custom stages
# ----------------------------------------------------------------------------------------------

def test_custom_stages_build():
  c = config(name="custom", stages=[
      {"name": "warm", "steps": 20, "num_layers": 2, "transfer_layers": [1, 2],
       "loss_weights": {"fmt": 1.0, "at": 0.5}, "phase_ramp": True,
       "lr_multipliers": {"embeddings": None, "encoder": [1.0, 2.0, 5.0, 5.0], "heads": 0.0}},
      {"steps": 30, "loss_weights": {"mlm": 0.3, "kd": 0.7, "fmt": 0.1},
       "transfer_layers": "all", "reset_optimizer": False, "temperature": 2.0,
       "lr": {"kind": "polynomial", "warmup_steps": 5, "power": 2.0, "end_factor": 0.0}},
  ])
  warm, second = schedule.build_schedule(c, L)
  assert warm.name == "warm" and second.name == "stage_1"
  assert warm.multipliers.heads is None  # static 0 = frozen, no optimizer state
  # layers 3, 4 do not run (num_layers=2), so their gate is 0 whatever the spec says
  np.testing.assert_allclose(multipliers_by_group(warm, 10)["encoder"],
                             np.array([1.0, 2.0, 0.0, 0.0]) * bg(10, 20), rtol=1e-6)
  assert second.transfer_layers == (1, 2, 3, 4) and not second.reset_optimizer
  assert second.alpha == pytest.approx(0.3) and second.temperature == 2.0
  assert second.lr.base_lr == c.learning_rate and second.lr.kind == "polynomial"


@pytest.mark.parametrize("stage,message", [
    ({"steps": 10, "loss_weights": {"mse": 1.0}}, "unknown loss term"),
    ({"steps": 10, "loss_weights": {"mlm": 1.0}, "lr_multipliers": {"pooler": 1.0}},
     "unknown parameter group"),
    ({"steps": -5, "loss_weights": {"mlm": 1.0}}, "steps must be an int >= 1"),
    ({"loss_weights": {"mlm": 1.0}}, "'steps' is required"),
    ({"steps": 10, "loss_weights": {"mlm": 1.0}, "optimizer": "sgd"}, "unknown key"),
    ({"steps": 10, "loss_weights": {"mlm": -1.0}}, "weight of 'mlm'"),
    ({"steps": 10, "loss_weights": {"mlm": 0.0}}, "every loss weight is 0"),
    ({"steps": 10, "loss_weights": {"fmt": 1.0}}, "need transfer_layers"),
    ({"steps": 10, "loss_weights": {"mlm": 1.0}, "transfer_layers": [1]}, "no layer-wise term"),
    ({"steps": 10, "loss_weights": {"fmt": 1.0}, "transfer_layers": [9]}, "exceed"),
    ({"steps": 10, "loss_weights": {"fmt": 1.0}, "transfer_layers": [3], "num_layers": 2},
     "deeper than num_layers"),
    ({"steps": 10, "loss_weights": {"mlm": 1.0}, "num_layers": 2}, "full encoder"),
    ({"steps": 10, "loss_weights": {"mlm": 1.0}, "lr_multipliers": {"encoder": [1.0, 1.0]}},
     "student has 4"),
    ({"steps": 10, "loss_weights": {"mlm": 1.0}, "lr_multipliers": {"heads": -1.0}},
     "heads lr multiplier"),
    ({"steps": 10, "loss_weights": {"mlm": 1.0}, "lr": {"kind": "cosine"}}, "lr kind"),
    ({"steps": 10, "loss_weights": {"mlm": 1.0}, "lr": {"decay": 3}}, "unknown lr key"),
    ({"steps": 10, "loss_weights": {"mlm": 1.0}, "lr": {"warmup_steps": 11}}, "exceeds"),
    ({"steps": 10, "loss_weights": {"mlm": 1.0}, "loss_divisor": 0}, "loss_divisor"),
])
def test_custom_stage_validation(stage, message):
  with pytest.raises(ValueError, match=message):
    schedule.build_schedule(config(name="custom", stages=[stage]), L)


def test_custom_needs_stages():
  with pytest.raises(ValueError, match="non-empty 'stages'"):
    schedule.build_schedule(config(name="custom"), L)


# ----------------------------------------------------------------------------------------------
# multiplier tree
# ----------------------------------------------------------------------------------------------

def test_multiplier_tree_covers_every_leaf_with_the_right_shape():
  params = fake_params()
  stage = schedule.build_schedule(config(name="pd_only"), L)[0]
  tree = schedule.lr_multiplier_tree(stage, params)
  assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(params)
  for (path, leaf), fn in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree_util.tree_leaves(tree)):
    name = "/".join(k.key for k in path)
    expected_shape = (L,) if name.startswith("encoder/") else ()
    assert np.shape(fn(3)) == expected_shape, name


def test_multiplier_tree_accepts_shape_structs_and_frozen_groups():
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fake_params())
  stage = schedule.build_schedule(config(name="jkt"), L)[0]
  tree = schedule.lr_multiplier_tree(stage, abstract)
  flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)
  assert flat
  for path, fn in flat:
    name = "/".join(k.key for k in path)
    assert (fn is None) == (not name.startswith("encoder/")), name


def test_multiplier_tree_rejects_unknown_leaves_and_layer_count_mismatch():
  stage = schedule.build_schedule(config(name="pkt"), L)[0]
  params = fake_params()
  params["teacher"] = {"w": np.zeros(3)}
  with pytest.raises(ValueError, match="'teacher/w' matches no parameter group"):
    schedule.lr_multiplier_tree(stage, params)
  with pytest.raises(ValueError, match="encoder parameters have 6"):
    schedule.lr_multiplier_tree(stage, fake_params(num_layers=6))
  stage_scalar = Stage("s", 10, {"mlm": 1.0}, multipliers=GroupMultipliers(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="no leading layer axis"):
    schedule.lr_multiplier_tree(stage_scalar, {"encoder": {"w": np.float32(0.0)}})


def test_stage_is_hashable_and_immutable():
  a, b = (schedule.build_schedule(config(name="pkt"), L)[1] for _ in range(2))
  assert a == b and hash(a) == hash(b)
  assert len({a, b}) == 1
  with pytest.raises(TypeError):
    a.loss_weights["fmt"] = 0.0  # type: ignore[index]
  with pytest.raises(Exception):
    a.steps = 3  # type: ignore[misc]
  assert a.teacher_num_layers(L, 2 * L) == 4  # student layer 2 -> teacher layer 4
  assert schedule.build_schedule(config(name="pd_only"), L)[0].teacher_num_layers(L, 8) is None


def test_config_is_a_configdict_with_official_defaults():
  c = schedule.default_schedule_config()
  assert isinstance(c, ml_collections.ConfigDict)
  assert (c.name, c.steps_per_layer, c.distill_steps, c.learning_rate, c.warmup_steps) == (
      "pkt", 10_000, 500_000, 1.5e-3, 10_000)
  assert (c.hidden_distill_factor, c.beta_distill_factor, c.gamma_distill_factor,
          c.attention_distill_factor, c.alpha, c.temperature) == (100, 5000, 5, 1, 0.5, 1.0)
  stages = schedule.build_schedule(c, 24)
  assert schedule.total_steps(stages) == 740_000  # 24 PKT phases x 10k + 500k PD
