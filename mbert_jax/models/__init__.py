"""The MobileBERT model family: one configuration schema, one Flax module; and the pre-norm
rotary teachers (ModernBERT, EuroBERT): `ModernConfig`, `ModernEncoder`, `build_modern`."""

from mbert_jax.models.config import PRESETS, ModelConfig, from_hf_config, preset, to_hf_config
from mbert_jax.models.mobilebert import MobileBert, ModelOutput, SequenceClassifier, SpanExtractor
from mbert_jax.models.modern import ModernEncoder, build_modern
from mbert_jax.models.modern_config import MODERN_PRESETS, ModernConfig, modern_preset


import jax.numpy as jnp

HEADS = ("pretraining", "classification", "question_answering")


def _config(model_config) -> ModelConfig:
  if not isinstance(model_config, ModelConfig):
    model_config = ModelConfig.from_dict(dict(model_config))
  return model_config.validate()


def config_from_dict(fields) -> ModelConfig | ModernConfig:
  """A model section or a saved model_config.json: ModernBERT/EuroBERT's (it names its
  `family`) or the MobileBERT family's. Not validated."""
  fields = dict(fields)
  return (ModernConfig if "family" in fields else ModelConfig).from_dict(fields)


def build(model_config: ModelConfig | ModernConfig) -> MobileBert | ModernEncoder:
  """The Flax module for a validated config (a ModelConfig or a mapping of its fields; a
  ModernConfig builds the ModernBERT/EuroBERT encoder)."""
  if isinstance(model_config, ModernConfig):
    return build_modern(model_config)
  return MobileBert(_config(model_config))


def build_classifier(model_config: ModelConfig, num_labels: int, dropout: float = 0.1):
  """Backbone + pooled-[CLS] classifier (num_labels=1: regression) for GLUE fine-tuning."""
  return SequenceClassifier(_config(model_config), num_labels=num_labels,
                            classifier_dropout=dropout)


def build_span_extractor(model_config: ModelConfig):
  """Backbone + start/end span logits for SQuAD fine-tuning."""
  return SpanExtractor(_config(model_config))


def build_for(model_config: ModelConfig, head: str = "pretraining", num_labels: int = 2,
              dropout: float = 0.0):
  """The module of one of `HEADS`: the pretraining model, a classifier or a span extractor."""
  if head == "classification":
    return build_classifier(model_config, num_labels, dropout)
  if head == "question_answering":
    return build_span_extractor(model_config)
  if head != "pretraining":
    raise ValueError(f"unknown head {head!r}; one of {HEADS}")
  return build(model_config)


def example_inputs(model_config: ModelConfig, head: str = "pretraining", batch: int = 1,
                   seq: int = 8) -> tuple[tuple, dict]:
  """(args, kwargs) of a call that builds the params of a `head` model (`Module.init`): the
  shapes of the params do not depend on them."""
  ids = jnp.zeros((batch, min(seq, model_config.max_position_embeddings)), jnp.int32)
  if head == "pretraining":
    return (ids,), {"masked_positions": jnp.zeros((batch, min(2, ids.shape[1])), jnp.int32)}
  return (ids, jnp.zeros_like(ids), jnp.ones_like(ids)), {}


__all__ = ["HEADS", "build_for", "config_from_dict", "example_inputs", "ModelConfig", "ModelOutput", "MobileBert", "SequenceClassifier", "SpanExtractor",
           "build_classifier", "build_span_extractor", "PRESETS", "build", "from_hf_config",
           "preset", "to_hf_config", "MODERN_PRESETS", "ModernConfig", "ModernEncoder",
           "build_modern", "modern_preset"]
