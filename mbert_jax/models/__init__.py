"""The MobileBERT model family: one configuration schema, one Flax module."""

from mbert_jax.models.config import PRESETS, ModelConfig, from_hf_config, preset, to_hf_config
from mbert_jax.models.mobilebert import MobileBert, ModelOutput, SequenceClassifier, SpanExtractor


def build(model_config: ModelConfig) -> MobileBert:
  """The Flax module for a validated config (a ModelConfig or a mapping of its fields)."""
  if not isinstance(model_config, ModelConfig):
    model_config = ModelConfig.from_dict(dict(model_config))
  return MobileBert(model_config.validate())


def build_classifier(model_config: ModelConfig, num_labels: int, dropout: float = 0.1):
  """Backbone + pooled-[CLS] classifier (num_labels=1: regression) for GLUE fine-tuning."""
  if not isinstance(model_config, ModelConfig):
    model_config = ModelConfig.from_dict(dict(model_config))
  return SequenceClassifier(model_config.validate(), num_labels=num_labels, classifier_dropout=dropout)


def build_span_extractor(model_config: ModelConfig):
  """Backbone + start/end span logits for SQuAD fine-tuning."""
  if not isinstance(model_config, ModelConfig):
    model_config = ModelConfig.from_dict(dict(model_config))
  return SpanExtractor(model_config.validate())


__all__ = ["ModelConfig", "ModelOutput", "MobileBert", "SequenceClassifier", "SpanExtractor",
           "build_classifier", "build_span_extractor", "PRESETS", "build", "from_hf_config",
           "preset", "to_hf_config"]
