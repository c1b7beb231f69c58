"""Optimizers, learning-rate schedules and gradient accumulation.

The BERT/MobileBERT family of optimizers (TF1 LAMB, TF1 AdamW, bias-corrected AdamW/Adam) share
one custom transformation, :func:`gated_adam`, because none of optax's stock optimizers can
express what MobileBERT's TF1 training code (``lamb_optimizer.py``, BERT's ``optimization.py``)
does:

* no bias correction (TF1), ε added to ``sqrt(v)``;
* norm parameters and biases excluded from weight decay *and* from the trust ratio;
* the trust ratio computed per layer slice for leaves stacked on a leading layer axis
  (``encoder/layers/...`` in the scanned encoder), never over the stacked tensor;
* per-leaf (and per-layer) learning-rate multipliers that are functions of the step, with
  TF1's moment gate ``m ← gate·(β1·m + (1−β1)·g)`` so that a layer whose multiplier is 0 keeps
  zero moments and does not move.

Leaves that are frozen for a whole stage go through ``optax.set_to_zero`` inside
``optax.partition`` so they carry no optimizer state at all.

Gradient accumulation is *not* part of the optimizer: the training step (training/step.py)
calls :func:`accumulate_gradients` inside its jitted step, which scans over micro-batches and
hands the averaged gradient to a single optimizer update. That keeps the optimizer state free
of accumulators and makes one optimizer step = one trainer step = one schedule step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mbert_jax.models.layers import LAYER_STACK, param_path

__all__ = [
  "OPTIMIZER_NAMES",
  "SCHEDULE_KINDS",
  "GatedAdamState",
  "accumulate_gradients",
  "build_optimizer",
  "default_optimizer_config",
  "excluded_from_decay",
  "gated_adam",
  "learning_rate_at",
  "lr_schedule_from_config",
  "make_lr_schedule",
  "optimizer_step",
  "param_path",
  "validate_optimizer_config",
]

OPTIMIZER_NAMES = ("lamb", "adamw", "adamw_tf1", "adam")
SCHEDULE_KINDS = ("constant", "linear", "polynomial", "cosine")

# Leaves under the model's layer stack carry a leading layer axis; their trust ratios and
# multipliers are per layer slice.
LAYER_AXIS_PREFIX = LAYER_STACK

Schedule = Callable[[Any], jax.Array]
Multiplier = Callable[[Any], Any]


# --------------------------------------------------------------------------------------------
# Parameter paths and exclusion rules
# --------------------------------------------------------------------------------------------


_NORM_MARKERS = ("layernorm", "layer_norm", "nonorm", "no_norm")


def excluded_from_decay(path: str) -> bool:
  """TF1's exclusion list (``LayerNorm``, ``layer_norm``, ``FakeLayerNorm``, ``bias``).

  Applies to weight decay and to the LAMB trust ratio. Our norm modules are called ``norm``
  (LayerNorm and NoNorm alike); Flax's auto-names (``LayerNorm_0``) and HF-style names are
  matched too so that fine-tuning heads built elsewhere are treated the same way. ``bias`` is
  a substring match, as in TF1's regex, so ``cls/predictions/output_bias`` is excluded.
  """
  parts = path.split("/")
  if "bias" in parts[-1].lower():
    return True
  for part in parts[:-1]:
    low = part.lower()
    if low == "norm" or any(marker in low for marker in _NORM_MARKERS):
      return True
  return False


def _is_stacked(path: str, layer_axis_prefix: str) -> bool:
  return bool(layer_axis_prefix) and path.startswith(layer_axis_prefix)


# --------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    else:
      raise ValueError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def _check_float(name: str, value, *, minimum=None, strict=False, maximum=None,
                 max_strict=False) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name} must be a number, got {value!r}")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}")
  if minimum is not None and (value < minimum or (strict and value == minimum)):
    raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
  if maximum is not None and (value > maximum or (max_strict and value == maximum)):
    raise ValueError(f"{name} must be {'<' if max_strict else '<='} {maximum}, got {value}")
  return value


def make_lr_schedule(kind: str, base_lr: float, total_steps: int = 0, warmup_steps: int = 0,
                     end_factor: float = 0.0, power: float = 1.0) -> Schedule:
  """Step → learning rate (float32 scalar); pure in the step and jit-compatible.

  * ``constant``: ``base_lr``.
  * ``linear`` / ``polynomial``: TF1 ``tf.train.polynomial_decay`` measured from step 0 (not
    from the end of warm-up) down to ``base_lr·end_factor`` at ``total_steps``, held there
    afterwards. ``linear`` is ``polynomial`` with ``power = 1``.
  * ``cosine``: cosine from ``base_lr`` at the end of warm-up to ``base_lr·end_factor`` at
    ``total_steps`` (not a TF1 schedule; an extra for sweeps).

  For every kind, while ``step < warmup_steps`` the rate is ``base_lr·step/warmup_steps``,
  overriding the decayed value exactly as TF1 ``optimization.py`` does (so step 0 has lr 0).
  """
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f"unknown learning-rate schedule {kind!r}; expected one of {SCHEDULE_KINDS}")
  base_lr = _check_float("base_lr (learning_rate)", base_lr, minimum=0.0)
  total_steps = _check_int("total_steps", total_steps, 0)
  warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
  end_factor = _check_float("end_factor", end_factor, minimum=0.0)
  power = _check_float("power", power, minimum=0.0, strict=True)
  if kind == "linear" and power != 1.0:
    raise ValueError(f"schedule 'linear' has power 1; got power={power} (use 'polynomial')")
  if kind != "constant":
    if total_steps <= 0:
      raise ValueError(f"schedule {kind!r} needs total_steps > 0, got {total_steps}")
    if warmup_steps > total_steps:
      raise ValueError(
          f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
  end_lr = base_lr * end_factor
  # optax's schedules, composed the TF1 way: the decay is measured from step 0, and during
  # warm-up the linear ramp replaces the decayed value.
  if kind == "constant":
    main = optax.constant_schedule(base_lr)
  elif kind in ("linear", "polynomial"):
    main = optax.polynomial_schedule(base_lr, end_lr, power, total_steps)
  else:
    cosine = optax.cosine_decay_schedule(base_lr, max(total_steps - warmup_steps, 1), end_factor)
    main = lambda step: cosine(jnp.maximum(step - warmup_steps, 0))
  ramp = optax.linear_schedule(0.0, base_lr, max(warmup_steps, 1))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = jnp.asarray(main(step), jnp.float32)
    if warmup_steps > 0:
      lr = jnp.where(step < warmup_steps, ramp(step), lr)
    return lr.astype(jnp.float32)

  return schedule


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Defaults follow TF1 MobileBERT's pre-training distillation (LAMB at 1.5e-3, 10k warm-up
  steps, linear decay over 500k steps); stages override what differs."""
  cfg = ml_collections.ConfigDict()
  cfg.name = "lamb"
  cfg.learning_rate = 1.5e-3
  cfg.b1 = 0.9
  cfg.b2 = 0.999
  cfg.eps = 1e-6
  cfg.weight_decay = 0.01
  cfg.clip_norm = 1.0
  cfg.schedule = "linear"
  cfg.warmup_steps = 10_000
  cfg.end_factor = 1e-4
  cfg.power = 1.0
  cfg.total_steps = 500_000
  return cfg


_CONFIG_FIELDS = tuple(default_optimizer_config().keys())


def validate_optimizer_config(opt_cfg) -> ml_collections.ConfigDict:
  """Checks every field and returns a locked copy; raises ValueError naming the problem."""
  if isinstance(opt_cfg, Mapping) and not isinstance(opt_cfg, ml_collections.ConfigDict):
    opt_cfg = ml_collections.ConfigDict(dict(opt_cfg))
  if not isinstance(opt_cfg, ml_collections.ConfigDict):
    raise TypeError(f"optimizer config must be an ml_collections.ConfigDict, got {type(opt_cfg)}")
  keys = set(opt_cfg.keys())
  missing = [k for k in _CONFIG_FIELDS if k not in keys]
  unknown = sorted(keys - set(_CONFIG_FIELDS))
  if missing:
    raise ValueError(f"optimizer config is missing fields {missing}")
  if unknown:
    raise ValueError(f"optimizer config has unknown fields {unknown}; "
                     f"known: {list(_CONFIG_FIELDS)}")
  if opt_cfg.name not in OPTIMIZER_NAMES:
    raise ValueError(f"unknown optimizer name {opt_cfg.name!r}; expected one of {OPTIMIZER_NAMES}")
  _check_float("learning_rate", opt_cfg.learning_rate, minimum=0.0)
  _check_float("b1", opt_cfg.b1, minimum=0.0, maximum=1.0, max_strict=True)
  _check_float("b2", opt_cfg.b2, minimum=0.0, maximum=1.0, max_strict=True)
  # ε > 0 is required: without bias correction, untouched moments give 0/(0+ε).
  _check_float("eps", opt_cfg.eps, minimum=0.0, strict=True)
  _check_float("weight_decay", opt_cfg.weight_decay, minimum=0.0)
  if opt_cfg.name == "adam" and opt_cfg.weight_decay != 0:
    raise ValueError(
        f"optimizer 'adam' has no weight decay but weight_decay={opt_cfg.weight_decay}; "
        "set weight_decay=0 or use 'adamw'/'adamw_tf1'")
  if opt_cfg.clip_norm is not None:
    _check_float("clip_norm", opt_cfg.clip_norm, minimum=0.0)
  # Building the schedule validates schedule/warmup/total/end_factor/power.
  lr_schedule_from_config(opt_cfg)
  out = ml_collections.ConfigDict(opt_cfg.to_dict())
  out.lock()
  return out


def lr_schedule_from_config(opt_cfg) -> Schedule:
  return make_lr_schedule(opt_cfg.schedule, opt_cfg.learning_rate, opt_cfg.total_steps,
                          opt_cfg.warmup_steps, opt_cfg.end_factor, opt_cfg.power)


def learning_rate_at(opt_cfg, step) -> jax.Array:
  """Learning rate the config's schedule gives at ``step`` (the optimizer's own count).

  Multipliers are not included: this is the global rate the stage logs.
  """
  return lr_schedule_from_config(opt_cfg)(step)


# --------------------------------------------------------------------------------------------
# The transformation
# --------------------------------------------------------------------------------------------


class GatedAdamState(NamedTuple):
  count: jax.Array  # int32: optimizer steps taken; the step passed to schedule/multipliers
  mu: Any           # fp32 first moments (MaskedNode where another partition owns the leaf)
  nu: Any           # fp32 second moments


def _as_schedule(learning_rate) -> Schedule:
  if callable(learning_rate):
    return learning_rate
  lr = _check_float("learning_rate", learning_rate, minimum=0.0)
  return lambda step: jnp.full((), lr, jnp.float32)


def _check_multiplier_shape(shape, path: str, leaf_shape, stacked: bool) -> None:
  shape = tuple(shape)
  if shape == ():
    return
  if not stacked:
    raise ValueError(
        f"multiplier for {path!r} returned shape {shape}, but only leaves stacked on a "
        "layer axis (under the layer-axis prefix, 'encoder/layers/' by default) accept "
        "per-layer vectors; return a scalar")
  if shape != (leaf_shape[0],):
    raise ValueError(
        f"multiplier for {path!r} returned shape {shape}; expected () or "
        f"({leaf_shape[0]},) for a leaf of shape {tuple(leaf_shape)}")


def _multiplier_value(fn: Multiplier, step, path: str, leaf_shape, stacked: bool) -> jax.Array:
  value = jnp.asarray(fn(step), jnp.float32)
  n = nonzero_layers(fn)
  if (stacked and value.ndim == 1 and leaf_shape and n is not None
      and n <= leaf_shape[0] < len(value)):
    # The training step updates only the first layer slices when the rest get no gradient and
    # a multiplier that is statically 0 (`StagePlan.trained`): the dropped entries are 0.
    value = value[:leaf_shape[0]]
  _check_multiplier_shape(value.shape, path, leaf_shape, stacked)
  return value


def nonzero_layers(fn: Multiplier | None) -> int | None:
  """How many leading layer slices a stacked leaf's multiplier can ever make non-zero (static:
  its `nonzero_layers` attribute, as `schedule.ScheduledMultiplier` has); None if unknown."""
  n = getattr(fn, "nonzero_layers", None)
  return n if isinstance(n, int) else None


def gated_adam(learning_rate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
               weight_decay: float = 0.01, bias_correction: bool = False,
               layer_adaptation: bool = False,
               multipliers: Mapping[str, Multiplier] | None = None,
               exclude_fn: Callable[[str], bool] = excluded_from_decay,
               layer_axis_prefix: str = LAYER_AXIS_PREFIX) -> optax.GradientTransformation:
  """Adam-family update with TF1 semantics, per-leaf multipliers and the TF1 moment gate.

  Per leaf (per layer slice for leaves under ``layer_axis_prefix``), at step ``t`` (the
  optimizer's own count, starting at 0)::

    k    = multiplier(t)            # 1 where no multiplier is given
    gate = k > 0
    m    = gate·(b1·m + (1−b1)·g);  v = gate·(b2·v + (1−b2)·g²)
    u    = m̂/(sqrt(v̂)+eps) + gate·wd·w          (m̂ = m, v̂ = v unless bias_correction)
    r    = ‖w‖/‖u‖ if layer_adaptation, both norms > 0 and the leaf is not excluded, else 1
    Δw   = −k·r·lr(t)·u

  Excluded leaves (``exclude_fn(path)``) get neither weight decay nor the trust ratio.
  ``multipliers`` maps '/'-paths (see :func:`param_path`) to ``f(step) -> scalar`` or, for
  stacked leaves, an ``[L]`` vector. Moments are fp32 whatever the parameter dtype; the
  returned updates have the parameter dtype.
  """
  schedule = _as_schedule(learning_rate)
  b1 = _check_float("b1", b1, minimum=0.0, maximum=1.0, max_strict=True)
  b2 = _check_float("b2", b2, minimum=0.0, maximum=1.0, max_strict=True)
  eps = _check_float("eps", eps, minimum=0.0, strict=True)
  weight_decay = _check_float("weight_decay", weight_decay, minimum=0.0)
  multipliers = dict(multipliers or {})
  for path, fn in multipliers.items():
    if not callable(fn):
      raise ValueError(f"multiplier for {path!r} must be callable f(step), got {fn!r}")

  def init_fn(params):
    paths = {param_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)}
    unknown = sorted(set(multipliers) - paths)
    if unknown:
      raise ValueError(f"multipliers given for paths not in the parameters: {unknown}")
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    return GatedAdamState(count=jnp.zeros((), jnp.int32),
                          mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("gated_adam needs params (weight decay and trust ratio use them)")
    step = state.count
    lr = jnp.asarray(schedule(step), jnp.float32)
    keyed, treedef = jax.tree_util.tree_flatten_with_path(updates)
    w_leaves = treedef.flatten_up_to(params)
    mu_leaves = treedef.flatten_up_to(state.mu)
    nu_leaves = treedef.flatten_up_to(state.nu)
    if bias_correction:
      t = (step + 1).astype(jnp.float32)
      c1 = 1.0 - b1 ** t
      c2 = 1.0 - b2 ** t

    new_u, new_mu, new_nu = [], [], []
    for (kp, g), w, mu, nu in zip(keyed, w_leaves, mu_leaves, nu_leaves):
      path = param_path(kp)
      stacked = _is_stacked(path, layer_axis_prefix)
      if stacked and jnp.ndim(w) == 0:
        raise ValueError(f"{path!r} is under {layer_axis_prefix!r} but is a scalar; "
                         "stacked leaves need a leading layer axis")
      g32 = jnp.asarray(g, jnp.float32)
      w32 = jnp.asarray(w, jnp.float32)
      # Per-slice quantities broadcast along the leading layer axis.
      bshape = (w32.shape[0],) + (1,) * (w32.ndim - 1) if stacked else ()
      fn = multipliers.get(path)
      if fn is None:
        k = gate = None
      else:
        k = _multiplier_value(fn, step, path, w32.shape, stacked)
        if k.ndim:
          k = k.reshape(bshape)
        gate = (k > 0).astype(jnp.float32)

      m = b1 * mu + (1.0 - b1) * g32
      v = b2 * nu + (1.0 - b2) * g32 * g32
      if gate is not None:
        m = gate * m
        v = gate * v
      m_hat, v_hat = (m / c1, v / c2) if bias_correction else (m, v)
      u = m_hat / (jnp.sqrt(v_hat) + eps)
      excluded = exclude_fn(path)
      if weight_decay > 0 and not excluded:
        u = u + (weight_decay if gate is None else gate * weight_decay) * w32
      if layer_adaptation and not excluded:
        axes = tuple(range(1, w32.ndim)) if stacked else None
        w_norm = jnp.sqrt(jnp.sum(w32 * w32, axis=axes, keepdims=stacked))
        u_norm = jnp.sqrt(jnp.sum(u * u, axis=axes, keepdims=stacked))
        ratio = jnp.where((w_norm > 0) & (u_norm > 0),
                          w_norm / jnp.where(u_norm > 0, u_norm, 1.0), 1.0)
        u = ratio * u
      scale = lr if k is None else k * lr
      new_u.append((-scale * u).astype(jnp.result_type(w)))
      new_mu.append(m)
      new_nu.append(v)

    unflat = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
    return unflat(new_u), GatedAdamState(count=optax.safe_increment(step),
                                         mu=unflat(new_mu), nu=unflat(new_nu))

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------

_TRAIN, _FROZEN = "train", "frozen"


def _UNIT(step):  # sentinel: multiplier ×1 without a moment gate
  return jnp.ones((), jnp.float32)


def _multiplier_table(params, multipliers) -> tuple[dict[str, Multiplier | None], Any]:
  """path → callable (trained with that multiplier) or None (frozen); plus the label tree."""
  param_keyed = jax.tree_util.tree_leaves_with_path(params)
  param_paths = [param_path(kp) for kp, _ in param_keyed]
  if multipliers is None:
    table = {p: _UNIT for p in param_paths}
  else:
    is_mult_leaf = lambda x: x is None or callable(x) or isinstance(x, (int, float))
    mult_keyed = jax.tree_util.tree_leaves_with_path(multipliers, is_leaf=is_mult_leaf)
    table = {}
    for kp, fn in mult_keyed:
      path = param_path(kp)
      if fn is None:
        table[path] = None
      elif isinstance(fn, bool):
        raise ValueError(f"multiplier for {path!r} is a bool; use None to freeze a leaf")
      elif isinstance(fn, (int, float)):
        const = _check_float(f"multiplier for {path!r}", fn)
        table[path] = (lambda c: (lambda step: jnp.full((), c, jnp.float32)))(const)
      elif callable(fn):
        table[path] = fn
      else:
        raise ValueError(f"multiplier for {path!r} must be None, a number or f(step); "
                         f"got {type(fn).__name__}")
    missing = sorted(set(param_paths) - set(table))
    extra = sorted(set(table) - set(param_paths))
    if missing or extra:
      raise ValueError("multipliers tree does not match params: "
                       f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"extra {extra[:8]}{'...' if len(extra) > 8 else ''}")
  # Surface shape mistakes at build time rather than deep inside the first jitted step.
  for (kp, leaf) in param_keyed:
    path = param_path(kp)
    fn = table[path]
    if fn is None or fn is _UNIT:
      continue
    out = jax.eval_shape(lambda s: jnp.asarray(fn(s)), jax.ShapeDtypeStruct((), jnp.int32))
    _check_multiplier_shape(out.shape, path, jnp.shape(leaf),
                            _is_stacked(path, LAYER_AXIS_PREFIX))
  if all(fn is None for fn in table.values()):
    raise ValueError("every parameter is frozen (all multipliers are None); nothing to train")
  labels = jax.tree_util.tree_map_with_path(
      lambda kp, _: _FROZEN if table[param_path(kp)] is None else _TRAIN, params)
  return table, labels


def build_optimizer(opt_cfg, params, multipliers=None, lr_schedule: Schedule | None = None, *,
                    exclude_fn: Callable[[str], bool] = excluded_from_decay
                    ) -> optax.GradientTransformation:
  """Optimizer for one training stage.

  Args:
    opt_cfg: ConfigDict as :func:`default_optimizer_config` (validated here).
    params: parameter tree (arrays or ShapeDtypeStructs); fixes paths and the frozen set.
    multipliers: None (every leaf ×1), or a pytree matching ``params`` whose leaves are None
        (frozen for the stage: no update, no optimizer state), a number, or ``f(step)`` returning
        a scalar or, for leaves under ``encoder/layers/``, an ``[L]`` vector. ``step`` is the
        optimizer's own count (steps since this optimizer state was initialised). A multiplier
        ≤ 0 gates that leaf's/slice's moments to 0 (TF1 moment gate).
    lr_schedule: step → lr; overrides the schedule fields of ``opt_cfg``.
    exclude_fn: path → True for leaves without weight decay and trust ratio.

  Global-norm clipping (``clip_norm``) runs first, over every gradient including frozen
  leaves, as TF1 does. Gradient accumulation is the step's (:func:`accumulate_gradients`,
  ``train.grad_accum_steps``), not the optimizer's.
  """
  cfg = validate_optimizer_config(opt_cfg)
  schedule = lr_schedule if lr_schedule is not None else lr_schedule_from_config(cfg)
  if not callable(schedule):
    raise ValueError(f"lr_schedule must be callable f(step), got {schedule!r}")
  table, labels = _multiplier_table(params, multipliers)
  mults = {p: fn for p, fn in table.items() if fn is not None and fn is not _UNIT}

  common = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, multipliers=mults, exclude_fn=exclude_fn)
  if cfg.name == "lamb":
    core = gated_adam(schedule, weight_decay=cfg.weight_decay, bias_correction=False,
                      layer_adaptation=True, **common)
  elif cfg.name == "adamw_tf1":
    core = gated_adam(schedule, weight_decay=cfg.weight_decay, bias_correction=False,
                      layer_adaptation=False, **common)
  elif cfg.name == "adamw":
    core = gated_adam(schedule, weight_decay=cfg.weight_decay, bias_correction=True,
                      layer_adaptation=False, **common)
  else:  # adam
    core = gated_adam(schedule, weight_decay=0.0, bias_correction=True,
                      layer_adaptation=False, **common)

  transforms = {_TRAIN: core}
  if any(fn is None for fn in table.values()):
    transforms[_FROZEN] = optax.set_to_zero()
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.partition(transforms, labels))
  return optax.chain(*parts)


def optimizer_step(opt_state) -> jax.Array:
  """The optimizer's own step count (what schedules and multipliers see) from its state."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GatedAdamState))
      if isinstance(s, GatedAdamState)]
  if len(found) != 1:
    raise ValueError(f"expected one GatedAdamState in the optimizer state, found {len(found)}")
  return found[0].count


# --------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------


def accumulate_gradients(grad_fn: Callable, params, batch, num_microbatches: int, rng=None):
  """Averages ``grad_fn`` over micro-batches with a ``lax.scan`` (call inside the jitted step).

  ``grad_fn(params, microbatch)`` — or ``grad_fn(params, microbatch, rng_i)`` when ``rng`` is
  given, with ``rng_i = fold_in(rng, i)`` — returns any pytree, typically the output of
  ``jax.value_and_grad(loss, has_aux=...)``. ``batch`` leaves are split along axis 0 into
  ``num_microbatches`` equal parts. Floating leaves of the result are averaged in fp32 (cast
  back to their dtype); integer leaves (counts) are summed. The average equals the big-batch
  gradient when the loss is an unweighted mean over examples; losses normalised by a
  data-dependent weight (e.g. MLM ``sum(w·l)/sum(w)``) differ slightly per micro-batch.
  """
  num_microbatches = _check_int("num_microbatches (train.grad_accum_steps)", num_microbatches, 1)
  call = (lambda mb, i: grad_fn(params, mb)) if rng is None else (
      lambda mb, i: grad_fn(params, mb, jax.random.fold_in(rng, i)))
  if num_microbatches == 1:
    return call(batch, 0)

  def split(kp, x):
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] % num_microbatches:
      raise ValueError(f"batch field {param_path(kp)!r} with shape {x.shape} cannot be split "
                       f"into {num_microbatches} equal micro-batches along axis 0")
    return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])

  micro = jax.tree_util.tree_map_with_path(split, batch)
  first = jax.tree.map(lambda x: x[0], micro)
  out_shape = jax.eval_shape(lambda mb: call(mb, 0), first)
  acc_dtype = lambda s: jnp.float32 if jnp.issubdtype(s.dtype, jnp.inexact) else s.dtype
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, acc_dtype(s)), out_shape)

  def body(acc, xs):
    i, mb = xs
    out = call(mb, i)
    return jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out), None

  total, _ = jax.lax.scan(body, init, (jnp.arange(num_microbatches), micro))

  def finish(t, s):
    if jnp.issubdtype(s.dtype, jnp.inexact):
      return (t / num_microbatches).astype(s.dtype)
    return t

  return jax.tree.map(finish, total, out_shape)
