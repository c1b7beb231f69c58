"""Device mesh, logical-axis rules and the shardings of params, batches and train state.

The models annotate every parameter with logical axis names; this module alone decides how
those names land on the `data` / `fsdp` / `tensor` mesh axes. A dimension that the assigned
mesh axes do not divide is replicated (with a log line) instead of failing: the real
vocabulary (30,522) divides by nothing useful.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters: flax takes the first rule whose mesh axis this parameter does not use yet,
# so the later rules are fallbacks that keep fsdp sharding every large tensor somewhere.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("intra", "fsdp"),
    ("mlp", "fsdp"),
    ("qkv", "fsdp"),
    ("embed_table", "fsdp"),
    ("extra", "fsdp"),
    ("embed_out", "fsdp"),
    ("embed_in", None),
    ("layers", None),
    ("positions", None),
    ("types", None),
    ("classes", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor); at most one may be -1, meaning the rest of the devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"mesh: at most one of {MESH_AXES} may be -1, "
                     f"got {dict(zip(MESH_AXES, sizes))}")
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"mesh.{a} = {s}: sizes are positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices do not divide by the fixed axes' "
                       f"product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: XLA propagates shardings through the model; explicit axes would make every
  # gather and einsum spell out its output sharding.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def rules_from_config(mesh_cfg) -> tuple[tuple[str, Any], ...]:
  """`mesh.logical_axis_rules` first (flax takes the first matching rule), then the defaults."""
  extra = mesh_cfg.get("logical_axis_rules", None) if hasattr(mesh_cfg, "get") else None
  if not extra:
    return DEFAULT_RULES
  extra_rules = tuple((str(k), tuple(v) if isinstance(v, (list, tuple)) else v)
                      for k, v in extra)
  return extra_rules + DEFAULT_RULES


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    return mesh.shape[axes]
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, name: str = "") -> P:
  """Drops mesh axes from dimensions they do not divide."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is not None and dim % _axis_size(mesh, axes):
      logging.info("sharding: %s dim %d not divisible by %s; replicated", name, dim, axes)
      axes = None
    fitted.append(axes)
  return P(*fitted)


def tree_shardings(logical_spec_tree, abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for `abstract_tree` (arrays or ShapeDtypeStructs) from logical specs."""
  def one(path, spec, leaf):
    if spec is None:
      spec = P()
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if len(spec) else P()
    name = jax.tree_util.keystr(path)
    return NamedSharding(mesh, fit_spec(mesh_spec, leaf.shape, mesh, name))

  return jax.tree_util.tree_map_with_path(
      one, logical_spec_tree, abstract_tree,
      is_leaf=lambda x: isinstance(x, P) or x is None)


def under_rules(fn: Callable, mesh: Mesh, rules) -> Callable:
  """`fn` traced with `mesh`'s axes and the logical rules in scope, so the models' activation
  constraints (`models.mobilebert.batch_sharded`) bind: every program jitted over a mesh goes
  through this. (`jax.set_mesh` cannot be entered inside a trace; the abstract mesh can.)"""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return traced


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batches split their leading dimension over data x fsdp; the rest is replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of the global batch -> global arrays sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in local.items()}


def check_batch_divisible(global_batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch_size % (shards * grad_accum):
    raise ValueError(
        f"data.batch_size = {global_batch_size} must divide by data x fsdp = {shards}"
        + (f" times train.grad_accum_steps = {grad_accum}" if grad_accum > 1 else ""))
  if global_batch_size % jax.process_count():
    raise ValueError(f"data.batch_size = {global_batch_size} must divide by the "
                     f"{jax.process_count()} processes")


def follow_params(abstract_tree, param_shardings, abstract_params, mesh: Mesh) -> Any:
  """Shardings for a tree (optimizer state) whose parameter-shaped leaves mirror `params`.

  A leaf whose key path ends with a parameter's key path and has its shape (Adam moments,
  accumulators) takes that parameter's sharding; everything else (counts) is replicated.
  Compiler-chosen output shardings would replicate the moments and defeat fsdp.
  """
  by_suffix = {}
  for (path, sh), leaf in zip(jax.tree_util.tree_leaves_with_path(param_shardings),
                              jax.tree.leaves(abstract_params)):
    by_suffix[jax.tree_util.keystr(path)] = (sh, tuple(leaf.shape))
  rep = replicated(mesh)

  def one(path, leaf):
    key = jax.tree_util.keystr(path)
    for suffix, (sh, shape) in by_suffix.items():
      if key.endswith(suffix) and tuple(leaf.shape) == shape:
        return sh
    return rep

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


# ---------------------------------------------------------------------------- model params

def _abstract_model_params(model: nn.Module, init_args: Sequence[Any], mesh: Mesh, rules,
                           **init_kwargs):
  """(boxed abstract tree, unboxed ShapeDtypeStructs, NamedShardings), nothing allocated."""
  boxed = jax.eval_shape(lambda k: model.init(k, *init_args, **init_kwargs)["params"],
                         jax.random.key(0))
  unboxed = nn.unbox(boxed)
  return boxed, unboxed, tree_shardings(nn.get_partition_spec(boxed), unboxed, mesh, rules)


def init_model_params(model: nn.Module, init_args: Sequence[Any], key, shardings, **init_kwargs):
  """Every parameter created already sharded (jit with out_shardings)."""
  init = jax.jit(lambda k: nn.unbox(model.init(k, *init_args, **init_kwargs)["params"]),
                 out_shardings=shardings)
  return init(key)


def abstract_params(model: nn.Module, inputs: tuple[Sequence[Any], dict], mesh: Mesh, rules):
  """(boxed, unboxed, shardings) of `model`'s params for `Module.init(*args, **kwargs)` inputs
  (`models.example_inputs`), nothing allocated."""
  args, kwargs = inputs
  return _abstract_model_params(model, args, mesh, rules, **kwargs)


def init_params(model: nn.Module, inputs: tuple[Sequence[Any], dict], seed: int, mesh: Mesh,
                rules):
  """Sharded fresh params of `model`, and their shardings."""
  args, kwargs = inputs
  _, _, shardings = _abstract_model_params(model, args, mesh, rules, **kwargs)
  return init_model_params(model, args, jax.random.key(seed), shardings, **kwargs), shardings


def place_tree(tree, shardings):
  """Host arrays (numpy) onto devices with the given shardings, as float32."""
  return jax.tree.map(lambda a, s: jax.device_put(np.asarray(a, np.float32), s), tree, shardings)


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying their target shardings (restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)
