"""The Flax model family without torch: a numpy transcription of the spec's equations (§4.1,
§4.2, §5) as the reference for the IB-BERT teacher (which Hugging Face cannot build) and the
student, gradients reaching every parameter, parameter counts and FLOPs of the full presets,
config validation, truncation, unrolled/remat/bf16 variants and the masked-position gather."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mbert_jax.models import ModelConfig, build, preset
from mbert_jax.models.summary import forward_flops, param_shapes, param_table

B, T, P = 3, 9, 4
NEG = float(np.finfo(np.float32).min)
KEY_BIAS = "encoder/layers/attention/key/bias"


# ----------------------------------------------------------------------------- helpers
def random_params(cfg: ModelConfig, seed: int = 1):
  """Every leaf random, in the tree layout `model.init` produces (shapes from `eval_shape`).

  Random rather than init values because init's zero biases and identity norms would hide a
  mix-up of them; and no init compile, which costs seconds on CPU.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for path, shape in param_shapes(cfg).items():
    noise = rng.standard_normal(shape).astype(np.float32)
    if path.endswith("/scale"):
      out[path] = 1.0 + 0.3 * noise
    elif path.endswith("/bias") or path.endswith("output_bias"):
      out[path] = 0.1 * noise
    else:
      out[path] = 0.08 * noise
  return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in out.items()})


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg: ModelConfig):
  # Op-by-op (un-jitted) execution compiles every primitive separately: far slower on CPU.
  return jax.jit(build(cfg).apply, static_argnames=("deterministic", "num_layers"))


def batch(cfg: ModelConfig, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  ids = np.where(mask == 1, ids, cfg.pad_token_id).astype(np.int32)
  types = (np.arange(T)[None] >= 4).astype(np.int32) * mask
  positions = np.stack([rng.choice(T, P, replace=False) for _ in range(B)]).astype(np.int32)
  return ids, types, mask, positions


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run(cfg, params, ids, types, mask, positions=None, **kw):
  return _jitted_apply(cfg)({"params": params}, jnp.asarray(ids), jnp.asarray(types),
                          jnp.asarray(mask), None if positions is None else jnp.asarray(positions),
                          **kw)


# ----------------------------------------------------------------------------- numpy reference
def np_reference(cfg: ModelConfig, params, ids, types, mask, positions):
  """Spec §4.1 (embeddings), §4.2 (block, all three Q/K/V branches), §5 (pooler, MLM, NSP),
  float64, written from the TF1 pseudo-code rather than from the Flax module."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  eps = cfg.layer_norm_eps

  def norm(x, n, e=eps):
    if cfg.normalization_type == "no_norm":
      return x * n["scale"] + n["bias"]
    return layer_norm(x, n, e)

  def layer_norm(x, n, e=eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + e) * n["scale"] + n["bias"]

  def act(x):
    if cfg.hidden_act == "gelu_new":
      return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if cfg.hidden_act == "relu":
      return np.maximum(x, 0)
    raise NotImplementedError(cfg.hidden_act)

  def dense(x, d):
    return x @ d["kernel"] + d["bias"]

  emb = p["embeddings"]
  e = emb["word_embeddings"]["embedding"][ids]
  if cfg.trigram_input:
    zero = np.zeros_like(e[:, :1])
    e = np.concatenate([np.concatenate([e[:, 1:], zero], 1), e,
                        np.concatenate([zero, e[:, :-1]], 1)], -1)
  x = dense(e, emb["embedding_transformation"])
  x = (x + emb["position_embeddings"]["embedding"][:T][None]
       + emb["token_type_embeddings"]["embedding"][types])
  x = norm(x, emb["norm"])
  hidden, scores = [x], []

  n_heads, hd = cfg.num_attention_heads, cfg.head_dim
  bias = (1.0 - mask[:, None, None, :].astype(np.float64)) * NEG
  for layer in range(cfg.num_hidden_layers):
    w = jax.tree.map(lambda a: a[layer], p["encoder"]["layers"])
    layer_input = norm(dense(x, w["bottleneck_input"]["dense"]), w["bottleneck_input"]["norm"])
    if cfg.use_bottleneck_attention:
      q_in = k_in = v_in = layer_input
    elif cfg.key_query_shared_bottleneck:
      q_in = k_in = norm(dense(x, w["bottleneck_attention"]["dense"]),
                         w["bottleneck_attention"]["norm"])
      v_in = x
    else:  # IB-BERT teacher
      q_in = k_in = v_in = x
    heads = lambda t: t.reshape(B, T, n_heads, hd)
    q = heads(dense(q_in, w["attention"]["query"]))
    k = heads(dense(k_in, w["attention"]["key"]))
    v = heads(dense(v_in, w["attention"]["value"]))
    s = np.einsum("bfnh,btnh->bnft", q, k) / math.sqrt(hd) + bias
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("bnft,btnh->bfnh", probs, v).reshape(B, T, n_heads * hd)
    a = norm(dense(ctx, w["attention"]["output"]["dense"]) + layer_input,
             w["attention"]["output"]["norm"])
    h = a
    for j in range(cfg.num_feedforward_networks - 1):
      f = w[f"ffn_{j}"]
      h = norm(dense(act(dense(h, f["intermediate"])), f["output"]["dense"]) + h,
               f["output"]["norm"])
    f = norm(dense(act(dense(h, w["intermediate"])), w["output"]["dense"]) + h,
             w["output"]["norm"])
    x = norm(dense(f, w["output"]["bottleneck"]["dense"]) + x, w["output"]["bottleneck"]["norm"])
    hidden.append(x)
    scores.append(s)

  first = x[:, 0]
  pooled = np.tanh(dense(first, p["pooler"]["dense"])) if cfg.classifier_activation else first
  nsp = dense(pooled, p["cls"]["seq_relationship"])
  pred = p["cls"]["predictions"]
  g = x[np.arange(B)[:, None], positions]
  g = layer_norm(act(dense(g, pred["transform"]["dense"])), pred["transform"]["norm"])
  table = np.concatenate([emb["word_embeddings"]["embedding"], pred["extra_output_weights"]], 1)
  mlm = g @ table.T + pred["output_bias"]
  return hidden, scores, pooled, nsp, mlm


@pytest.mark.parametrize("name", ["ib_bert_large_micro", "mobilebert_micro",
                                  "mobilebert_tiny_micro"])
def test_matches_numpy_reference_of_spec(name):
  cfg = preset(name, num_hidden_layers=2)
  params = random_params(cfg)
  ids, types, mask, positions = batch(cfg)
  out = run(cfg, params, ids, types, mask, positions)
  hidden, scores, pooled, nsp, mlm = np_reference(cfg, params, ids, types, mask, positions)

  assert len(out.hidden_states) == len(hidden) == cfg.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(out.hidden_states, hidden)):
    assert rel_err(a, b) < 1e-5, f"hidden_states[{i}]: {rel_err(a, b):.2e}"
  keep = np.broadcast_to(mask[:, None, None, :] == 1, scores[0].shape)
  for i, (a, b) in enumerate(zip(out.attention_scores, scores)):
    a = np.asarray(a)
    assert a.shape == (B, cfg.num_attention_heads, T, T)
    assert rel_err(a[keep], b[keep]) < 1e-5, f"scores[{i}] at real keys"
    assert np.all(a[~keep] < -1e38), "masked keys must carry the large negative bias"
    assert np.all(np.isfinite(a)), "never -inf (0 * -inf = NaN in attention KL)"
  assert rel_err(out.pooled, pooled) < 1e-5
  assert rel_err(out.nsp_logits, nsp) < 1e-5
  assert out.mlm_logits.shape == (B, P, cfg.vocab_size)
  assert rel_err(out.mlm_logits, mlm) < 1e-5


def test_teacher_queries_keys_values_come_from_the_wide_input():
  cfg = preset("ib_bert_large_micro")
  shapes = param_shapes(cfg)
  L, H, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intra_bottleneck_size
  for proj in ("query", "key", "value"):
    assert shapes[f"encoder/layers/attention/{proj}/kernel"] == (L, H, I)
  assert not any("bottleneck_attention" in k for k in shapes)
  assert shapes["pooler/dense/kernel"] == (H, H)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["mobilebert_micro", "ib_bert_large_micro"])
def test_every_parameter_gets_a_gradient(name):
  """Every leaf, and every layer slice of a stacked leaf, gets a nonzero gradient; except the
  key bias, whose gradient is exactly zero in exact arithmetic (it adds q.b_k to every score of
  a query row, and softmax ignores a shift): there it must be negligible instead."""
  cfg = preset(name, num_hidden_layers=2)
  params = random_params(cfg)
  ids, types, mask, positions = batch(cfg)
  rng = np.random.default_rng(2)
  w_mlm = jnp.asarray(rng.standard_normal((B, P, cfg.vocab_size)), jnp.float32)
  w_nsp = jnp.asarray(rng.standard_normal((B, 2)), jnp.float32)

  def loss(p):
    out = run(cfg, p, ids, types, mask, positions)
    return jnp.sum(out.mlm_logits * w_mlm) + jnp.sum(out.nsp_logits * w_nsp)

  grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params), sep="/")
  assert set(grads) == set(traverse_util.flatten_dict(params, sep="/"))
  for path, g in grads.items():
    g = np.asarray(g)
    assert g.dtype == np.float32 and np.all(np.isfinite(g)), path
    if path == KEY_BIAS:
      query_bias = np.abs(np.asarray(grads["encoder/layers/attention/query/bias"])).max()
      assert np.abs(g).max() < 1e-4 * query_bias, f"{path}: gradient should vanish"
    elif path.startswith("encoder/"):  # each layer of the stacked axis on its own
      per_layer = np.abs(g).reshape(g.shape[0], -1).max(axis=1)
      dead = np.where(per_layer == 0)[0]
      assert dead.size == 0, f"{path}: zero gradient in layer(s) {dead}"
    else:
      assert np.abs(g).max() > 0, f"{path}: zero gradient"


# ----------------------------------------------------------------------------- sizes
def test_parameter_counts_of_full_presets():
  student = param_table(preset("mobilebert"))
  assert student["backbone"] == 24_581_888
  assert student["embeddings"] == 4_368_128 and student["per_layer"] == 842_240
  assert student["pooler"] == 0
  assert student["mlm_head"] == 12_014_650 and student["nsp_head"] == 1_026
  assert param_table(preset("mobilebert_tiny"))["backbone"] == 15_485_696
  teacher = param_table(preset("ib_bert_large"))
  assert teacher["per_layer"] == 12_076_544
  assert teacher["embeddings"] + teacher["encoder"] == 294_205_184
  assert teacher["pooler"] == 262_656


# (preset, the count docs/status.md prints, the paper's figure). The printed digits are what
# `models.summary` computes (2 x multiply-accumulates of the matmuls, no heads); the paper's
# rounded figures sit within 6% of them (its 5.7B for MobileBERT: within 5.5%).
@pytest.mark.parametrize("name,printed,paper", [("mobilebert", "5.39B", 5.7e9),
                                                ("mobilebert_tiny", "3.07B", 3.1e9),
                                                ("bert_base", "22.35B", 22.5e9)])
def test_forward_flops_at_128(name, printed, paper):
  flops = forward_flops(preset(name), 128)
  digits = len(printed.rstrip("B").split(".")[1])
  assert f"{flops / 1e9:.{digits}f}B" == printed
  assert abs(flops / paper - 1) < 0.06


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("change,field", [
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(num_feedforward_networks=0), "num_feedforward_networks"),
    (dict(normalization_type="batch_norm"), "normalization_type"),
    (dict(hidden_act="swish"), "hidden_act"),
    (dict(intra_bottleneck_size=0), "intra_bottleneck_size"),
])
def test_bad_config_fails_naming_the_field(change, field):
  cfg = preset("mobilebert_micro").replace(**change)  # replace() does not validate
  with pytest.raises(ValueError, match=f"`{field}`"):
    build(cfg)  # raises while building the module, before anything is traced or compiled


def test_sequence_longer_than_positions_fails():
  cfg = preset("mobilebert_micro", num_hidden_layers=1, max_position_embeddings=8)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    cfg.validate(max_seq_length=9)
  cfg.validate(max_seq_length=8)
  model = build(cfg)
  params = random_params(cfg)
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=8"):
    # Raised while tracing, i.e. before XLA compiles anything.
    jax.jit(model.apply)({"params": params}, jnp.zeros((1, 9), jnp.int32))


# ----------------------------------------------------------------------------- variants
def _all_outputs(out):
  return [*out.hidden_states, *out.attention_scores, out.pooled, out.nsp_logits, out.mlm_logits]


def test_truncated_depth_equals_the_first_layers():
  cfg = preset("mobilebert_micro")  # 4 layers
  params = random_params(cfg)
  ids, types, mask, positions = batch(cfg)
  full = run(cfg, params, ids, types, mask, positions)
  for k in (0, 2):
    part = run(cfg, params, ids, types, mask, positions, num_layers=k)
    assert len(part.hidden_states) == k + 1 and len(part.attention_scores) == k
    for a, b in zip(part.hidden_states, full.hidden_states[:k + 1]):
      assert rel_err(a, b) < 1e-6
    for a, b in zip(part.attention_scores, full.attention_scores[:k]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="num_layers=5"):
    run(cfg, params, ids, types, mask, num_layers=5)


def _cut_stack(params, k):
  """`params` with the encoder's layer stack cut to its first k slices (what the training
  step hands a truncated phase's loss)."""
  return {**params, "encoder": {**params["encoder"], "layers": jax.tree.map(
      lambda a: a[:k], params["encoder"]["layers"])}}


def test_truncated_gradients_reach_only_the_first_layers():
  """The truncated loop reads layer i out of the full stack (no slice copy), so its gradient
  is a full-depth tree: equal to the full model's for the first k layers, zero above, also
  unrolled, under remat and with Q/K/V returned; with dropout on it still runs. Given a stack
  already cut to k layers it scans over it instead: the same gradients, k deep, and the same
  dropout masks."""
  cfg = preset("mobilebert_micro")  # 4 layers
  params = random_params(cfg)
  ids, types, mask, positions = batch(cfg)
  k = 2

  def loss(c, p, num_layers, return_qkv=False):
    out = build(c).apply({"params": p}, ids, types, mask, positions, num_layers=num_layers,
                         return_qkv=return_qkv)
    extra = sum(jnp.sum(t[..., :3]) for t in out.qkv[k - 1]) if return_qkv else 0.0
    return jnp.sum(out.hidden_states[k] ** 2) + jnp.sum(out.attention_scores[k - 1][..., 0]) + extra

  want = jax.jit(jax.grad(lambda p: loss(cfg, p, None)))(params)
  for variant in ({}, dict(scan_layers=False), dict(remat=True)):
    c = cfg.replace(**variant)
    got = jax.jit(jax.grad(lambda p: loss(c, p, k)))(params)
    for (path, g), w in zip(traverse_util.flatten_dict(got).items(),
                            jax.tree.leaves(traverse_util.flatten_dict(want))):
      name = "/".join(path)
      if name.startswith("encoder/layers/"):
        np.testing.assert_allclose(g[:k], w[:k], rtol=2e-5, atol=2e-6, err_msg=(variant, name))
        assert not np.any(np.asarray(g[k:])), (variant, name)
    cut = jax.jit(jax.grad(lambda p: loss(c, p, k)))(_cut_stack(params, k))
    for (path, g), w in zip(traverse_util.flatten_dict(cut).items(),
                            jax.tree.leaves(traverse_util.flatten_dict(want))):
      want_g = w[:k] if "/".join(path).startswith("encoder/layers/") else w
      assert g.shape == want_g.shape, (variant, path)
      np.testing.assert_allclose(g, want_g, rtol=2e-5, atol=2e-6, err_msg=str((variant, path)))
  want_qkv = jax.jit(jax.grad(lambda p: loss(cfg, p, None, True)))(params)
  got_qkv = jax.jit(jax.grad(lambda p: loss(cfg, p, k, True)))(params)
  for g, w in zip(jax.tree.leaves(got_qkv), jax.tree.leaves(want_qkv)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
  noisy = cfg.replace(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  out = jax.jit(lambda p, r: build(noisy).apply({"params": p}, ids, types, mask, positions,
                                                deterministic=False, num_layers=k,
                                                rngs={"dropout": r}))(params, jax.random.key(3))
  assert len(out.hidden_states) == k + 1 and np.all(np.isfinite(out.hidden_states[k]))
  out_cut = jax.jit(lambda p, r: build(noisy).apply(
      {"params": p}, ids, types, mask, positions, deterministic=False, num_layers=k,
      rngs={"dropout": r}))(_cut_stack(params, k), jax.random.key(3))
  np.testing.assert_allclose(out_cut.hidden_states[k], out.hidden_states[k], rtol=1e-6, atol=1e-6)


def test_without_layer_outputs_the_heads_and_gradients_are_unchanged():
  """`layer_outputs=False` (what plain pretraining, PD and fine-tuning ask for) drops the
  stacked per-layer outputs, whose zero cotangents the backward loop would otherwise read,
  and changes nothing the heads compute, at full and truncated depth."""
  cfg = preset("mobilebert_micro")
  params = random_params(cfg)
  ids, types, mask, positions = batch(cfg)
  model = build(cfg)

  def apply(p, **kw):
    return model.apply({"params": p}, ids, types, mask, positions, **kw)

  def loss(p, **kw):
    out = apply(p, **kw)
    return jnp.sum(out.mlm_logits ** 2) + jnp.sum(out.nsp_logits)

  for k in (None, 2):
    full, lean = apply(params, num_layers=k), apply(params, num_layers=k, layer_outputs=False)
    assert lean.attention_scores == () and len(lean.hidden_states) == 1
    np.testing.assert_array_equal(lean.hidden_states[0], full.hidden_states[-1])
    np.testing.assert_array_equal(lean.mlm_logits, full.mlm_logits)
    want = jax.jit(jax.grad(lambda p: loss(p, num_layers=k)))(params)
    got = jax.jit(jax.grad(lambda p: loss(p, num_layers=k, layer_outputs=False)))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
  assert len(apply(params, num_layers=2, layer_outputs=False, return_qkv=True).qkv) == 2
  assert apply(params, num_layers=0, layer_outputs=False).hidden_states[0].shape == (B, T, cfg.hidden_size)


def test_unrolled_and_remat_match_the_scan():
  cfg = preset("mobilebert_micro", num_hidden_layers=2)
  params = random_params(cfg)
  ids, types, mask, positions = batch(cfg)
  ref = _all_outputs(run(cfg, params, ids, types, mask, positions))
  for variant in (dict(scan_layers=False), dict(remat=True)):
    outs = _all_outputs(run(cfg.replace(**variant), params, ids, types, mask, positions))
    for a, b in zip(outs, ref):
      finite = np.asarray(b) > -1e38  # masked scores: compare the real keys
      assert rel_err(np.asarray(a)[finite], np.asarray(b)[finite]) < 1e-6, variant


def test_bf16_compute_keeps_float32_params():
  cfg = preset("mobilebert_micro", num_hidden_layers=2)
  bf = cfg.replace(compute_dtype="bfloat16")
  abstract = jax.eval_shape(lambda k: build(bf).init(k, jnp.zeros((1, T), jnp.int32)),
                            jax.random.key(0))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nn.unbox(abstract)))
  params = random_params(cfg)
  ids, types, mask, positions = batch(cfg)
  out32 = run(cfg, params, ids, types, mask, positions)
  out16 = run(bf, params, ids, types, mask, positions)
  assert out16.mlm_logits.dtype == jnp.float32 and out16.attention_scores[0].dtype == jnp.float32
  assert out16.hidden_states[-1].dtype == jnp.bfloat16
  assert rel_err(out16.mlm_logits, out32.mlm_logits) < 5e-2
  assert rel_err(out16.hidden_states[-1], out32.hidden_states[-1]) < 5e-2


@pytest.mark.slow  # XLA:CPU takes ~25 s to compile the bf16 backward pass
def test_bf16_gradients_are_float32_and_close():
  cfg = preset("mobilebert_micro", num_hidden_layers=2)
  bf = cfg.replace(compute_dtype="bfloat16")
  params = random_params(cfg)
  ids, types, mask, positions = batch(cfg)
  loss = lambda c: jax.jit(jax.grad(
      lambda p: jnp.sum(run(c, p, ids, types, mask, positions).mlm_logits)))
  g32, g16 = loss(cfg)(params), loss(bf)(params)
  for path, g in traverse_util.flatten_dict(g16, sep="/").items():
    assert g.dtype == jnp.float32, path
  flat32 = traverse_util.flatten_dict(g32, sep="/")
  # The key bias gradient is zero in exact arithmetic: only rounding noise to compare there.
  errs = {path: rel_err(g, flat32[path])
          for path, g in traverse_util.flatten_dict(g16, sep="/").items() if path != KEY_BIAS}
  # bf16 flips some ReLU signs: ~8% worst case on the FFN kernels with these random weights.
  assert max(errs.values()) < 0.2, errs


def test_masked_position_gather_equals_slicing_full_logits():
  cfg = preset("mobilebert_micro", num_hidden_layers=2)
  params = random_params(cfg)
  ids, types, mask, positions = batch(cfg)
  full = run(cfg, params, ids, types, mask)
  gathered = run(cfg, params, ids, types, mask, positions)
  assert full.mlm_logits.shape == (B, T, cfg.vocab_size)
  sliced = np.asarray(full.mlm_logits)[np.arange(B)[:, None], positions]
  np.testing.assert_allclose(gathered.mlm_logits, sliced, rtol=1e-5, atol=1e-5)


def test_mlm_logits_are_the_same_with_the_joined_and_the_split_output_table():
  """Many rows take one product over [word table | extra_output_weights], few rows two
  products summed (mobilebert.MLMPredictions): the same logits either way."""
  from mbert_jax.models.mobilebert import MLMPredictions
  cfg = preset("mobilebert_micro")  # hidden 64, embedding 16: 128 rows join, 8 rows split
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(128, cfg.hidden_size)), jnp.float32)
  word = jnp.asarray(rng.normal(size=(cfg.vocab_size, cfg.embedding_size)), jnp.float32)
  head = MLMPredictions(cfg)
  variables = nn.unbox(head.init(jax.random.key(0), h[:8], word))
  variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), variables)
  apply = jax.jit(lambda x: head.apply(variables, x, word))
  joined = apply(h)
  split = jnp.concatenate([apply(h[i:i + 8]) for i in range(0, 128, 8)])
  np.testing.assert_allclose(joined, split, rtol=1e-5, atol=1e-4)
  extra = np.asarray(variables["params"]["extra_output_weights"])
  assert np.abs(np.asarray(joined)).max() > 1 and extra.shape[1] == cfg.hidden_size - cfg.embedding_size
