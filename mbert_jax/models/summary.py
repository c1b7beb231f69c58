"""Parameter table and analytic FLOPs of any model config.

    python -m mbert_jax.models.summary --preset=mobilebert [--seq_len=128]
    python -m mbert_jax.models.summary --preset=modernbert_base   # or eurobert_210m, ...
    python -m mbert_jax.models.summary --config=configs/distill_mobilebert.py [--config.x=y]

FLOPs are 2 x multiply-accumulates of the matmuls (dense layers and the two attention
einsums); norms, activations and softmax are left out, as the paper and BERT count. XLA's cost
analysis cannot be used instead: it counts a scanned loop body once. The sliding-window layers
of ModernBERT are counted at the full [T, T] attention they compute (the band is a mask).
"""

from __future__ import annotations

import collections
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from mbert_jax.models import build
from mbert_jax.models.config import PRESETS, ModelConfig, preset
from mbert_jax.models.modern import build_modern
from mbert_jax.models.modern_config import MODERN_PRESETS, ModernConfig, modern_preset

PARAM_GROUPS = (
    ("embeddings", "embeddings/"),
    ("encoder", "encoder/"),
    ("pooler", "pooler/"),
    ("mlm_head", "cls/predictions/"),
    ("nsp_head", "cls/seq_relationship/"),
)


def param_shapes(cfg: ModelConfig | ModernConfig) -> dict[str, tuple[int, ...]]:
  """Flattened parameter shapes, computed abstractly (no memory is allocated)."""
  model = build_modern(cfg) if isinstance(cfg, ModernConfig) else build(cfg)
  ids = jax.ShapeDtypeStruct((1, min(8, cfg.max_position_embeddings)), jnp.int32)
  pos = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  shapes = jax.eval_shape(
      lambda i, p: model.init(jax.random.key(0), i, masked_positions=p), ids, pos)
  flat = traverse_util.flatten_dict(nn.unbox(shapes["params"]), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def param_table(cfg: ModelConfig | ModernConfig) -> dict[str, int]:
  """Parameter count per group, the backbone (embeddings + encoder + pooler) and the total.
  A tied MLM decoder counts once, in the embeddings."""
  counts: dict[str, int] = collections.OrderedDict((g, 0) for g, _ in PARAM_GROUPS)
  stacked = 0
  for path, shape in param_shapes(cfg).items():
    group = next(g for g, prefix in PARAM_GROUPS if path.startswith(prefix))
    counts[group] += math.prod(shape)
    stacked += math.prod(shape) if path.startswith("encoder/layers/") else 0
  # The layer stack alone: a pre-norm encoder's final norm is outside it.
  counts["per_layer"] = stacked // cfg.num_hidden_layers
  counts["backbone"] = counts["embeddings"] + counts["encoder"] + counts["pooler"]
  counts["total"] = sum(counts[g] for g, _ in PARAM_GROUPS)
  return dict(counts)


def _dense(tokens: int, n_in: int, n_out: int) -> int:
  return 2 * tokens * n_in * n_out


def _modern_layer_flops(cfg: ModernConfig, t: int) -> dict[str, int]:
  h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  q_width, kv_width = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
  return {
      "qkv": _dense(t, h, q_width + 2 * kv_width),
      "attention": 2 * 2 * t * t * q_width,  # scores and context, per query head
      "attention_output": _dense(t, q_width, h),
      "ffn": _dense(t, h, 2 * i) + _dense(t, i, h),  # gated: two input halves
  }


def layer_flops(cfg: ModelConfig | ModernConfig, seq_len: int) -> dict[str, int]:
  """Forward FLOPs of one block for one sequence, by part."""
  if isinstance(cfg, ModernConfig):
    return _modern_layer_flops(cfg, seq_len)
  t, h, b, i = seq_len, cfg.hidden_size, cfg.true_hidden_size, cfg.intermediate_size
  parts: dict[str, int] = {}
  if cfg.use_bottleneck:
    parts["bottleneck"] = _dense(t, h, cfg.intra_bottleneck_size)
    if cfg.key_query_shared_bottleneck and not cfg.use_bottleneck_attention:
      parts["bottleneck"] += _dense(t, h, cfg.intra_bottleneck_size)
  parts["qkv"] = (2 * _dense(t, cfg.attention_input_size, b)
                  + _dense(t, cfg.value_input_size, b))
  parts["attention"] = 2 * 2 * t * t * b  # scores and context
  parts["attention_output"] = _dense(t, b, b)
  parts["ffn"] = cfg.num_feedforward_networks * (_dense(t, b, i) + _dense(t, i, b))
  if cfg.use_bottleneck:
    parts["output_bottleneck"] = _dense(t, b, h)
  return parts


def forward_flops(cfg: ModelConfig | ModernConfig, seq_len: int, num_layers: int | None = None,
                  num_predictions: int | None = None, heads: bool = False) -> int:
  """Forward FLOPs per sequence. Backbone only unless `heads` (MLM at `num_predictions`
  positions, all positions if None; pooler; NSP: the pre-norm families have neither of the
  last two)."""
  layers = cfg.num_hidden_layers if num_layers is None else num_layers
  if isinstance(cfg, ModernConfig):
    total = layers * sum(layer_flops(cfg, seq_len).values())
    if heads:
      p = seq_len if num_predictions is None else num_predictions
      if cfg.head_transform:
        total += _dense(p, cfg.hidden_size, cfg.hidden_size)
      total += _dense(p, cfg.hidden_size, cfg.vocab_size)
    return total
  e = cfg.embedding_size
  total = 0
  if cfg.has_embedding_transformation:
    total += _dense(seq_len, e * (3 if cfg.trigram_input else 1), cfg.hidden_size)
  total += layers * sum(layer_flops(cfg, seq_len).values())
  if heads:
    p = seq_len if num_predictions is None else num_predictions
    total += _dense(p, cfg.hidden_size, cfg.hidden_size) + _dense(p, cfg.hidden_size, cfg.vocab_size)
    if cfg.classifier_activation:
      total += _dense(1, cfg.hidden_size, cfg.hidden_size)
    total += _dense(1, cfg.hidden_size, 2)
  return total


def train_step_flops(cfg: ModelConfig | ModernConfig, seq_len: int, num_predictions: int,
                     num_layers: int | None = None) -> int:
  """FLOPs of forward + backward per sequence (backward = 2x forward)."""
  return 3 * forward_flops(cfg, seq_len, num_layers, num_predictions, heads=True)


def summary(cfg: ModelConfig | ModernConfig, seq_len: int = 128) -> dict[str, Any]:
  return {
      "params": param_table(cfg),
      "seq_len": seq_len,
      "forward_flops_backbone": forward_flops(cfg, seq_len),
      "forward_flops_with_heads": forward_flops(cfg, seq_len, heads=True),
      "layer_flops": layer_flops(cfg, seq_len),
  }


def format_summary(name: str, s: dict[str, Any]) -> str:
  lines = [f"model: {name}", "parameters:"]
  for k, v in s["params"].items():
    lines.append(f"  {k:<12} {v:>14,}")
  lines.append(f"forward FLOPs per sequence @ {s['seq_len']}: "
               f"{s['forward_flops_backbone'] / 1e9:.2f} B (backbone), "
               f"{s['forward_flops_with_heads'] / 1e9:.2f} B (with MLM on every position)")
  lines.append("per layer: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in s["layer_flops"].items()))
  return "\n".join(lines)


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string("preset", None, "a model preset name (mbert_jax.models.PRESETS or "
                      "MODERN_PRESETS)")
  flags.DEFINE_integer("seq_len", 128, "sequence length for FLOPs")
  flags.DEFINE_bool("json", False, "print JSON instead of a table")
  config_flags.DEFINE_config_file("config", None, "a training config file with a `model` section")
  FLAGS = flags.FLAGS

  def run(_):
    if FLAGS.config is not None:
      fields = FLAGS.config.model.to_dict()
      schema = ModernConfig if "family" in fields else ModelConfig
      cfg = schema.from_dict(fields).validate()
      name = FLAGS["config"].value if hasattr(FLAGS["config"], "value") else "config"
      name = "config model"
    elif FLAGS.preset in MODERN_PRESETS:
      cfg, name = modern_preset(FLAGS.preset), FLAGS.preset
    elif FLAGS.preset:
      if FLAGS.preset not in PRESETS:
        raise app.UsageError(f"unknown model preset {FLAGS.preset!r}; choose one of "
                             f"{sorted(PRESETS) + sorted(MODERN_PRESETS)}")
      cfg, name = preset(FLAGS.preset), FLAGS.preset
    else:
      raise app.UsageError("give --preset=<name> or --config=<file>")
    s = summary(cfg, FLAGS.seq_len)
    print(json.dumps(s, indent=1) if FLAGS.json else format_summary(name, s))

  app.run(run, argv)


if __name__ == "__main__":
  main()
