"""Hugging Face checkpoints, named: the file names of a model directory, the families read
(MobileBERT, BERT, ModernBERT, EuroBERT) and the one table (`entries`) that maps every Hugging
Face tensor to its place in the Flax tree.

Import (`hf_import`) and export (`hf_export`) both walk this table, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mbert_jax.models.config import ModelConfig
from mbert_jax.models.modern_config import ModernConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# A sentence-transformers package lists its modules here; the encoder is the Transformer one.
SENTENCE_TRANSFORMERS_MODULES = "modules.json"


@dataclasses.dataclass(frozen=True)
class Family:
  """How one Hugging Face model_type names its checkpoints."""
  classes: str   # class-name prefix: {classes}Model, {classes}ForMaskedLM, ...
  prefix: str    # backbone prefix inside task models ('bert' -> 'bert.embeddings...')
  probe: str     # a backbone tensor every checkpoint of the family has (without prefix)


FAMILIES = {
    "mobilebert": Family("MobileBert", "mobilebert", "embeddings.word_embeddings.weight"),
    "bert": Family("Bert", "bert", "embeddings.word_embeddings.weight"),
    "modernbert": Family("ModernBert", "model", "embeddings.tok_embeddings.weight"),
    "eurobert": Family("EuroBert", "model", "embed_tokens.weight"),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One Hugging Face tensor.

  `hf`: key without the backbone prefix (`mobilebert.`/`bert.`); layer entries contain `{i}`.
  `ours`: flattened Flax path (`/`). (Tensors Hugging Face builds but this architecture never
  reads are not entries: see `placeholders`.)
  `transpose`: HF `Linear.weight` is [out, in], our kernels [in, out].
  `part`: 'backbone' (must be present), 'pooler' or 'heads' (initialised fresh if absent).
  `split`: a fused HF projection whose output rows are `split` equal parts (ModernBERT's
    Wqkv: 3, Wi: 2); ours keeps the parts on an axis of their own ([in, split, out/split]).
  `from_layer`: layers below it have no HF tensor (ModernBERT's layer 0 has no attn_norm);
    their slices of our stack are the identity (ones for a scale, zeros otherwise).
  """
  hf: str
  ours: str
  transpose: bool = False
  layered: bool = False
  part: str = "backbone"
  split: int = 0
  from_layer: int = 0

  def to_ours(self, t: np.ndarray) -> np.ndarray:
    """One HF tensor (one layer's) as our layout."""
    t = t.T if self.transpose else t
    return t.reshape(t.shape[:-1] + (self.split, -1)) if self.split else t

  def hf_shape(self, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of one layer's tensor, from our parameter's shape."""
    shape = tuple(ours_shape[1:] if self.layered else ours_shape)
    if self.split:
      shape = shape[:-2] + (shape[-2] * shape[-1],)
    return tuple(reversed(shape)) if self.transpose else shape

  def identity(self, ours_shape: tuple[int, ...]) -> np.ndarray:
    """A layer slice for layers below `from_layer`: the no-op value of the parameter."""
    shape = tuple(ours_shape[1:] if self.layered else ours_shape)
    fill = np.ones if self.ours.endswith("/scale") else np.zeros
    return fill(shape, np.float32)


def entries(cfg: ModelConfig | ModernConfig) -> list[Entry]:
  """Every tensor of a Hugging Face checkpoint for this config, in a fixed order: MobileBERT
  (or BERT: the same names minus the bottleneck parts), ModernBERT or EuroBERT."""
  if isinstance(cfg, ModernConfig):
    return _modern_entries(cfg)
  out: list[Entry] = []

  def dense(hf, ours, **kw):
    out.append(Entry(f"{hf}.weight", f"{ours}/kernel", transpose=True, **kw))
    out.append(Entry(f"{hf}.bias", f"{ours}/bias", **kw))

  def norm(hf, ours, **kw):
    out.append(Entry(f"{hf}.weight", f"{ours}/scale", **kw))
    out.append(Entry(f"{hf}.bias", f"{ours}/bias", **kw))

  for table in ("word", "position", "token_type"):
    out.append(Entry(f"embeddings.{table}_embeddings.weight",
                     f"embeddings/{table}_embeddings/embedding"))
  if cfg.has_embedding_transformation:
    dense("embeddings.embedding_transformation", "embeddings/embedding_transformation")
  norm("embeddings.LayerNorm", "embeddings/norm")

  L, E = "encoder.layer.{i}.", "encoder/layers/"
  lay = dict(layered=True)
  if cfg.use_bottleneck:
    dense(L + "bottleneck.input.dense", E + "bottleneck_input/dense", **lay)
    norm(L + "bottleneck.input.LayerNorm", E + "bottleneck_input/norm", **lay)
    if cfg.key_query_shared_bottleneck and not cfg.use_bottleneck_attention:
      dense(L + "bottleneck.attention.dense", E + "bottleneck_attention/dense", **lay)
      norm(L + "bottleneck.attention.LayerNorm", E + "bottleneck_attention/norm", **lay)
  for proj in ("query", "key", "value"):
    dense(L + f"attention.self.{proj}", E + f"attention/{proj}", **lay)
  dense(L + "attention.output.dense", E + "attention/output/dense", **lay)
  norm(L + "attention.output.LayerNorm", E + "attention/output/norm", **lay)
  for j in range(cfg.num_feedforward_networks - 1):
    dense(L + f"ffn.{j}.intermediate.dense", E + f"ffn_{j}/intermediate", **lay)
    dense(L + f"ffn.{j}.output.dense", E + f"ffn_{j}/output/dense", **lay)
    norm(L + f"ffn.{j}.output.LayerNorm", E + f"ffn_{j}/output/norm", **lay)
  dense(L + "intermediate.dense", E + "intermediate", **lay)
  dense(L + "output.dense", E + "output/dense", **lay)
  norm(L + "output.LayerNorm", E + "output/norm", **lay)
  if cfg.use_bottleneck:
    dense(L + "output.bottleneck.dense", E + "output/bottleneck/dense", **lay)
    norm(L + "output.bottleneck.LayerNorm", E + "output/bottleneck/norm", **lay)

  if cfg.classifier_activation:
    dense("pooler.dense", "pooler/dense", part="pooler")

  heads = dict(part="heads")
  dense("cls.predictions.transform.dense", "cls/predictions/transform/dense", **heads)
  norm("cls.predictions.transform.LayerNorm", "cls/predictions/transform/norm", **heads)
  if cfg.has_extra_output_weights:
    out.append(Entry("cls.predictions.dense.weight", "cls/predictions/extra_output_weights",
                     transpose=True, **heads))
  out.append(Entry("cls.predictions.bias", "cls/predictions/output_bias", **heads))
  dense("cls.seq_relationship", "cls/seq_relationship", **heads)
  return out


def _modern_entries(cfg: ModernConfig) -> list[Entry]:
  """ModernBERT (`model.layers.{i}.attn.Wqkv`, fused) and EuroBERT (Llama names) tensors."""
  out: list[Entry] = []
  lay = dict(layered=True)
  E = "encoder/layers/"

  def linear(hf, ours, bias, **kw):
    out.append(Entry(f"{hf}.weight", f"{ours}/kernel", transpose=True, **kw))
    if bias:
      out.append(Entry(f"{hf}.bias", f"{ours}/bias", **kw))

  def norm(hf, ours, **kw):
    out.append(Entry(f"{hf}.weight", f"{ours}/scale", **kw))
    if cfg.norm_bias:
      out.append(Entry(f"{hf}.bias", f"{ours}/bias", **kw))

  heads = dict(part="heads")
  if cfg.family == "modernbert":
    L = "layers.{i}."
    out.append(Entry("embeddings.tok_embeddings.weight", "embeddings/word_embeddings/embedding"))
    norm("embeddings.norm", "embeddings/norm")
    norm(L + "attn_norm", E + "attn_norm", from_layer=0 if cfg.first_layer_attn_norm else 1,
         **lay)
    linear(L + "attn.Wqkv", E + "attention/qkv", cfg.attention_bias, split=3, **lay)
    linear(L + "attn.Wo", E + "attention/output", cfg.attention_bias, **lay)
    norm(L + "mlp_norm", E + "mlp_norm", **lay)
    linear(L + "mlp.Wi", E + "mlp/wi", cfg.mlp_bias, split=2, **lay)
    linear(L + "mlp.Wo", E + "mlp/output", cfg.mlp_bias, **lay)
    norm("final_norm", "encoder/final_norm")
    linear("head.dense", "cls/predictions/transform/dense", cfg.head_bias, **heads)
    norm("head.norm", "cls/predictions/transform/norm", **heads)
    decoder = "decoder"
  else:
    L = "layers.{i}."
    out.append(Entry("embed_tokens.weight", "embeddings/word_embeddings/embedding"))
    norm(L + "input_layernorm", E + "attn_norm", **lay)
    for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
                     ("o_proj", "output")):
      linear(L + "self_attn." + hf, E + "attention/" + ours, cfg.attention_bias, **lay)
    norm(L + "post_attention_layernorm", E + "mlp_norm", **lay)
    for hf, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "output")):
      linear(L + "mlp." + hf, E + "mlp/" + ours, cfg.mlp_bias, **lay)
    norm("norm", "encoder/final_norm")
    decoder = "lm_head"
  if not cfg.tie_word_embeddings:
    out.append(Entry(f"{decoder}.weight", "cls/predictions/decoder", **heads))
  if cfg.decoder_bias:
    out.append(Entry(f"{decoder}.bias", "cls/predictions/output_bias", **heads))
  return out


def tied_keys(cfg: ModelConfig | ModernConfig) -> dict[str, str]:
  """Output-embedding tensors some savers write though they are tied to the word table:
  HF key -> our word table's path. They must equal the table."""
  table = "embeddings/word_embeddings/embedding"
  if not isinstance(cfg, ModernConfig):
    return {"cls.predictions.decoder.weight": table}
  if not cfg.tie_word_embeddings:
    return {}
  return {("decoder" if cfg.family == "modernbert" else "lm_head") + ".weight": table}


def placeholders(cfg: ModelConfig | ModernConfig) -> dict[str, np.ndarray]:
  """Tensors Hugging Face MobileBERT always builds though this architecture never reads them.

  `embedding_transformation` exists even with trigram off and embedding_size == hidden_size
  (then unused): written as identity + zero bias, so that applying it anyway would be a no-op.
  `cls.predictions.dense` is [hidden - embedding, vocab]: zero rows when the sizes are equal.
  """
  out = {}
  if isinstance(cfg, ModernConfig):
    return out
  if not cfg.has_embedding_transformation:  # implies embedding_size == hidden_size
    out["embeddings.embedding_transformation.weight"] = np.eye(cfg.hidden_size, dtype=np.float32)
    out["embeddings.embedding_transformation.bias"] = np.zeros(cfg.hidden_size, np.float32)
  if not cfg.has_extra_output_weights:
    out["cls.predictions.dense.weight"] = np.zeros((0, cfg.vocab_size), np.float32)
  return out


# Task-model tensors outside the backbone: BERT's `cls.*`, ModernBERT's `head.*` and
# `decoder.*`, EuroBERT's `lm_head.*`. No family's backbone names start so.
_HEAD_PREFIXES = ("cls.", "head.", "decoder.", "lm_head.")


def is_head(hf_key: str) -> bool:
  """Head tensors carry no backbone prefix in any layout."""
  return hf_key.startswith(_HEAD_PREFIXES)


def layout_name(base: str, mlm: bool, nsp: bool) -> str:
  """The transformers class whose checkpoint holds these heads (`base`: a FAMILIES key)."""
  family = FAMILIES[base].classes
  if mlm and nsp:
    return family + "ForPreTraining"
  if mlm:
    return family + "ForMaskedLM"
  if nsp:
    return family + "ForNextSentencePrediction"
  return family + "Model"
