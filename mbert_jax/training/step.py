"""The compiled train step: gradients (accumulated over micro-batches), one guarded update."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mbert_jax.training import optim, sharding
from mbert_jax.training.state import TrainState, guarded_update
from mbert_jax.training.task import StagePlan


def make_train_step(plan: StagePlan, seed: int, grad_accum: int) -> Callable:
  """The compiled step: gradients (accumulated over micro-batches), one guarded update.

  With `plan.trained` set (a truncated phase: the first n layer slices of the student's stack)
  the loss sees only that part of the params, the gradients have its size, and the update
  (clipping, optimizer, guard) runs on it and writes it back in place, so a truncated phase
  costs its depth. Differentiating
  the whole stack instead would zero a full-depth gradient every step and, in the layer loop's
  backward, add a stack-sized cotangent every iteration; the n-layer slice is the cheaper copy
  (benchmarks/progressive_cost.py). Nothing may read the old stacks after the write-back, or
  XLA copies each of them first (test_train.py checks the compiled step).
  """
  part = plan.trained

  def grad_fn(params, aux, batch, rng):
    return jax.value_and_grad(plan.loss, has_aux=True)(params, aux, batch, rng)

  def step(state: TrainState, aux, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    trained = state
    if part is not None:
      trained = state.replace(params=part.take(state.params),
                              opt_state=part.take(state.opt_state))
    (loss, terms), grads = optim.accumulate_gradients(
        lambda p, mb, r: grad_fn(p, aux, mb, r), trained.params, batch, grad_accum, rng=rng)
    new_state, grad_norm, finite = guarded_update(trained, plan.tx, loss, grads)
    if part is not None:
      new_state = new_state.replace(params=part.put(state.params, new_state.params),
                                    opt_state=part.put(state.opt_state, new_state.opt_state))
    # No param_norm here: the loop takes it at log steps (`parameter_norm`); in the step it
    # was a pass over every parameter each step, and reading the old stacks alongside the
    # in-place write-back made XLA copy every stack first.
    out = dict(terms)
    out.update(grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    return new_state, out

  return step


def jit_train_step(plan: StagePlan, seed: int, grad_accum: int, state_shardings, batch_shardings,
                   mesh, rules):
  """The step as the loop compiles it (and the planner, for a machine it is not on): sharded
  in and out, the state donated. Lower it with a state, the stage's aux and a batch (concrete
  arrays or ShapeDtypeStructs)."""
  aux_shardings = jax.tree.map(lambda a: a.sharding, plan.aux)
  return jax.jit(sharding.under_rules(make_train_step(plan, seed, grad_accum), mesh, rules),
                 in_shardings=(state_shardings, aux_shardings, batch_shardings),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))
