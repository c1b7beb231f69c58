"""Tests for mbert_jax.training.optim against an independent numpy transcription of TF1 MobileBERT's
``lamb_optimizer.py`` / ``AdamWeightDecayOptimizer`` (one TF variable per layer, as TF1 has)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mbert_jax.training import optim

L = 3  # layers in the stacked encoder leaves


def _tree():
  """Small parameter tree shaped like docs/CONTRACTS.md, slices of very different scales."""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(L, 4, 4)).astype(np.float32)
  kernel *= np.array([10.0, 1.0, 0.1], np.float32)[:, None, None]
  return {
    "embeddings": {
      "word_embeddings": {"embedding": rng.normal(size=(6, 4)).astype(np.float32)},
      "norm": {"scale": np.ones(4, np.float32), "bias": rng.normal(size=4).astype(np.float32)},
    },
    "encoder": {"layers": {
      "attention": {"query": {"kernel": kernel,
                  "bias": rng.normal(size=(L, 4)).astype(np.float32)}},
      "output": {"norm": {"scale": (1 + 0.1 * rng.normal(size=(L, 4))).astype(np.float32),
                "bias": rng.normal(size=(L, 4)).astype(np.float32)}},
    }},
    "cls": {"predictions": {
      "extra_output_weights": rng.normal(size=(6, 2)).astype(np.float32),
      "output_bias": rng.normal(size=6).astype(np.float32),
    }},
  }


def _flat(tree):
  return {optim.param_path(kp): np.asarray(x)
      for kp, x in jax.tree_util.tree_leaves_with_path(tree)}


def _grads(step, scale=1.0):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda x: (scale * rng.normal(size=x.shape)).astype(np.float32), _tree())


# ---------------------------------------------------------------- numpy TF1 reference


def _tf1_excluded(name):
  # TF1 regexes: "LayerNorm", "layer_norm", "bias" (FakeLayerNorm ⊂ LayerNorm); our norm
  # modules are named "norm", so the reference spells that rule out independently.
  return "bias" in name or "/norm/" in name


def _tf1_reference(params, grads_seq, lrs, mult_seq, *, wd=0.01, clip=1.0, adapt=True,
         b1=0.9, b2=0.999, eps=1e-6):
  """TF1 update loop in float64. Stacked leaves become L separate TF1 variables.

  mult_seq[t][path] is None (variable not trained), a float, or a per-layer list.
  Returns final flat params and moments (re-stacked).
  """
  variables, m, v, layers = {}, {}, {}, {}
  for path, x in _flat(params).items():
    if path.startswith("encoder/layers/"):
      names = [f"{path}@layer_{l}" for l in range(x.shape[0])]
      for l, name in enumerate(names):
        variables[name] = x[l].astype(np.float64)
      layers[path] = names
    else:
      variables[path] = x.astype(np.float64)
      layers[path] = [path]
    for name in layers[path]:
      m[name] = np.zeros_like(variables[name])
      v[name] = np.zeros_like(variables[name])
  ratios = []
  for t, grads in enumerate(grads_seq):
    g = {}
    for path, x in _flat(grads).items():
      stacked = path.startswith("encoder/layers/")
      for l, name in enumerate(layers[path]):
        g[name] = np.asarray(x[l] if stacked else x, np.float64)
    # tf.clip_by_global_norm over every gradient, trained or not.
    if clip:
      global_norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
      g = {k: x * clip / max(global_norm, clip) for k, x in g.items()}
    step_ratios = {}
    for path, names in layers.items():
      mult = mult_seq[t][path]
      if mult is None:
        continue
      for l, name in enumerate(names):
        k = mult[l] if isinstance(mult, (list, tuple)) else mult
        gate = 1.0 if k > 0 else 0.0
        param = variables[name]
        m[name] = gate * (b1 * m[name] + (1 - b1) * g[name])
        v[name] = gate * (b2 * v[name] + (1 - b2) * g[name] ** 2)
        update = m[name] / (np.sqrt(v[name]) + eps)
        if not _tf1_excluded(name):
          update = update + gate * wd * param
        ratio = 1.0
        if adapt and not _tf1_excluded(name):
          w_norm, u_norm = np.linalg.norm(param), np.linalg.norm(update)
          ratio = w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0
        step_ratios[name] = ratio
        variables[name] = param - k * ratio * lrs[t] * update
    ratios.append(step_ratios)

  def restack(d):
    return {path: (np.stack([d[n] for n in names]) if path.startswith("encoder/layers/")
           else d[names[0]]) for path, names in layers.items()}

  return restack(variables), restack(m), restack(v), ratios


def _run(tx, params, grads_seq):
  state = tx.init(params)
  update = jax.jit(tx.update)
  p = jax.tree.map(jnp.asarray, params)
  for grads in grads_seq:
    u, state = update(grads, state, p)
    p = optax.apply_updates(p, u)
  return p, state


def _gated_state(state):
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optim.GatedAdamState))
      if isinstance(s, optim.GatedAdamState)]
  assert len(found) == 1
  return found[0]


def _cfg(**kw):
  cfg = optim.default_optimizer_config()
  cfg.update(kw)
  return cfg


def _assert_close(actual_tree, expected_flat, rtol=2e-5, atol=1e-7):
  actual = _flat(actual_tree)
  assert set(actual) == set(expected_flat)
  for path, want in expected_flat.items():
    np.testing.assert_allclose(actual[path], want, rtol=rtol, atol=atol, err_msg=path)


# ---------------------------------------------------------------- LAMB


def test_lamb_matches_tf1_reference_with_per_layer_trust_ratio():
  params = _tree()
  steps = 5
  cfg = _cfg(learning_rate=0.05, schedule="linear", warmup_steps=2, total_steps=10,
       end_factor=1e-4, clip_norm=1.0)
  # Large gradients so that clipping is active on every step.
  grads_seq = [_grads(t, scale=3.0) for t in range(steps)]
  lrs = [float(optim.learning_rate_at(cfg, t)) for t in range(steps)]
  assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.025)

  p, state = _run(optim.build_optimizer(cfg, params), params, grads_seq)
  mults = [{path: 1.0 for path in _flat(params)}] * steps
  want_p, want_m, want_v, ratios = _tf1_reference(params, grads_seq, lrs, mults)
  _assert_close(p, want_p)
  st = _gated_state(state)
  _assert_close(st.mu, want_m)
  _assert_close(st.nu, want_v)
  assert int(st.count) == steps

  # The test only discriminates per-slice from stacked norms if the slices' ratios differ.
  r = [ratios[-1][f"encoder/layers/attention/query/kernel@layer_{l}"] for l in range(L)]
  assert max(r) / min(r) > 10
  # Excluded leaves were moved without trust ratio or decay; adapted leaves with ratio != 1.
  assert ratios[-1]["cls/predictions/output_bias"] == 1.0
  assert ratios[-1]["embeddings/norm/scale"] == 1.0
  assert ratios[-1]["cls/predictions/extra_output_weights"] != 1.0
  assert ratios[-1]["embeddings/word_embeddings/embedding"] != 1.0


def test_exclusion_rules():
  ex = optim.excluded_from_decay
  for path in ["embeddings/norm/scale", "embeddings/norm/bias", "encoder/layers/output/norm/scale",
        "encoder/layers/attention/query/bias", "cls/predictions/output_bias",
        "cls/predictions/transform/norm/scale", "classifier/LayerNorm_0/scale"]:
    assert ex(path), path
  for path in ["embeddings/word_embeddings/embedding", "cls/predictions/extra_output_weights",
        "encoder/layers/attention/query/kernel", "cls/seq_relationship/kernel",
        "embeddings/position_embeddings/embedding"]:
    assert not ex(path), path


# ---------------------------------------------------------------- multipliers, gate, freezing


def _pkt_mult(layer_count, steps_per_phase):
  """Current layer ×3, finished layers ×0.3, later layers 0 (spec §9.2 without the ramp)."""
  def fn(step):
    phase = step // steps_per_phase
    idx = jnp.arange(layer_count)
    return jnp.where(idx == phase, 3.0, jnp.where(idx < phase, 0.3, 0.0))
  return fn


def _pkt_mult_np(step, steps_per_phase):
  phase = step // steps_per_phase
  return [3.0 if l == phase else (0.3 if l < phase else 0.0) for l in range(L)]


def test_layer_gate_frozen_leaves_and_pkt_multipliers_match_reference():
  params = _tree()
  spp = 2
  layer_fn = _pkt_mult(L, spp)
  multipliers = {
    "embeddings": jax.tree.map(lambda _: None, params["embeddings"]),
    "encoder": jax.tree.map(lambda _: layer_fn, params["encoder"]),
    "cls": {"predictions": {"extra_output_weights": None, "output_bias": 0.5}},
  }
  cfg = _cfg(learning_rate=0.01, schedule="constant", warmup_steps=0, clip_norm=1.0)
  tx = optim.build_optimizer(cfg, params, multipliers)

  # Frozen leaves hold no optimizer state: no state array has a frozen leaf's shape.
  state = tx.init(params)
  shapes = [x.shape for x in jax.tree.leaves(state)]
  assert (6, 4) not in shapes and (6, 2) not in shapes and (4,) not in shapes
  trained = [x for kp, x in jax.tree_util.tree_leaves_with_path(params)
       if not optim.param_path(kp).startswith("embeddings/")
       and not optim.param_path(kp).endswith("extra_output_weights")]
  assert len(jax.tree.leaves(state)) == 1 + 2 * len(trained)  # count + mu + nu

  update = jax.jit(tx.update)
  p = jax.tree.map(jnp.asarray, params)
  kernel0 = params["encoder"]["layers"]["attention"]["query"]["kernel"]
  grads_seq = [_grads(t, scale=3.0) for t in range(3 * spp)]
  for t, grads in enumerate(grads_seq):
    u, state = update(grads, state, p)
    p = optax.apply_updates(p, u)
    for path, x in _flat(u).items():
      if path.startswith("embeddings/") or path.endswith("extra_output_weights"):
        assert not np.any(x), path
    k = np.asarray(p["encoder"]["layers"]["attention"]["query"]["kernel"])
    mu = np.asarray(_gated_state(state).mu["encoder"]["layers"]["attention"]["query"]["kernel"])
    nu = np.asarray(_gated_state(state).nu["encoder"]["layers"]["attention"]["query"]["kernel"])
    active = t // spp  # layers above this one have multiplier 0 so far
    for l in range(L):
      if l > active:
        np.testing.assert_array_equal(k[l], kernel0[l])
        assert not mu[l].any() and not nu[l].any()
      else:
        assert not np.allclose(k[l], kernel0[l]), (t, l)
        assert mu[l].any()

  mults = []
  for t in range(len(grads_seq)):
    d = {}
    for path in _flat(params):
      if path.startswith("embeddings/") or path.endswith("extra_output_weights"):
        d[path] = None
      elif path.startswith("encoder/"):
        d[path] = _pkt_mult_np(t, spp)
      else:
        d[path] = 0.5
    mults.append(d)
  want_p, want_m, _, _ = _tf1_reference(params, grads_seq, [0.01] * len(grads_seq), mults)
  _assert_close(p, want_p)
  st = _gated_state(state)
  got_m = {k: v for k, v in _flat(st.mu).items()}
  for path, want in want_m.items():
    if mults[0][path] is not None:
      np.testing.assert_allclose(got_m[path], want, rtol=2e-5, atol=1e-8, err_msg=path)


def test_clipping_counts_frozen_gradients():
  params = {"frozen": {"kernel": jnp.ones((3, 3))}, "dense": {"kernel": jnp.ones((2, 2))}}
  grads = {"frozen": {"kernel": jnp.full((3, 3), 4.0)}, "dense": {"kernel": jnp.ones((2, 2))}}
  mult = {"frozen": {"kernel": None}, "dense": {"kernel": 1.0}}
  cfg = _cfg(name="adamw_tf1", learning_rate=0.1, schedule="constant", warmup_steps=0,
       clip_norm=1.0)
  tx = optim.build_optimizer(cfg, params, mult)
  u, state = tx.update(grads, tx.init(params), params)
  global_norm = math.sqrt(9 * 16 + 4 * 1)
  mu = _gated_state(state).mu["dense"]["kernel"]
  np.testing.assert_allclose(mu, 0.1 * 1.0 / global_norm, rtol=1e-6)
  assert not np.any(u["frozen"]["kernel"])

  # clip_norm=0 disables clipping.
  tx = optim.build_optimizer(_cfg(**{**cfg.to_dict(), "clip_norm": 0.0}), params, mult)
  _, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(_gated_state(state).mu["dense"]["kernel"], 0.1, rtol=1e-6)


def test_multiplier_shape_errors():
  params = _tree()
  cfg = _cfg()
  mult = jax.tree.map(lambda _: 1.0, params)
  mult["cls"]["predictions"]["output_bias"] = lambda s: jnp.ones(L)
  with pytest.raises(ValueError, match="output_bias.*per-layer"):
    optim.build_optimizer(cfg, params, mult)
  mult = jax.tree.map(lambda _: 1.0, params)
  mult["encoder"]["layers"]["attention"]["query"]["kernel"] = lambda s: jnp.ones(L + 1)
  with pytest.raises(ValueError, match="query/kernel.*expected"):
    optim.build_optimizer(cfg, params, mult)
  mult = jax.tree.map(lambda _: 1.0, params)
  del mult["cls"]
  with pytest.raises(ValueError, match="does not match params"):
    optim.build_optimizer(cfg, params, mult)
  with pytest.raises(ValueError, match="every parameter is frozen"):
    optim.build_optimizer(cfg, params, jax.tree.map(lambda _: None, params))


# ---------------------------------------------------------------- AdamW / Adam


def test_adamw_matches_optax_with_exclusions():
  params = _tree()
  cfg = _cfg(name="adamw", learning_rate=0.01, eps=1e-8, schedule="linear", warmup_steps=0,
       total_steps=10, end_factor=0.0, clip_norm=None)
  grads_seq = [_grads(t) for t in range(3)]
  p, _ = _run(optim.build_optimizer(cfg, params), params, grads_seq)
  mask = jax.tree_util.tree_map_with_path(
    lambda kp, _: not optim.excluded_from_decay(optim.param_path(kp)), params)
  ref = optax.adamw(optim.lr_schedule_from_config(cfg), b1=0.9, b2=0.999, eps=1e-8,
           weight_decay=0.01, mask=mask)
  want, _ = _run(ref, params, grads_seq)
  _assert_close(p, _flat(want), rtol=1e-5, atol=1e-7)


def test_adamw_tf1_matches_reference_and_skips_excluded_decay():
  params = _tree()
  cfg = _cfg(name="adamw_tf1", learning_rate=0.01, schedule="constant", warmup_steps=0)
  grads_seq = [_grads(t) for t in range(3)]
  p, _ = _run(optim.build_optimizer(cfg, params), params, grads_seq)
  mults = [{path: 1.0 for path in _flat(params)}] * 3
  want_p, _, _, _ = _tf1_reference(params, grads_seq, [0.01] * 3, mults, adapt=False)
  _assert_close(p, want_p)

  # Zero gradients: only decoupled weight decay acts, and only on non-excluded leaves.
  zeros = jax.tree.map(np.zeros_like, params)
  p, _ = _run(optim.build_optimizer(cfg, params), params, [zeros])
  for path, x in _flat(p).items():
    x0 = _flat(params)[path]
    if optim.excluded_from_decay(path):
      np.testing.assert_array_equal(x, x0, err_msg=path)
    else:
      np.testing.assert_allclose(x, x0 * (1 - 0.01 * 0.01), rtol=1e-6, err_msg=path)


def test_adam_is_bias_corrected_without_decay():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.25])}
  cfg = _cfg(name="adam", weight_decay=0.0, learning_rate=0.1, schedule="constant",
       warmup_steps=0, clip_norm=None)
  p, _ = _run(optim.build_optimizer(cfg, params), params, [grads])
  # First bias-corrected Adam step moves every coordinate by lr·g/(|g|+ε) ≈ lr.
  np.testing.assert_allclose(p["w"], [0.9, -2.1], rtol=1e-5)


def test_state_is_fp32_for_bf16_params_and_deterministic():
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _tree())
  tx = optim.build_optimizer(_cfg(warmup_steps=0, learning_rate=0.01), params)
  state = tx.init(params)
  assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state))
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _grads(0))
  update = jax.jit(tx.update)
  u1, s1 = update(grads, state, params)
  u2, s2 = update(grads, state, params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u1))
  for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
    np.testing.assert_array_equal(a, b)
  assert int(optim.optimizer_step(s1)) == 1


# ---------------------------------------------------------------- schedules


def test_tf1_pd_schedule_values():
  sched = optim.make_lr_schedule("linear", 1.5e-3, 500_000, warmup_steps=10_000,
                 end_factor=1e-4)
  jitted = jax.jit(sched)
  expect = {
    0: 0.0,
    5_000: 7.5e-4,
    9_999: 1.5e-3 * 9_999 / 10_000,
    10_000: (1.5e-3 - 1.5e-7) * (1 - 0.02) + 1.5e-7,   # ≈ 1.47e-3, decay measured from 0
    250_000: (1.5e-3 - 1.5e-7) * 0.5 + 1.5e-7,
    500_000: 1.5e-7,
    600_000: 1.5e-7,
  }
  for step, want in expect.items():
    assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), step
    assert float(jitted(jnp.asarray(step, jnp.int32))) == pytest.approx(want, rel=1e-5,
                                      abs=1e-12)
  assert float(sched(10_000)) == pytest.approx(1.47e-3, rel=1e-3)
  assert float(optim.learning_rate_at(optim.default_optimizer_config(), 10_000)) == \
    pytest.approx(float(sched(10_000)))


def test_other_schedules():
  # PKT: constant 1.5e-3 expressed as TF1 polynomial decay with end_lr_rate 1.
  pkt = optim.make_lr_schedule("linear", 1.5e-3, 240_000, end_factor=1.0)
  assert float(pkt(0)) == pytest.approx(1.5e-3) and float(pkt(123_456)) == pytest.approx(1.5e-3)
  const = optim.make_lr_schedule("constant", 2e-3, warmup_steps=4)
  assert [float(const(s)) for s in (0, 2, 4, 1000)] == pytest.approx([0.0, 1e-3, 2e-3, 2e-3])
  poly = optim.make_lr_schedule("polynomial", 1.0, 100, end_factor=0.1, power=2.0)
  assert float(poly(50)) == pytest.approx(0.9 * 0.25 + 0.1)
  cos = optim.make_lr_schedule("cosine", 1.0, 110, warmup_steps=10, end_factor=0.0)
  assert float(cos(5)) == pytest.approx(0.5)
  assert float(cos(10)) == pytest.approx(1.0)
  assert float(cos(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(cos(110)) == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- accumulation


def _linear_loss(params, batch):
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2)


def test_grad_accumulation_equals_one_big_batch_step():
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
       "b": jnp.zeros(2, jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
      "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
  grad_fn = jax.value_and_grad(_linear_loss)
  loss_big, g_big = grad_fn(params, batch)
  loss_acc, g_acc = jax.jit(
    lambda p, b: optim.accumulate_gradients(grad_fn, p, b, 4))(params, batch)
  np.testing.assert_allclose(loss_acc, loss_big, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_big)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  cfg = _cfg(warmup_steps=0, learning_rate=0.01)
  tx = optim.build_optimizer(cfg, params)
  state = tx.init(params)
  u_big, _ = tx.update(g_big, state, params)
  u_acc, _ = tx.update(g_acc, state, params)
  for a, b in zip(jax.tree.leaves(u_acc), jax.tree.leaves(u_big)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)

  # With an rng, micro-batch i sees fold_in(rng, i); integer outputs are summed.
  key = jax.random.PRNGKey(7)
  out = optim.accumulate_gradients(
    lambda p, b, r: (jax.random.uniform(r), jnp.asarray(b["x"].shape[0], jnp.int32)),
    params, batch, 4, rng=key)
  want = np.mean([float(jax.random.uniform(jax.random.fold_in(key, i))) for i in range(4)])
  assert float(out[0]) == pytest.approx(want, rel=1e-6)
  assert int(out[1]) == 8

  with pytest.raises(ValueError, match="'x'.*cannot be split into 3"):
    optim.accumulate_gradients(grad_fn, params, batch, 3)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize("override, message", [
  ({"name": "sgd"}, "unknown optimizer name 'sgd'"),
  ({"learning_rate": -1e-3}, "learning_rate must be >= 0"),
  ({"b2": 1.0}, "b2 must be < 1"),
  ({"eps": 0.0}, "eps must be > 0"),
  ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
  ({"name": "adam"}, "'adam' has no weight decay"),
  ({"clip_norm": -1.0}, "clip_norm must be >= 0"),
  ({"schedule": "step"}, "unknown learning-rate schedule 'step'"),
  ({"warmup_steps": 600_000}, "warmup_steps .* must not exceed total_steps"),
  ({"total_steps": 0}, "needs total_steps > 0"),
  ({"power": 2.0}, "'linear' has power 1"),
  ({"warmup_steps": 1.5}, "warmup_steps must be an integer"),
])
def test_bad_config_errors(override, message):
  # A plain dict: ConfigDict's own type check would reject some of these before we see them.
  cfg = optim.default_optimizer_config().to_dict()
  cfg.update(override)
  with pytest.raises(ValueError, match=message):
    optim.validate_optimizer_config(cfg)
  with pytest.raises(ValueError, match=message):
    optim.build_optimizer(cfg, {"w": jnp.ones(2)})


def test_config_field_set_errors():
  cfg = optim.default_optimizer_config().to_dict()
  cfg["lr"] = 1.0
  with pytest.raises(ValueError, match=r"unknown fields \['lr'\]"):
    optim.validate_optimizer_config(cfg)
  del cfg["lr"], cfg["b1"]
  with pytest.raises(ValueError, match=r"missing fields \['b1'\]"):
    optim.validate_optimizer_config(cfg)
  assert optim.validate_optimizer_config(optim.default_optimizer_config()).name == "lamb"
