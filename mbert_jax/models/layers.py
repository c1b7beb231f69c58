"""Parameter paths of the model family and its layer stack.

The scanned encoder stores every layer's tensors stacked on a leading layer axis under
`encoder/layers/` (docs/CONTRACTS.md). Whatever needs to address layers (the optimizer's
per-layer trust ratios and multipliers, a truncated phase that trains only the first n layers)
asks this module instead of spelling the path itself.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYER_STACK = "encoder/layers/"


def scanned_stack(block: type[nn.Module], cfg, length: int, in_axes: tuple) -> type[nn.Module]:
  """`block` scanned over `length` layers whose params stack on a leading axis named "layers"
  (what `LAYER_STACK` addresses), rematerialised when `cfg.remat`, unrolled unless
  `cfg.scan_layers`: every encoder of the family stacks its layers this one way."""
  return nn.scan(nn.remat(block, static_argnums=()) if cfg.remat else block,
                 variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=in_axes, length=length, unroll=1 if cfg.scan_layers else length,
                 metadata_params={nn.PARTITION_NAME: "layers"})


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def param_path(keypath) -> str:
  """'/'-joined path of a jax key path, without a leading ``params/`` collection name.

  The collection name is dropped so that rules written against docs/CONTRACTS.md paths work
  whether the caller passes ``variables['params']`` or the whole ``variables`` dict.
  """
  parts = [_key_name(k) for k in keypath]
  if parts and parts[0] == "params":
    parts = parts[1:]
  return "/".join(parts)


def is_stacked(path: str, layer_stack: str = LAYER_STACK) -> bool:
  """Whether the leaf at '/'-path `path` carries a leading layer axis."""
  return ("/" + layer_stack) in ("/" + path)


def map_stacked(fn: Callable, tree: Any, *rest: Any) -> Any:
  """`fn` on every leaf stacked on the layer axis (params, gradients and optimizer moments
  alike: their paths name `encoder/layers/`); other leaves come from the last tree."""

  def one(path, leaf, *others):
    stacked = is_stacked(param_path(path)) and jnp.ndim(leaf) >= 1
    return fn(leaf, *others) if stacked else (others[-1] if others else leaf)
  return jax.tree_util.tree_map_with_path(one, tree, *rest)


def first_layers(tree: Any, n: int) -> Any:
  """The first `n` slices of every layer-stacked leaf."""
  return map_stacked(lambda x: x[:n], tree)


def write_first_layers(full: Any, first: Any) -> Any:
  """`full` with its leading layer slices replaced by `first`'s (in place when donated)."""
  return map_stacked(
      lambda f, s: jax.lax.dynamic_update_slice_in_dim(f, s.astype(f.dtype), 0, 0), full, first)
