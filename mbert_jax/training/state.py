"""The train state a checkpoint holds, its shardings, and the one guarded optimizer update."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mbert_jax.training import sharding


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds: the step, params, optimizer state and the non-finite counters
  (consecutive skipped steps, total skipped steps)."""
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite: jax.Array
  skipped: jax.Array

  def as_dict(self) -> dict[str, Any]:
    # Checkpoints store a plain dict, so their layout does not depend on this class.
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainState":
    return cls(**d)


def state_shardings(param_shardings, tx, abstract_params, mesh) -> TrainState:
  """Shardings of the whole train state; optimizer moments follow their parameters."""
  rep = sharding.replicated(mesh)
  opt = sharding.follow_params(jax.eval_shape(tx.init, abstract_params), param_shardings,
                               abstract_params, mesh)
  return TrainState(step=rep, params=param_shardings, opt_state=opt, nonfinite=rep, skipped=rep)


def abstract_state(shardings: TrainState, abstract_params, tx) -> TrainState:
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  shapes = TrainState(step=scalar, params=abstract_params,
                      opt_state=jax.eval_shape(tx.init, abstract_params), nonfinite=scalar,
                      skipped=scalar)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


def fresh_opt_state(tx, params, opt_shardings, previous=None, reset: bool = True):
  """New optimizer state; without `reset`, moments carry over and only the count restarts."""
  state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  if reset or previous is None or jax.tree.structure(previous) != jax.tree.structure(state):
    return state

  def keep_moments(path, new, old):
    return new if "count" in jax.tree_util.keystr(path) else old
  return jax.tree_util.tree_map_with_path(keep_moments, state, previous)


def guarded_update(state: TrainState, tx, loss, grads) -> tuple[TrainState, jax.Array, jax.Array]:
  """One optimizer update, skipped (and counted) when the loss, the gradient or the updated
  parameters are not finite, so no checkpoint can ever hold a non-finite parameter.

  Returns (new state, gradient norm, finite flag).
  """
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32),
      skipped=(state.skipped + (~finite).astype(jnp.int32)).astype(jnp.int32),
  ), grad_norm, finite


parameter_norm = jax.jit(optax.tree.norm)  # logged at log steps only, not in every step
