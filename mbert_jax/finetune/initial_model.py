"""The model a fine-tuning run starts from: where it comes from (an mbert-jax run, a Hugging
Face directory or hub name, or random), its config for the task, the task head, and the
backbone weights placed on the mesh."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any


from mbert_jax.training import sharding
from mbert_jax.models import ModelConfig, build_for, example_inputs
from mbert_jax.models.config import table_size_for
from mbert_jax.interop import model_source
from mbert_jax.finetune.config import TaskInfo

BACKBONE = ("embeddings", "encoder", "pooler")  # the parts a fine-tuning init reads

# ============================================================================ initial model

@dataclasses.dataclass(frozen=True)
class InitSource:
  """The initial model: a checkpoint `model_source.locate` found, or None for random init."""
  checkpoint: model_source.ModelSource | None

  @property
  def kind(self) -> str:
    """'mbert' (a run), 'hf', 'sentence-transformers' (`model_source` kinds) or 'random'."""
    return self.checkpoint.kind if self.checkpoint else "random"

  @property
  def path(self) -> str | None:
    return self.checkpoint.path if self.checkpoint else None

  @property
  def model_config(self) -> ModelConfig | None:
    return self.checkpoint.model_config if self.checkpoint else None

  @property
  def tokenizer_dir(self) -> str | None:
    return self.checkpoint.tokenizer_dir if self.checkpoint else None


def resolve_init(init_cfg) -> InitSource:
  """`init.checkpoint`: an mbert-jax run, a Hugging Face directory or hub name, or "" (random)."""
  spec = str(init_cfg.checkpoint)
  if not spec:
    return InitSource(None)
  return InitSource(model_source.locate(spec, setting="init.checkpoint", allow_hub=True))


def finetune_model_config(source: InitSource, config, vocab_size: int) -> ModelConfig:
  """The model to fine-tune: the checkpoint's architecture (or `model` for random init)."""
  if source.model_config is not None:
    cfg = source.model_config
    if vocab_size > cfg.vocab_size:
      raise ValueError(f"the tokenizer has {vocab_size} tokens but the model's embedding table "
                       f"only {cfg.vocab_size}: use the checkpoint's own vocabulary (data.vocab)")
  else:
    d = dict(config.model.to_dict())
    d["vocab_size"] = table_size_for(d.get("vocab_size", -1), vocab_size)
    cfg = ModelConfig.from_dict(d)
  pooler = config.finetune.pooler
  if pooler != "checkpoint":
    cfg = cfg.replace(classifier_activation=(pooler == "tanh"))
  # Fresh heads follow TF1 (truncated normal) whatever the checkpoint's own init rule was.
  cfg = cfg.replace(compute_dtype=config.train.compute_dtype, init_distribution="truncated")
  return cfg.validate(max_seq_length=int(config.data.max_seq_length))


def check_model_early(source: InitSource, config) -> None:
  """The architecture checks that need no tokenizer, before any data is read."""
  if source.model_config is not None:
    source.model_config.validate(max_seq_length=int(config.data.max_seq_length))
    return
  d = dict(config.model.to_dict())
  if d.get("vocab_size", -1) in (-1, None):
    d["vocab_size"] = 1  # placeholder until the tokenizer is known
  ModelConfig.from_dict(d).validate(max_seq_length=int(config.data.max_seq_length))


def build_model(info: TaskInfo, cfg: ModelConfig, dropout: float):
  head = "question_answering" if info.kind == "squad" else "classification"
  return build_for(cfg, head, info.num_labels, dropout)


def abstract_params(model, cfg: ModelConfig, mesh, rules):
  """(unboxed ShapeDtypeStructs, NamedShardings) of the fine-tuning model, nothing allocated."""
  _, unboxed, shardings = sharding.abstract_params(
      model, example_inputs(cfg, "classification"), mesh, rules)
  return unboxed, shardings


def init_params_of(model, cfg: ModelConfig, key, shardings):
  args, kwargs = example_inputs(cfg, "classification")
  return sharding.init_model_params(model, args, key, shardings, **kwargs)


def load_backbone(source: InitSource, init_cfg, abs_params, shardings) -> dict[str, Any]:
  """The initial model's embeddings / encoder / pooler, placed with the fine-tuning shardings.

  Only the parts both models have are read: a pooler the fine-tuning model lacks is skipped,
  one the checkpoint lacks stays fresh, and so does one it never trained (a run without NSP,
  the pooler's only reader: `ModelSource.nsp_trained`).
  """
  trained_pooler = source.checkpoint.nsp_trained
  if source.model_config.classifier_activation and not trained_pooler:
    logging.info("init: %s trained without NSP, so its pooler never learned: initialised fresh",
                 source.path)
  has = {"embeddings", "encoder"} | (
      {"pooler"} if source.model_config.classifier_activation and trained_pooler else set())
  parts = [k for k in BACKBONE if k in abs_params and k in has]
  target = {k: sharding.with_shardings(abs_params[k], shardings[k]) for k in parts}
  step = None if int(init_cfg.step) < 0 else int(init_cfg.step)
  loaded = model_source.load(source.checkpoint, target, step=step)
  at = "" if loaded.step is None else f" step {loaded.step}"
  logging.info("init: %s%s (%s)", source.path, at, ", ".join(parts))
  return dict(loaded.params)

