"""The MobileBERT model family: one configuration schema, one Flax module."""

from mbert_jax.models.config import PRESETS, ModelConfig, from_hf_config, preset, to_hf_config
from mbert_jax.models.mobilebert import MobileBert, ModelOutput


def build(model_config: ModelConfig) -> MobileBert:
  """The Flax module for a validated config (a ModelConfig or a mapping of its fields)."""
  if not isinstance(model_config, ModelConfig):
    model_config = ModelConfig.from_dict(dict(model_config))
  return MobileBert(model_config.validate())


__all__ = ["ModelConfig", "ModelOutput", "MobileBert", "PRESETS", "build", "from_hf_config",
           "preset", "to_hf_config"]
