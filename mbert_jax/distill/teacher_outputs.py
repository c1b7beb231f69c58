"""A teacher's forward pass as the transfer losses compare it, for teachers that are not
post-norm BERTs: which feature maps a pre-norm teacher offers, and which queries and keys a
rotary teacher offers to MiniLMv2 relations.

Pre-norm teachers (ModernBERT, EuroBERT) return their residual stream between layers: it is
not normalised, and its scale grows with depth (ModernBERT-base's stream reaches norms in the
hundreds in late layers), while their last state has the final norm applied. `kt.teacher_
feature_norm` says what the feature terms see:
  final_norm  every state through the teacher's own final norm (with its learned scale), so
              each layer's target lives where the last one does and where the MLM head reads;
  layer_norm  every state through a parameter-free LayerNorm (no learned scale);
  none        the states as returned (the last one normalised, the others not).
`auto` is final_norm for a pre-norm teacher and none for a BERT-family teacher, whose states
are already the outputs of a LayerNorm.

Rotary teachers return queries and keys before the rotation (`return_qkv`), so that the
position-free projections can be compared. `kt.relation_rotary` says whether MiniLMv2's Q-Q and
K-K relations see them rotated (`rotated`: as the teacher's attention multiplies them, so the
relations carry the teacher's relative positions; each layer uses its own rotary theta) or as
projected (`none`). Grouped-query teachers' keys and values are expanded to one head per query
head (Hugging Face's repeat_kv order), so Q, K and V split into the same relation heads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mbert_jax.distill.feature_losses import parameter_free_layer_norm
from mbert_jax.distill.loss_utils import require_choice
from mbert_jax.models import ModelConfig, ModelOutput
from mbert_jax.models.modern import Normalization, rotary_tables, rotate
from mbert_jax.models.modern_config import ModernConfig

TEACHER_FEATURE_NORMS = ("auto", "final_norm", "layer_norm", "none")
RELATION_ROTARY = ("rotated", "none")


def is_pre_norm(cfg: ModelConfig | ModernConfig) -> bool:
  return isinstance(cfg, ModernConfig)


def qkv_width(cfg: ModelConfig | ModernConfig) -> int:
  """Width of the queries (and, after expansion, of the keys and values) relations split."""
  if isinstance(cfg, ModernConfig):
    return cfg.num_attention_heads * cfg.head_dim
  return cfg.true_hidden_size


def resolve_feature_norm(mode: str, teacher_cfg: ModelConfig | ModernConfig) -> str:
  """'final_norm', 'layer_norm' or 'none'; ValueError for final_norm on a post-norm teacher."""
  require_choice(mode, TEACHER_FEATURE_NORMS, "kt.teacher_feature_norm")
  if mode == "auto":
    return "final_norm" if is_pre_norm(teacher_cfg) else "none"
  if mode == "final_norm" and not is_pre_norm(teacher_cfg):
    raise ValueError("kt.teacher_feature_norm='final_norm' but the teacher is a post-norm "
                     "BERT-family model without a final norm (its states are already "
                     "normalised): set kt.teacher_feature_norm='auto', 'none' or 'layer_norm'")
  return mode


def resolve_relation_rotary(mode: str) -> str:
  require_choice(mode, RELATION_ROTARY, "kt.relation_rotary")
  return mode


def _final_norm(cfg: ModernConfig, teacher_params: Any):
  params = teacher_params["encoder"]["final_norm"]
  norm = Normalization(cfg.norm_type, cfg.norm_eps, cfg.norm_bias, dtype=jnp.float32)
  return lambda x: norm.apply({"params": params}, x)


def normalized_states(out: ModelOutput, cfg: ModelConfig | ModernConfig, teacher_params: Any,
                      mode: str) -> tuple[jax.Array, ...]:
  """The teacher's hidden states under a resolved `kt.teacher_feature_norm` (float32).

  A pre-norm teacher that ran every layer returns its last state normalised already: that one
  is kept, so that no state is normalised twice."""
  states = out.hidden_states
  if mode == "none":
    return states
  ran_all = is_pre_norm(cfg) and len(states) - 1 == cfg.num_hidden_layers
  norm = _final_norm(cfg, teacher_params) if mode == "final_norm" else parameter_free_layer_norm
  last = len(states) - 1
  return tuple(h if (i == last and ran_all) else norm(jnp.asarray(h, jnp.float32))
               for i, h in enumerate(states))


def relation_qkv(out: ModelOutput, cfg: ModernConfig, rotary: str
                 ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], ...]:
  """Per layer, (q, k, v) [B, T, heads * head_dim] of a rotary teacher: rotated per the
  layer's theta when `rotary` is 'rotated', keys and values expanded to the query heads."""
  n, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  groups = cfg.num_kv_groups
  result = []
  for layer, (q, k, v) in enumerate(out.qkv):
    b, t = q.shape[:2]
    q, k, v = q.reshape(b, t, n, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
    if rotary == "rotated":
      theta = cfg.rope_theta if cfg.global_layers[layer] else cfg.local_rope_theta
      cos, sin = rotary_tables(t, hd, theta)
      q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    # Query head h reads key/value head h // groups.
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    result.append(tuple(x.reshape(b, t, n * hd) for x in (q, k, v)))
  return tuple(result)


def adapt(out: ModelOutput, cfg: ModelConfig | ModernConfig, teacher_params: Any,
          feature_norm: str, relation_rotary: str) -> ModelOutput:
  """`out` with the states and Q/K/V the transfer losses compare (resolved options)."""
  hidden = normalized_states(out, cfg, teacher_params, feature_norm)
  qkv = out.qkv
  if qkv and isinstance(cfg, ModernConfig):
    qkv = relation_qkv(out, cfg, relation_rotary)
  return out.replace(hidden_states=hidden, qkv=qkv)


__all__ = ["RELATION_ROTARY", "TEACHER_FEATURE_NORMS", "adapt", "is_pre_norm", "qkv_width",
           "normalized_states", "relation_qkv", "resolve_feature_norm",
           "resolve_relation_rotary"]
