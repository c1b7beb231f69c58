"""Shared pieces of the benchmark scripts: synthetic fixed-shape batches and a compiled step.

Benchmarks time the training step itself, so they feed it a fixed synthetic batch of the real
shapes (the data pipeline has its own benchmark, benchmarks/data_pipeline.py).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def synthetic_batch(vocab: int, batch: int, seq: int, preds: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (batch, seq)).astype(np.int32)
  pos = np.sort(np.stack([rng.choice(np.arange(1, seq - 1), preds, replace=False)
                          for _ in range(batch)]), axis=1).astype(np.int32)
  types = np.zeros((batch, seq), np.int32)
  types[:, seq // 2:] = 1
  return dict(input_ids=ids, token_type_ids=types, attention_mask=np.ones((batch, seq), np.int32),
              masked_lm_positions=pos, masked_lm_ids=np.take_along_axis(ids, pos, 1),
              masked_lm_weights=np.ones((batch, preds), np.float32),
              next_sentence_labels=rng.integers(0, 2, (batch,)).astype(np.int32))


def scratch_stage(steps: int = 1000, lr: float = 1e-3):
  from mbert_jax.distill import schedule
  c = schedule.default_schedule_config()
  c.name = "scratch"
  c.distill_steps = steps
  c.learning_rate = lr
  c.warmup_steps = 0
  return schedule.build_schedule(c, 1)[0]


def compiled_step(s_cfg, stage, mesh, batch, *, teacher_cfg=None, teacher_params=None,
                  optimizer: str = "lamb", seed: int = 0):
  """(compiled step, initial state) for `stage`, sharded over `mesh` by the default rules:
  the training loop's own step (mbert_jax.training.step.make_train_step) on the pretraining task's loss."""
  from configs.common import kt_section
  from mbert_jax.training import optim
  from mbert_jax.distill import objective
  from mbert_jax.distill import schedule
  from mbert_jax.training import sharding
  from mbert_jax import training
  from mbert_jax.distill import teacher as teacher_lib
  from mbert_jax.models import build, example_inputs
  rules = sharding.DEFAULT_RULES
  params, p_sh = sharding.init_params(build(s_cfg), example_inputs(s_cfg), seed, mesh, rules)
  abs_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  o = optim.default_optimizer_config()
  o.name, o.schedule, o.warmup_steps = optimizer, "constant", 0
  tx = optim.build_optimizer(o, abs_params, schedule.lr_multiplier_tree(stage, abs_params),
                             lr_schedule=stage.learning_rate)
  st_sh = training.state.state_shardings(p_sh, tx, abs_params, mesh)
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  state = training.TrainState(step=zero(), params=params,
                           opt_state=jax.jit(tx.init, out_shardings=st_sh.opt_state)(params),
                           nonfinite=zero(), skipped=zero())
  teacher = build(teacher_cfg) if teacher_cfg is not None else None
  t_layers = teacher_cfg.num_hidden_layers if teacher_cfg else None
  kt = kt_section()
  plan = None
  if teacher_cfg is not None:
    # The training loop's transfer plan: it decides, among other things, how deep the teacher
    # runs in a truncated phase (without it the teacher would run every layer).
    plan = teacher_lib.check_transfer(kt, [stage], s_cfg, teacher_cfg, True)
  kt = dict(kt.to_dict(), num_student_layers=s_cfg.num_hidden_layers,
            num_teacher_layers=t_layers or s_cfg.num_hidden_layers)
  ctx = objective.LossContext(build(s_cfg), teacher, stage, kt, False, plan=plan)
  plan = training.StagePlan(name=stage.name, steps=stage.steps, tx=tx,
                         loss=lambda p, aux, b, r: objective.compute_loss(ctx, p, aux, b, r),
                         learning_rate=lambda step: float(stage.learning_rate(step)),
                         trained=objective.first_layers_subset(
                             objective.trained_depth(stage, s_cfg.num_hidden_layers)))
  b_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
  t_sh = jax.tree.map(lambda a: a.sharding, teacher_params) if teacher_params is not None else None
  fn = jax.jit(training.make_train_step(plan, seed, 1), in_shardings=(st_sh, t_sh, b_sh),
               out_shardings=(st_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  gbatch = {k: jax.device_put(v, b_sh[k]) for k, v in batch.items()}
  return fn, state, gbatch, st_sh


def median(xs):
  return statistics.median(xs)


def timed(fn, *args, repeat: int = 1):
  t = time.perf_counter()
  for _ in range(repeat):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / repeat, out
