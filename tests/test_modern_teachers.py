"""ModernBERT and EuroBERT teachers: import of Hugging Face directories and parity of the Flax
model (`mbert_jax.models.modern`) with transformers' PyTorch models.

Random tiny configs, no downloads, fp32, eager attention. Every weight is random (HF's unit
norms and zero biases would hide a swapped tensor). The ModernBERT configs use sequences longer
than the local window, so the band mask is exercised (`test_window_is_exercised` shows the
comparison fails without it), and batches with padding.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from mbert_jax import hf  # noqa: E402
from mbert_jax.models.modern import build_modern  # noqa: E402
from mbert_jax.models.modern_config import ModernConfig, modern_preset  # noqa: E402
from mbert_jax.models.summary import param_table  # noqa: E402

pytestmark = pytest.mark.hf

TOL = 1e-5  # max |ours - ref| / max |ref|, per tensor
SEQ = 24
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)

MODERNBERT = {
    # 4 layers: global, local, local, global; an 8-token window (+-4) over 24 tokens.
    "window": dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                   num_attention_heads=4, global_attn_every_n_layers=3, local_attention=8,
                   max_position_embeddings=64, **IDS),
    # Every bias on, untied decoder, another pattern (global every 2nd), a 6-token window.
    "biases_untied": dict(vocab_size=97, hidden_size=64, intermediate_size=40,
                          num_hidden_layers=3, num_attention_heads=2,
                          global_attn_every_n_layers=2, local_attention=6, norm_bias=True,
                          attention_bias=True, mlp_bias=True, classifier_bias=True,
                          decoder_bias=True, tie_word_embeddings=False,
                          max_position_embeddings=64, **IDS),
}
EUROBERT = {
    # Grouped-query attention: 4 query heads over 2 key/value heads; untied lm_head.
    "gqa": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 250000.0},
                pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_token_id=3),
    # Tied output embeddings, biases (mlp_bias also gives lm_head a bias), head_dim != H/heads.
    "tied_biases": dict(vocab_size=97, hidden_size=48, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=16, attention_bias=True, mlp_bias=True,
                        tie_word_embeddings=True, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_token_id=3),
}


# ----------------------------------------------------------------------------- helpers
def randomize(model, seed: int):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif "Wqkv" in name or "q_proj" in name or "k_proj" in name:
        p.copy_(0.15 * noise)  # attention far from uniform
      else:
        p.copy_(0.08 * noise)
  model.set_attn_implementation("eager")
  return model.eval()


def hf_model(kind: str, kw: dict, seed: int, masked_lm: bool = True):
  if kind == "modernbert":
    cls = transformers.ModernBertForMaskedLM if masked_lm else transformers.ModernBertModel
    config = transformers.ModernBertConfig(**kw)
  else:
    cls = transformers.EuroBertForMaskedLM if masked_lm else transformers.EuroBertModel
    config = transformers.EuroBertConfig(**kw)
  return randomize(cls(config), seed)


def batch(vocab: int):
  """Three rows: full, padded after 17 tokens, padded after 6 (pad longer than the window)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, vocab, (3, SEQ))
  mask = np.ones_like(ids)
  mask[1, 17:] = 0
  mask[2, 6:] = 0
  return np.where(mask == 1, ids, 0), mask


def rel_err(ours, ref) -> float:
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref.detach().numpy() if hasattr(ref, "detach") else ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def torch_forward(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 output_hidden_states=True, output_attentions=True)


def jax_forward(cfg, params, ids, mask, **kw):
  fn = jax.jit(lambda p, i, m: build_modern(cfg).apply({"params": p}, i, attention_mask=m, **kw))
  return fn(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))


def errors(ours, ref, with_logits: bool = True) -> dict[str, float]:
  """Max relative error per tensor kind (the worst over layers)."""
  assert len(ours.hidden_states) == len(ref.hidden_states)
  assert len(ours.attention_scores) == len(ref.attentions)
  out = {
      "hidden_states": max(rel_err(a, b) for a, b in zip(ours.hidden_states,
                                                          ref.hidden_states)),
      "attention_probs": max(rel_err(jax.nn.softmax(a, axis=-1), b)
                             for a, b in zip(ours.attention_scores, ref.attentions)),
  }
  if with_logits:
    out["mlm_logits"] = rel_err(ours.mlm_logits, ref.logits)
  return out


def load_quiet(path):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a complete checkpoint imports without any warning
    return hf.import_model(path)


def flat(params):
  return traverse_util.flatten_dict(params, sep="/")


# ----------------------------------------------------------------------------- parity
CASES = [("modernbert", n) for n in MODERNBERT] + [("eurobert", n) for n in EUROBERT]


@pytest.mark.parametrize("kind,name", CASES)
def test_masked_lm_parity(kind, name, tmp_path):
  kw = (MODERNBERT if kind == "modernbert" else EUROBERT)[name]
  ref = hf_model(kind, kw, seed=len(name))
  ref.save_pretrained(tmp_path)
  imported = load_quiet(tmp_path)
  cfg = imported.config
  assert isinstance(cfg, ModernConfig) and cfg.family == kind
  assert imported.layout == ("ModernBert" if kind == "modernbert" else "EuroBert") + "ForMaskedLM"
  assert imported.has_mlm_head and not imported.has_nsp_head and imported.fresh == ()
  assert cfg.tie_word_embeddings == kw.get("tie_word_embeddings", kind == "modernbert")
  if kind == "modernbert":
    assert cfg.has_local_layers and cfg.local_attention < SEQ

  ids, mask = batch(cfg.vocab_size)
  ours = jax_forward(cfg, imported.params, ids, mask)
  errs = errors(ours, torch_forward(ref, ids, mask))
  print(f"{kind}/{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
  for what, err in errs.items():
    assert err <= TOL, f"{kind}/{name} {what}: max error {err:.2e} (tol {TOL})"

  # The first layers alone give the same states as the full stack (progressive transfer
  # reads them so); the final norm belongs to the last layer only.
  part = jax_forward(cfg, imported.params, ids, mask, num_layers=2)
  for a, b in zip(part.hidden_states, ours.hidden_states[:2]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_window_is_exercised(tmp_path):
  """Without the band mask (every layer global) the comparison fails by far: the tolerance
  above has power over the local layers."""
  ref = hf_model("modernbert", MODERNBERT["window"], seed=1)
  ref.save_pretrained(tmp_path)
  imported = load_quiet(tmp_path)
  ids, mask = batch(imported.config.vocab_size)
  r = torch_forward(ref, ids, mask)
  cfg = imported.config
  assert cfg.global_layers == (True, False, False, True)
  wrong = cfg.replace(layer_types=("full_attention",) * cfg.num_hidden_layers)
  errs = errors(jax_forward(wrong, imported.params, ids, mask), r)
  assert errs["attention_probs"] > 100 * TOL and errs["mlm_logits"] > 100 * TOL, errs
  # Global layers with the local theta are wrong too.
  swapped = cfg.replace(rope_theta=cfg.local_rope_theta)
  assert errors(jax_forward(swapped, imported.params, ids, mask), r)["mlm_logits"] > 100 * TOL


@pytest.mark.parametrize("kind", ["modernbert", "eurobert"])
def test_bare_model_import_gets_fresh_heads(kind, tmp_path):
  kw = MODERNBERT["window"] if kind == "modernbert" else EUROBERT["gqa"]
  ref = hf_model(kind, kw, seed=5, masked_lm=False)
  ref.save_pretrained(tmp_path)
  with pytest.warns(UserWarning, match="initialised fresh"):
    imported = hf.import_model(tmp_path)
  family = "ModernBert" if kind == "modernbert" else "EuroBert"
  assert imported.layout == family + "Model"
  assert not imported.has_mlm_head and not imported.has_nsp_head and not imported.has_pooler
  assert imported.fresh and all(p.startswith("cls/predictions/") for p in imported.fresh)
  ids, mask = batch(imported.config.vocab_size)
  errs = errors(jax_forward(imported.config, imported.params, ids, mask),
                torch_forward(ref, ids, mask), with_logits=False)
  assert max(errs.values()) <= TOL, errs


def test_sharded_safetensors(tmp_path):
  ref = hf_model("eurobert", EUROBERT["gqa"], seed=2)
  ref.save_pretrained(tmp_path / "one")
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  assert not (tmp_path / "sharded" / "model.safetensors").exists()
  one, sharded = load_quiet(tmp_path / "one"), load_quiet(tmp_path / "sharded")
  assert sharded.source.endswith("model.safetensors.index.json")
  assert one.config == sharded.config
  a, b = flat(one.params), flat(sharded.params)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_fused_tensors_and_layer0_norm_layout(tmp_path):
  """Wqkv rows [q; k; v] and Wi rows [activated; linear] land on their own axis; layer 0's
  missing attn_norm is the identity."""
  ref = hf_model("modernbert", MODERNBERT["biases_untied"], seed=3)
  ref.save_pretrained(tmp_path)
  p = flat(load_quiet(tmp_path).params)
  layer1 = ref.model.layers[1]
  wqkv = layer1.attn.Wqkv.weight.detach().numpy()
  q, k, v = np.split(wqkv, 3, axis=0)
  ours = p["encoder/layers/attention/qkv/kernel"][1]
  for j, part in enumerate((q, k, v)):
    np.testing.assert_array_equal(ours[:, j], part.T)
  wi_act, wi_lin = np.split(layer1.mlp.Wi.weight.detach().numpy(), 2, axis=0)
  np.testing.assert_array_equal(p["encoder/layers/mlp/wi/kernel"][1][:, 0], wi_act.T)
  np.testing.assert_array_equal(p["encoder/layers/mlp/wi/kernel"][1][:, 1], wi_lin.T)
  np.testing.assert_array_equal(p["encoder/layers/attn_norm/scale"][0], 1.0)
  np.testing.assert_array_equal(p["encoder/layers/attn_norm/bias"][0], 0.0)


def test_unknown_model_type_is_one_line(tmp_path):
  ref = hf_model("eurobert", EUROBERT["gqa"], seed=4)
  ref.save_pretrained(tmp_path)
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "neobert"}))
  with pytest.raises(ValueError) as info:
    hf.import_model(tmp_path)
  message = str(info.value)
  assert "\n" not in message
  assert "'neobert'" in message
  for supported in ("bert", "mobilebert", "modernbert", "eurobert"):
    assert supported in message


def test_untied_file_with_tied_config_is_refused(tmp_path):
  """A decoder that differs from the word table while config.json says tied is named."""
  from safetensors.numpy import load_file, save_file
  ref = hf_model("modernbert", MODERNBERT["window"], seed=6)
  ref.save_pretrained(tmp_path)
  sd = load_file(str(tmp_path / "model.safetensors"))
  sd["decoder.weight"] = sd["model.embeddings.tok_embeddings.weight"] + 1.0
  save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"decoder\.weight differs from the word embeddings"):
    hf.import_model(tmp_path)


def test_summary_counts_the_hf_parameters(tmp_path):
  """Our parameter count equals transformers' (tied tables once; plus ModernBERT's identity
  attn_norm of layer 0, which Hugging Face does not build)."""
  for kind, kw in (("modernbert", MODERNBERT["window"]), ("eurobert", EUROBERT["gqa"])):
    ref = hf_model(kind, kw, seed=0)
    ref.save_pretrained(tmp_path / kind)
    imported = load_quiet(tmp_path / kind)
    theirs = sum(p.numel() for p in ref.parameters())
    extra = kw["hidden_size"] * (1 + kw.get("norm_bias", False)) if kind == "modernbert" else 0
    assert param_table(imported.config)["total"] == theirs + extra


def test_trains_with_dropout_remat_and_bf16():
  """The module differentiates (scan + remat, dropout on, bfloat16 compute); ModernBERT's
  bypassed layer-0 attention norm gets no gradient."""
  cfg = modern_preset("modernbert_micro", remat=True, compute_dtype="bfloat16", attention_dropout=0.1,
                      mlp_dropout=0.1, embedding_dropout=0.1)
  model = build_modern(cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(5, cfg.vocab_size, (2, 40)), jnp.int32)
  mask = jnp.ones_like(ids).at[1, 30:].set(0)
  params = nn.unbox(model.init(jax.random.key(0), ids)["params"])

  def loss(p):
    out = model.apply({"params": p}, ids, attention_mask=mask, deterministic=False,
                      rngs={"dropout": jax.random.key(1)})
    return -jnp.mean(jax.nn.log_softmax(out.mlm_logits)[..., 0])

  grads = flat(jax.jit(jax.grad(loss))(params))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
  norm_grad = grads["encoder/layers/attn_norm/scale"]
  assert float(jnp.max(jnp.abs(norm_grad[0]))) == 0.0
  assert float(jnp.max(jnp.abs(norm_grad[1]))) > 0.0


def test_hub_config_formats():
  """config.json as the hub's checkpoints wrote it before transformers 5 (global/local theta
  and the every-n pattern as top-level keys; EuroBERT's top-level rope_theta) reads the same."""
  from mbert_jax.models.modern_config import from_hf_config
  old = dict(model_type="modernbert", vocab_size=97, hidden_size=64, intermediate_size=48,
             num_hidden_layers=7, num_attention_heads=4, global_attn_every_n_layers=3,
             local_attention=128, global_rope_theta=160000.0, local_rope_theta=10000.0,
             hidden_activation="gelu", classifier_activation="gelu", norm_bias=False,
             position_embedding_type="absolute", reference_compile=True)
  cfg = from_hf_config(old).validate()
  assert cfg.global_layers == (True, False, False, True, False, False, True)
  assert (cfg.rope_theta, cfg.local_rope_theta, cfg.half_window) == (160000.0, 10000.0, 64)
  new = transformers.ModernBertConfig(**{k: v for k, v in old.items()
                                         if k not in ("model_type", "global_rope_theta",
                                                      "local_rope_theta")}, **IDS).to_dict()
  assert from_hf_config(new).replace(pad_token_id=None, mask_token_id=None) == cfg
  euro = dict(model_type="eurobert", vocab_size=97, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rope_theta=250000.0, rope_scaling=None)
  cfg = from_hf_config(euro).validate()
  assert cfg.rope_theta == 250000.0 and not cfg.has_local_layers and cfg.num_kv_groups == 2
  with pytest.raises(ValueError, match="rope_scaling"):
    from_hf_config({**euro, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
