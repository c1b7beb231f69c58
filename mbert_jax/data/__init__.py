"""Pretraining data: BERT's create_pretraining_data as a deterministic, step-indexed pipeline.

    pipe = build_pipeline(config.data, workdir, split="train")
    batch = pipe.batch_at(step, process_index, process_count)

Nothing here imports training code.
"""

from mbert_jax.data.config import default_data_config, validate_data_config
from mbert_jax.data.pipeline import BATCH_KEYS, Pipeline, build_pipeline

__all__ = ["BATCH_KEYS", "Pipeline", "build_pipeline", "default_data_config",
           "validate_data_config"]
