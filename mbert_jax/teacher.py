"""The teacher side of knowledge transfer: load a teacher (sharded, forward only) from an
mbert-jax workdir or a Hugging Face directory, and seed the student from it.

Knows models, checkpoints and sharding; nothing of the training loop.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from mbert_jax import checkpoint as ckpt_lib
from mbert_jax import sharding
from mbert_jax.models import ModelConfig
from mbert_jax.workdir import CHECKPOINT_DIR, MODEL_CONFIG_FILE, is_mbert_workdir


def load_teacher(teacher_cfg, mesh, rules) -> tuple[ModelConfig, Any]:
  """Teacher config and params (sharded by the same rules), from a workdir or an HF directory."""
  path = teacher_cfg.checkpoint
  dtype = teacher_cfg.compute_dtype
  if is_mbert_workdir(path):
    with open(os.path.join(path, MODEL_CONFIG_FILE)) as f:
      cfg = ModelConfig.from_dict(json.load(f)).replace(compute_dtype=dtype)
    _, abstract, shardings = sharding.abstract_params(cfg, mesh, rules)
    step = None if teacher_cfg.step < 0 else int(teacher_cfg.step)
    params, at = ckpt_lib.restore_params_only(os.path.join(path, CHECKPOINT_DIR),
                                              sharding.with_shardings(abstract, shardings), step)
    logging.info("teacher: %s step %d", path, at)
    return cfg, params
  if os.path.exists(os.path.join(path, "config.json")):
    from mbert_jax import hf
    cfg, np_params = hf.load(path)
    cfg = cfg.replace(compute_dtype=dtype)
    _, _, shardings = sharding.abstract_params(cfg, mesh, rules)
    return cfg, sharding.place_tree(np_params, shardings)
  raise FileNotFoundError(f"teacher.checkpoint = {path!r} holds neither an mbert-jax run "
                          "(model_config.json) nor a Hugging Face model (config.json)")


def init_student_from_teacher(params, teacher_params, s_cfg: ModelConfig, t_cfg: ModelConfig,
                              teacher_cfg) -> tuple[Any, list[str]]:
  """Copies embeddings and heads (spec §9.3); returns new params and the copied paths."""
  if s_cfg.hidden_size != t_cfg.hidden_size:
    raise ValueError(f"teacher hidden_size {t_cfg.hidden_size} != student hidden_size "
                     f"{s_cfg.hidden_size}: feature maps must have the same width")
  norm = teacher_cfg.copy_embedding_norm
  if norm == "auto":
    norm = s_cfg.normalization_type == t_cfg.normalization_type
  prefixes = []
  if teacher_cfg.copy_embeddings:
    prefixes += ["embeddings/word_embeddings/", "embeddings/embedding_transformation/",
                 "embeddings/position_embeddings/", "embeddings/token_type_embeddings/"]
  if norm:
    prefixes.append("embeddings/norm/")
  if teacher_cfg.copy_mlm_head:
    prefixes.append("cls/predictions/")
  if teacher_cfg.copy_nsp_head:
    prefixes.append("cls/seq_relationship/")
  s_flat = traverse_util.flatten_dict(params, sep="/")
  t_flat = traverse_util.flatten_dict(teacher_params, sep="/")
  copied = []
  for path in s_flat:
    if not any(path.startswith(p) for p in prefixes):
      continue
    if path not in t_flat:
      raise ValueError(f"cannot copy {path} from the teacher: the teacher has no such parameter")
    if t_flat[path].shape != s_flat[path].shape:
      raise ValueError(f"cannot copy {path} from the teacher: shape {t_flat[path].shape} vs "
                       f"student {s_flat[path].shape}")
    # A real copy: device_put onto an equal sharding would alias the teacher's buffer, and
    # the student's state is donated to every step while the teacher's must survive it.
    s_flat[path] = jax.device_put(jnp.copy(t_flat[path]), s_flat[path].sharding)
    copied.append(path)
  return traverse_util.unflatten_dict(s_flat, sep="/"), copied
