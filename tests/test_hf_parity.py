"""Hugging Face parity: import, forward, export and reload against transformers' PyTorch models.

Random-init tiny configs, no downloads, fp32, eval mode, eager attention (spec §13.1, §13.3).
Every weight is randomised (HF zero-initialises biases and sets norms to identity, which would
hide a swapped scale/bias) and the FFN and query/key kernels are scaled up, so FFN
pre-activations span the range where erf and tanh GELU differ and attention is far from
uniform. `test_tolerance_detects_wrong_semantics` shows that the tolerance used here catches
the wrong GELU form and the wrong LayerNorm eps.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from mbert_jax import hf  # noqa: E402
from mbert_jax.interop import hf_names  # noqa: E402
from mbert_jax.models import build, preset  # noqa: E402

pytestmark = [
    pytest.mark.hf,
    # torch says so when HF builds the zero-row `cls.predictions.dense` (embedding == hidden).
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op"),
]

TOL = 1e-5  # max |ours - ref| / max |ref|, per tensor

# spec §13.1: transformers' own MobileBertModelTester config.
HF_TESTER = dict(vocab_size=99, hidden_size=64, embedding_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=37, hidden_act="gelu",
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 max_position_embeddings=512, type_vocab_size=16, initializer_range=0.02)
STUDENT = dict(vocab_size=97, hidden_size=64, embedding_size=16, intra_bottleneck_size=32,
               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               hidden_act="relu", hidden_dropout_prob=0.0, max_position_embeddings=32,
               type_vocab_size=2, trigram_input=True, use_bottleneck=True,
               key_query_shared_bottleneck=True, use_bottleneck_attention=False,
               num_feedforward_networks=4, normalization_type="no_norm",
               classifier_activation=False)
CONFIGS = {
    "hf_tester": HF_TESTER,
    "student": STUDENT,
    "tiny": {**STUDENT, "use_bottleneck_attention": True, "key_query_shared_bottleneck": False,
             "num_feedforward_networks": 2},
    # trigram off with embedding_size < hidden_size: embedding_transformation maps E -> H.
    "layer_norm_gelu_new": {**STUDENT, "normalization_type": "layer_norm",
                            "hidden_act": "gelu_new", "trigram_input": False,
                            "classifier_activation": True},
    # trigram off, embedding_size == hidden_size: HF still builds the unused transformation
    # and a zero-row `cls.predictions.dense`.
    "trigram_off_square": {**STUDENT, "trigram_input": False, "embedding_size": 64,
                           "hidden_act": "gelu", "normalization_type": "layer_norm"},
}


# ----------------------------------------------------------------------------- helpers
def randomize(model, seed: int, ffn_scale: float = 4.0, qk_scale: float = 4.0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "LayerNorm.weight" in name:
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(0.05 * noise)
      if "intermediate.dense.weight" in name:
        p.mul_(ffn_scale)
      if "attention.self.query.weight" in name or "attention.self.key.weight" in name:
        p.mul_(qk_scale)
  return model.eval()


def zeros_tree(cfg):
  """A parameter tree of the right shapes; enough where values are never read."""
  from flax import traverse_util
  from mbert_jax.models.summary import param_shapes
  return traverse_util.unflatten_dict(
      {tuple(k.split("/")): np.zeros(s, np.float32) for k, s in param_shapes(cfg).items()})


def hf_mobilebert(kw: dict, seed: int = 0):
  model = randomize(transformers.MobileBertForPreTraining(transformers.MobileBertConfig(**kw)),
                    seed)
  model.set_attn_implementation("eager")
  return model


def batches(vocab: int):
  """Same shape twice: unpadded, and padded ([PAD]=0 ids, mask zeros) with two segments."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1, vocab, (3, 9))
  full = np.ones_like(ids)
  mask = full.copy()
  mask[1, 6:] = 0
  mask[2, 4:] = 0
  padded = np.where(mask == 1, ids, 0)
  types = np.zeros_like(ids)
  types[:, 3:] = 1
  types = types * mask
  return [(ids, np.zeros_like(ids), full), (padded, types, mask)]


def rel_err(ours, ref) -> float:
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref.detach().numpy() if hasattr(ref, "detach") else ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def assert_close(ours, ref, what: str, tol: float = TOL):
  err = rel_err(ours, ref)
  assert err <= tol, f"{what}: max error {err:.2e} relative to the largest magnitude (tol {tol})"


def torch_forward(model, ids, types, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                 attention_mask=torch.tensor(mask), output_hidden_states=True,
                 output_attentions=True)


def jax_forward(cfg, params, ids, types, mask):
  fn = jax.jit(lambda p, i, t, m: build(cfg).apply({"params": p}, i, t, m))
  return fn(params, jnp.asarray(ids, jnp.int32), jnp.asarray(types, jnp.int32),
            jnp.asarray(mask, jnp.int32))


def compare_all(ours, ref, tag: str):
  assert len(ours.hidden_states) == len(ref.hidden_states)
  for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
    assert_close(a, b, f"{tag} hidden_states[{i}]")
  assert len(ours.attention_scores) == len(ref.attentions)
  for i, (a, b) in enumerate(zip(ours.attention_scores, ref.attentions)):
    assert_close(jax.nn.softmax(a, axis=-1), b, f"{tag} attention probabilities[{i}]")
  assert_close(ours.mlm_logits, ref.prediction_logits, f"{tag} MLM logits")
  assert_close(ours.nsp_logits, ref.seq_relationship_logits, f"{tag} NSP logits")


def load_quiet(path):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a complete checkpoint must import without any warning
    return hf.load(path)


# ----------------------------------------------------------------------------- MobileBERT
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_forward_export_reload(name, tmp_path):
  ref = hf_mobilebert(CONFIGS[name], seed=len(name))
  ref.save_pretrained(tmp_path / "hf")
  cfg, params = load_quiet(tmp_path / "hf")
  assert cfg.hf_layer_norm_eps_quirk and cfg.hidden_act == CONFIGS[name]["hidden_act"]

  outs = {}
  for k, (ids, types, mask) in enumerate(batches(cfg.vocab_size)):
    ours = jax_forward(cfg, params, ids, types, mask)
    compare_all(ours, torch_forward(ref, ids, types, mask), f"{name} batch {k}")
    outs[k] = ours

  # Export, reload in transformers: no missing/unexpected/mismatched keys, same outputs.
  hf.save(cfg, params, tmp_path / "out")
  back, info = transformers.MobileBertForPreTraining.from_pretrained(
      tmp_path / "out", output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"] and not info["error_msgs"], info
  back.eval()
  for k, (ids, types, mask) in enumerate(batches(cfg.vocab_size)):
    compare_all(outs[k], torch_forward(back, ids, types, mask), f"{name} reloaded batch {k}")

  # Every architecture field is explicit in config.json.
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  for field in ("classifier_activation", "hidden_act", "normalization_type", "trigram_input",
                "key_query_shared_bottleneck", "use_bottleneck_attention",
                "num_feedforward_networks", "intra_bottleneck_size", "embedding_size"):
    assert field in written
  # HF defaults classifier_activation to True (the tester config leaves it at that).
  assert written["classifier_activation"] == CONFIGS[name].get("classifier_activation", True)

  # Import then export reproduces the original tensors bit for bit (placeholders aside).
  original = load_file(str(tmp_path / "hf" / "model.safetensors"))
  exported = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert set(original) == set(exported)
  placeholders = {k if k.startswith("cls.") else "mobilebert." + k
                  for k in hf_names.placeholders(cfg)}
  for key in original:
    if key in placeholders:
      continue
    assert original[key].dtype == exported[key].dtype == np.float32, key
    assert np.array_equal(original[key].view(np.uint32), exported[key].view(np.uint32)), key
  if name == "trigram_off_square":
    assert placeholders == {"mobilebert.embeddings.embedding_transformation.weight",
                            "mobilebert.embeddings.embedding_transformation.bias",
                            "cls.predictions.dense.weight"}
    assert exported["cls.predictions.dense.weight"].shape == (0, cfg.vocab_size)

  # AutoModel (the bare MobileBertModel) loads the export too.
  auto, info = transformers.AutoModel.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert type(auto).__name__ == "MobileBertModel" and not info["missing_keys"], info


def test_tolerance_detects_wrong_semantics(tmp_path):
  """The parity check has power: erf vs tanh GELU and 1e-5 vs 1e-12 eps both fail it, by a
  margin (MLM logits off by more than 5x the tolerance), while the right semantics pass."""
  ids, types, mask = batches(97)[1]
  kw = {**STUDENT, "hidden_act": "gelu", "normalization_type": "layer_norm"}
  ref = hf_mobilebert(kw, seed=3)
  ref.save_pretrained(tmp_path / "hf")
  cfg, params = load_quiet(tmp_path / "hf")
  r = torch_forward(ref, ids, types, mask)
  compare_all(jax_forward(cfg, params, ids, types, mask), r, "right semantics")
  for wrong in (dict(hidden_act="gelu_new"), dict(hf_layer_norm_eps_quirk=False)):
    ours = jax_forward(cfg.replace(**wrong), params, ids, types, mask)
    with pytest.raises(AssertionError):
      compare_all(ours, r, f"wrong {wrong}")
    assert rel_err(ours.mlm_logits, r.prediction_logits) > 5 * TOL, wrong


def test_pytorch_bin_matches_safetensors(tmp_path):
  ref = hf_mobilebert(CONFIGS["tiny"], seed=5)
  ref.save_pretrained(tmp_path / "st")
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
  torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  _, a = load_quiet(tmp_path / "st")
  _, b = load_quiet(tmp_path / "bin")  # state_dict() also holds the tied decoder tensors
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_headless_mobilebert_warns_and_initialises_heads(tmp_path):
  kw = {**HF_TESTER, "classifier_activation": True}
  model = randomize(transformers.MobileBertModel(transformers.MobileBertConfig(**kw),
                                                 add_pooling_layer=False), seed=1)
  model.set_attn_implementation("eager")
  model.save_pretrained(tmp_path / "bare")
  keys = load_file(str(tmp_path / "bare" / "model.safetensors"))
  assert all(k.startswith(("embeddings.", "encoder.")) for k in keys)  # bare, unprefixed
  with pytest.warns(UserWarning) as rec:
    cfg, params = hf.load(tmp_path / "bare")
  msg = " ".join(str(w.message) for w in rec)
  for key in ("pooler.dense.weight", "cls.predictions.transform.dense.weight",
              "cls.predictions.dense.weight", "cls.predictions.bias",
              "cls.seq_relationship.weight"):
    assert key in msg, f"warning does not name {key}: {msg}"
  assert set(params) == {"embeddings", "encoder", "pooler", "cls"}
  # The backbone is the checkpoint's: hidden states match the bare HF model.
  ids, types, mask = batches(cfg.vocab_size)[1]
  ours = jax_forward(cfg, params, ids, types, mask)
  ref = torch_forward(model, ids, types, mask)
  for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
    assert_close(a, b, f"headless hidden_states[{i}]")
  # Fresh heads are deterministic (fixed seed).
  with pytest.warns(UserWarning):
    _, again = hf.load(tmp_path / "bare")
  np.testing.assert_array_equal(params["cls"]["seq_relationship"]["kernel"],
                                again["cls"]["seq_relationship"]["kernel"])


def _rewrite(src, dst, edit):
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  sd = load_file(str(src / "model.safetensors"))
  edit(sd)
  save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_misshaped_and_unknown_tensors(tmp_path):
  ref = hf_mobilebert(CONFIGS["student"], seed=2)
  ref.save_pretrained(tmp_path / "hf")

  missing = "mobilebert.encoder.layer.1.attention.self.key.weight"
  _rewrite(tmp_path / "hf", tmp_path / "missing", lambda sd: sd.pop(missing))
  with pytest.raises(ValueError, match=r"(?s)missing.*" + missing.replace(".", r"\.")
                     + r" \(expected shape \(32, 32\)\)"):
    hf.load(tmp_path / "missing")

  bad = "mobilebert.encoder.layer.0.attention.self.value.weight"
  _rewrite(tmp_path / "hf", tmp_path / "bad",
           lambda sd: sd.__setitem__(bad, np.zeros((32, 48), np.float32)))
  with pytest.raises(ValueError, match=bad.replace(".", r"\.")
                     + r": expected shape \(32, 64\), found \(32, 48\)"):
    hf.load(tmp_path / "bad")

  extra = "classifier.weight"
  _rewrite(tmp_path / "hf", tmp_path / "extra",
           lambda sd: sd.__setitem__(extra, np.zeros((3, 64), np.float32)))
  with pytest.warns(UserWarning, match=r"ignoring 1 tensor.*classifier\.weight"):
    hf.load(tmp_path / "extra")

  def untie(sd):
    sd["cls.predictions.decoder.weight"] = sd["mobilebert.embeddings.word_embeddings.weight"] + 1
  _rewrite(tmp_path / "hf", tmp_path / "untied", untie)
  with pytest.raises(ValueError, match=r"decoder\.weight differs from the word embeddings"):
    hf.load(tmp_path / "untied")

  with pytest.raises(FileNotFoundError, match="no weights found"):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    hf.load(tmp_path / "empty")


def test_teacher_export_refuses(tmp_path):
  cfg = preset("ib_bert_large_micro", num_hidden_layers=1)
  tree = zeros_tree(cfg)
  with pytest.raises(ValueError, match="cannot represent.*IB-BERT teacher"):
    hf.save(cfg, tree, tmp_path / "teacher")
  assert not (tmp_path / "teacher").exists()


def test_export_rejects_params_of_another_config(tmp_path):
  cfg = preset("mobilebert_micro", num_hidden_layers=2)
  tree = zeros_tree(cfg.replace(intermediate_size=32))
  with pytest.raises(ValueError, match=r"encoder/layers/intermediate/kernel: expected shape "
                                       r"\(2, 32, 64\), found \(2, 32, 32\)"):
    hf.save(cfg, tree, tmp_path / "x")


def test_tokenizer_files_are_copied(tmp_path):
  cfg = preset("mobilebert_micro", num_hidden_layers=1)
  tree = zeros_tree(cfg)
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "vocab.txt").write_text("[PAD]\n[UNK]\n")
  (tok / "tokenizer_config.json").write_text("{}")
  out = hf.save(cfg, tree, tmp_path / "out", tokenizer_dir=tok)
  assert (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
  assert (out / "tokenizer_config.json").is_file()
  with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
    hf.save(cfg, tree, tmp_path / "out2", tokenizer_dir=tmp_path / "out2_none")


# ----------------------------------------------------------------------------- BERT
BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, hidden_act="gelu", max_position_embeddings=64,
            type_vocab_size=2)


def test_bert_import_parity_and_export(tmp_path):
  ref = randomize(transformers.BertForPreTraining(transformers.BertConfig(**BERT)), seed=7)
  ref.set_attn_implementation("eager")
  ref.save_pretrained(tmp_path / "bert")
  cfg, params = load_quiet(tmp_path / "bert")
  assert not cfg.use_bottleneck and cfg.embedding_size == cfg.hidden_size
  assert not cfg.hf_layer_norm_eps_quirk and cfg.normalization_type == "layer_norm"
  for k, (ids, types, mask) in enumerate(batches(cfg.vocab_size)):
    ours = jax_forward(cfg, params, ids, types, mask)
    r = torch_forward(ref, ids, types, mask)
    compare_all(ours, r, f"bert batch {k}")

  # The BERT layout exports as a bottleneck-free MobileBERT; HF MobileBERT's eps quirk then
  # applies, which save() points out.
  with pytest.warns(UserWarning, match="eps 1e-5"):
    hf.save(cfg, params, tmp_path / "out")
  back, info = transformers.MobileBertForPreTraining.from_pretrained(
      tmp_path / "out", output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  quirk = cfg.replace(hf_layer_norm_eps_quirk=True)
  ids, types, mask = batches(cfg.vocab_size)[1]
  compare_all(jax_forward(quirk, params, ids, types, mask),
              torch_forward(back.eval(), ids, types, mask), "bert exported as MobileBERT")


def test_config_without_model_type_is_inferred(tmp_path):
  """Old BERT config.json files have no model_type; architectures (or key names) decide."""
  model = transformers.BertForPreTraining(transformers.BertConfig(**BERT))
  model.save_pretrained(tmp_path / "b")
  path = tmp_path / "b" / "config.json"
  written = json.loads(path.read_text())
  del written["model_type"]
  path.write_text(json.dumps(written))
  cfg, _ = load_quiet(tmp_path / "b")
  assert not cfg.use_bottleneck and not cfg.hf_layer_norm_eps_quirk
  del written["architectures"]
  path.write_text(json.dumps(written))
  assert load_quiet(tmp_path / "b")[0] == cfg


def test_headless_bert_warns(tmp_path):
  model = randomize(transformers.BertModel(transformers.BertConfig(**BERT)), seed=8)
  model.save_pretrained(tmp_path / "bare")
  with pytest.warns(UserWarning, match=r"cls\.predictions\.transform\.dense\.weight.*"
                                       r"cls\.seq_relationship\.bias"):
    cfg, params = hf.load(tmp_path / "bare")
  np.testing.assert_array_equal(
      params["pooler"]["dense"]["kernel"],
      model.pooler.dense.weight.detach().numpy().T)


def test_bert_decoder_config_rejected(tmp_path):
  model = transformers.BertModel(transformers.BertConfig(**BERT))
  model.save_pretrained(tmp_path / "b")
  cfg = json.loads((tmp_path / "b" / "config.json").read_text())
  cfg["position_embedding_type"] = "relative_key"
  (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="position_embedding_type"):
    hf.load(tmp_path / "b")
