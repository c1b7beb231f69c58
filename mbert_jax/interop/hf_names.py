"""Hugging Face MobileBERT / BERT checkpoints, named: the file names of a model directory and
the one table (`entries`) that maps every Hugging Face tensor to its place in the Flax tree.

Import (`hf_import`) and export (`hf_export`) both walk this table, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mbert_jax.models.config import ModelConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# A sentence-transformers package lists its modules here; the encoder is the Transformer one.
SENTENCE_TRANSFORMERS_MODULES = "modules.json"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One Hugging Face tensor.

  `hf`: key without the backbone prefix (`mobilebert.`/`bert.`); layer entries contain `{i}`.
  `ours`: flattened Flax path (`/`). (Tensors Hugging Face builds but this architecture never
  reads are not entries: see `placeholders`.)
  `transpose`: HF `Linear.weight` is [out, in], our kernels [in, out].
  `part`: 'backbone' (must be present), 'pooler' or 'heads' (initialised fresh if absent).
  """
  hf: str
  ours: str
  transpose: bool = False
  layered: bool = False
  part: str = "backbone"


def entries(cfg: ModelConfig) -> list[Entry]:
  """Every tensor of a Hugging Face MobileBERT (or BERT: the same names minus the bottleneck
  parts) checkpoint for this config, in a fixed order."""
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


def placeholders(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Tensors Hugging Face MobileBERT always builds though this architecture never reads them.

  `embedding_transformation` exists even with trigram off and embedding_size == hidden_size
  (then unused): written as identity + zero bias, so that applying it anyway would be a no-op.
  `cls.predictions.dense` is [hidden - embedding, vocab]: zero rows when the sizes are equal.
  """
  out = {}
  if not cfg.has_embedding_transformation:  # implies embedding_size == hidden_size
    out["embeddings.embedding_transformation.weight"] = np.eye(cfg.hidden_size, dtype=np.float32)
    out["embeddings.embedding_transformation.bias"] = np.zeros(cfg.hidden_size, np.float32)
  if not cfg.has_extra_output_weights:
    out["cls.predictions.dense.weight"] = np.zeros((0, cfg.vocab_size), np.float32)
  return out


def is_head(hf_key: str) -> bool:
  """Head tensors (`cls.*`) carry no backbone prefix in any layout."""
  return hf_key.startswith("cls.")


def layout_name(base: str, mlm: bool, nsp: bool) -> str:
  """The transformers class whose checkpoint holds these heads ('bert' or 'mobilebert' base)."""
  family = "MobileBert" if base == "mobilebert" else "Bert"
  if mlm and nsp:
    return family + "ForPreTraining"
  if mlm:
    return family + "ForMaskedLM"
  if nsp:
    return family + "ForNextSentencePrediction"
  return family + "Model"
