"""Training strategies as data: a schedule is a list of `stage.Stage`s, built from the
`schedule` config section by a preset (PKT, JKT, AKT, ..., or custom stage dicts; the MobileBERT
paper's "Training Strategies" section describes them). The trainer loops over stages in Python
and asks `lr_multiplier_tree` / `Stage.learning_rate` for the step-dependent parts.

Parameter groups (docs/CONTRACTS.md, first match wins): embeddings `^embeddings/`, encoder
`^encoder/` (stacked, leading layer axis, per-layer multipliers), heads `^(cls|pooler)/`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from mbert_jax.distill.stage import (GroupMultipliers, LRSchedule, Stage, is_number,
                                     require_int)

GROUPS = ("embeddings", "encoder", "heads")
GROUP_PATTERNS = (
    ("embeddings", re.compile(r"^embeddings/")),
    # A pre-norm encoder's (ModernBERT's) final norm has no layer axis and normalises only the
    # last layer's output, for the heads: it learns with them.
    ("heads", re.compile(r"^encoder/final_norm/")),
    ("encoder", re.compile(r"^encoder/")),
    ("heads", re.compile(r"^(cls|pooler)/")),
)
PRESETS = ("pkt", "pkt_freeze", "pkt_tf2", "jkt", "akt", "pd_only", "scratch", "custom")


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

def default_schedule_config() -> ml_collections.ConfigDict:
  """Schedule settings with the README's values, those of the official 24-layer run."""
  c = ml_collections.ConfigDict()
  c.name = "pkt"
  c.steps_per_layer = 10_000             # PKT phase length
  # JKT's joint transfer stage and AKT's extra budget; None = num_layers * steps_per_layer.
  c.transfer_steps = ml_collections.config_dict.placeholder(int)
  c.distill_steps = 500_000              # final PD stage
  c.learning_rate = 1.5e-3               # PD peak LR
  c.transfer_learning_rate = ml_collections.config_dict.placeholder(float)  # None = learning_rate
  c.warmup_steps = 10_000                # PD warm-up
  c.end_factor = 1e-4                    # PD LR at the end, as a fraction of the peak
  c.power = 1.0                          # PD decay power (1 = TF1 linear)
  c.hidden_distill_factor = 100.0
  c.beta_distill_factor = 5000.0
  c.gamma_distill_factor = 5.0
  c.attention_distill_factor = 1.0
  c.alpha = 0.5                          # distill_ground_truth_ratio
  c.temperature = 1.0
  c.nsp_factor = 1.0                     # 0 drops NSP from PD and scratch
  c.current_layer_multiplier = 3.0       # PKT: layer being transferred
  c.lower_layer_multiplier = 0.3         # PKT: finished layers below it (0.1 of the current)
  c.stages = []                          # custom: list of stage dicts (see `stage_from_dict`)
  # A teacher-cache directory (python -m mbert_jax.teacher_cache): the pre-training
  # distillation stage reads its teacher targets there instead of running the teacher.
  c.teacher_cache = ""
  return c


def _plain(cfg: Any) -> dict[str, Any]:
  if isinstance(cfg, ml_collections.ConfigDict):
    return cfg.to_dict()
  if isinstance(cfg, Mapping):
    return dict(cfg)
  raise TypeError(f"expected a dict or ConfigDict, got {type(cfg).__name__}")


def _layer_weights(c: Mapping[str, Any], num_layers: int, divide_by_depth: bool) -> dict:
  """Official factors, divided by L as TF1 does (TF2 uses the raw factors and its own divisor)."""
  scale = 1.0 / num_layers if divide_by_depth else 1.0
  return {"fmt": c["hidden_distill_factor"] * scale, "at": c["attention_distill_factor"] * scale,
          "mean": c["beta_distill_factor"] * scale, "var": c["gamma_distill_factor"] * scale}


def _pd_weights(c: Mapping[str, Any]) -> dict:
  alpha = c["alpha"]
  if not is_number(alpha) or not 0 <= alpha <= 1:
    raise ValueError(f"schedule alpha must be in [0, 1], got {alpha!r}")
  return {"mlm": alpha, "kd": 1.0 - alpha, "nsp": c["nsp_factor"]}


def _pd_lr(c: Mapping[str, Any]) -> LRSchedule:
  return LRSchedule("linear" if c["power"] == 1 else "polynomial", base_lr=c["learning_rate"],
                    warmup_steps=c["warmup_steps"], end_factor=c["end_factor"], power=c["power"])


def _transfer_lr(c: Mapping[str, Any]) -> LRSchedule:
  base = c["transfer_learning_rate"]
  return LRSchedule("constant", base_lr=c["learning_rate"] if base is None else base)


def _pd_stage(c: Mapping[str, Any], name: str = "pd", steps: int | None = None,
              extra_weights: Mapping[str, float] | None = None,
              transfer_layers: tuple[int, ...] = ()) -> Stage:
  return Stage(name=name, steps=c["distill_steps"] if steps is None else steps,
               loss_weights={**_pd_weights(c), **(extra_weights or {})},
               transfer_layers=transfer_layers, multipliers=GroupMultipliers(1.0, 1.0, 1.0),
               reset_optimizer=True, lr=_pd_lr(c), temperature=c["temperature"])


def _pkt_encoder_multipliers(c: Mapping[str, Any], layer: int, num_layers: int,
                             lower: float) -> tuple[float, ...]:
  return tuple(lower if i < layer else c["current_layer_multiplier"] if i == layer else 0.0
               for i in range(1, num_layers + 1))


def _pkt_phases(c: Mapping[str, Any], num_layers: int, freeze_lower: bool) -> list[Stage]:
  """TF1 PKT (progressive knowledge transfer): one stage per layer, truncated forward, only
  that layer's terms."""
  lower = 0.0 if freeze_lower else c["lower_layer_multiplier"]
  return [Stage(name=f"pkt_layer_{layer}", steps=c["steps_per_layer"], num_layers=layer,
                loss_weights=_layer_weights(c, num_layers, divide_by_depth=True),
                transfer_layers=(layer,),
                multipliers=GroupMultipliers(
                    embeddings=None, heads=None,
                    encoder=_pkt_encoder_multipliers(c, layer, num_layers, lower)),
                reset_optimizer=True, lr=_transfer_lr(c), phase_ramp=True)
          for layer in range(1, num_layers + 1)]


def _pkt_tf2_phases(c: Mapping[str, Any], num_layers: int) -> list[Stage]:
  """TF2 Model Garden PKT: everything in the truncated model trains at x1, including the
  embeddings; heads are outside the truncated model, so freezing them is equivalent. TF2 divides
  stage k's loss by (stage_id + 1) with a 0-based stage_id, i.e. by the 1-based layer number."""
  return [Stage(name=f"pkt_tf2_layer_{layer}", steps=c["steps_per_layer"], num_layers=layer,
                loss_weights=_layer_weights(c, num_layers, divide_by_depth=False),
                transfer_layers=(layer,), loss_divisor=float(layer),
                # encoder x1: layers above `layer` do not run and are gated to 0 by
                # lr_multiplier_tree through num_layers.
                multipliers=GroupMultipliers(embeddings=1.0, encoder=1.0, heads=None),
                reset_optimizer=True, lr=_transfer_lr(c))
          for layer in range(1, num_layers + 1)]


def _transfer_steps(c: Mapping[str, Any], num_layers: int) -> int:
  steps = c["transfer_steps"]
  return num_layers * c["steps_per_layer"] if steps is None else steps


def _jkt_stages(c: Mapping[str, Any], num_layers: int) -> list[Stage]:
  all_layers = tuple(range(1, num_layers + 1))
  joint = Stage(name="jkt_transfer", steps=_transfer_steps(c, num_layers),
                loss_weights=_layer_weights(c, num_layers, divide_by_depth=True),
                transfer_layers=all_layers,
                multipliers=GroupMultipliers(embeddings=None, encoder=1.0, heads=None),
                reset_optimizer=True, lr=_transfer_lr(c))
  return [joint, _pd_stage(c)]


def _akt_stages(c: Mapping[str, Any], num_layers: int) -> list[Stage]:
  """One stage of `distill_steps` (the config contract: the whole run for akt). For the same
  budget as PKT/JKT (the MobileBERT paper compares the strategies at equal steps) set
  distill_steps = L * steps_per_layer + the PD steps."""
  steps = c["distill_steps"]
  return [_pd_stage(c, name="akt", steps=steps,
                    extra_weights=_layer_weights(c, num_layers, divide_by_depth=True),
                    transfer_layers=tuple(range(1, num_layers + 1)))]


def _scratch_stages(c: Mapping[str, Any]) -> list[Stage]:
  weights = {"mlm": 1.0, "nsp": c["nsp_factor"]}
  return [Stage(name="scratch", steps=c["distill_steps"], loss_weights=weights,
                multipliers=GroupMultipliers(1.0, 1.0, 1.0), reset_optimizer=True,
                lr=_pd_lr(c))]


_STAGE_KEYS = ("name", "steps", "num_layers", "loss_weights", "transfer_layers", "loss_divisor",
               "lr_multipliers", "reset_optimizer", "lr", "phase_ramp", "temperature")
_LR_KEYS = ("kind", "base_lr", "warmup_steps", "end_factor", "power")


def _custom_multipliers(spec: Mapping[str, Any] | None, where: str) -> GroupMultipliers:
  spec = {} if spec is None else _plain(spec)
  unknown = sorted(set(spec) - set(GROUPS))
  if unknown:
    raise ValueError(f"{where}: unknown parameter group(s) {unknown}; groups are {GROUPS}")
  encoder = spec.get("encoder", 1.0)
  if isinstance(encoder, list):
    encoder = tuple(encoder)
  return GroupMultipliers(embeddings=spec.get("embeddings", 1.0), encoder=encoder,
                          heads=spec.get("heads", 1.0))


def _custom_lr(spec: Mapping[str, Any] | None, c: Mapping[str, Any], where: str) -> LRSchedule:
  spec = {} if spec is None else _plain(spec)
  unknown = sorted(set(spec) - set(_LR_KEYS))
  if unknown:
    raise ValueError(f"{where}: unknown lr key(s) {unknown}; known keys are {_LR_KEYS}")
  return LRSchedule(**{"base_lr": c["learning_rate"], **spec})


def stage_from_dict(spec: Mapping[str, Any], index: int, c: Mapping[str, Any],
                    num_layers: int) -> Stage:
  """A custom stage. Keys: steps (required), name, num_layers, loss_weights, transfer_layers
  (list or 'all'), loss_divisor, lr_multipliers {group: None | float | per-layer list},
  reset_optimizer, lr {kind, base_lr (default: config learning_rate), warmup_steps, end_factor,
  power}, phase_ramp, temperature."""
  spec = _plain(spec)
  where = f"custom stage {index} ({spec.get('name', 'unnamed')!r})"
  unknown = sorted(set(spec) - set(_STAGE_KEYS))
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {unknown}; known keys are {_STAGE_KEYS}")
  if "steps" not in spec:
    raise ValueError(f"{where}: 'steps' is required")
  transfer_layers = spec.get("transfer_layers", ())
  if transfer_layers == "all":
    transfer_layers = tuple(range(1, num_layers + 1))
  elif isinstance(transfer_layers, str):
    raise ValueError(f"{where}: transfer_layers must be a list of layers or 'all', got "
                     f"{transfer_layers!r}")
  too_deep = [layer for layer in transfer_layers if is_number(layer) and layer > num_layers]
  if too_deep:
    raise ValueError(f"{where}: transfer layers {too_deep} exceed the student's {num_layers} "
                     f"layers")
  if spec.get("num_layers") is not None and is_number(spec["num_layers"]) and \
      spec["num_layers"] > num_layers:
    raise ValueError(f"{where}: num_layers {spec['num_layers']} exceeds the student's "
                     f"{num_layers} layers")
  multipliers = _custom_multipliers(spec.get("lr_multipliers"), where)
  if isinstance(multipliers.encoder, tuple) and len(multipliers.encoder) != num_layers:
    raise ValueError(f"{where}: encoder multipliers list {len(multipliers.encoder)} layers, "
                     f"the student has {num_layers}")
  try:
    return Stage(name=spec.get("name", f"stage_{index}"), steps=spec["steps"],
                 loss_weights=_plain(spec.get("loss_weights") or {}),
                 num_layers=spec.get("num_layers"), transfer_layers=tuple(transfer_layers),
                 loss_divisor=spec.get("loss_divisor", 1.0), multipliers=multipliers,
                 reset_optimizer=bool(spec.get("reset_optimizer", True)),
                 lr=_custom_lr(spec.get("lr"), c, where),
                 phase_ramp=bool(spec.get("phase_ramp", False)),
                 temperature=spec.get("temperature", c["temperature"]))
  except (ValueError, TypeError) as error:
    raise ValueError(f"{where}: {error}") from error


def build_schedule(sched_cfg: Any, num_student_layers: int) -> list[Stage]:
  """Expands a schedule config (see `default_schedule_config`) into its stages."""
  require_int(num_student_layers, "num_student_layers", 1)
  defaults = _plain(default_schedule_config())
  user = _plain(sched_cfg)
  unknown = sorted(set(user) - set(defaults))
  if unknown:
    raise ValueError(f"unknown schedule config key(s) {unknown}; known keys are "
                     f"{sorted(defaults)}")
  c = {**defaults, **user}
  name = c["name"]
  if name not in PRESETS:
    raise ValueError(f"unknown schedule {name!r}; presets are {PRESETS}")
  if name == "pkt":
    return _pkt_phases(c, num_student_layers, freeze_lower=False) + [_pd_stage(c)]
  if name == "pkt_freeze":
    return _pkt_phases(c, num_student_layers, freeze_lower=True) + [_pd_stage(c)]
  if name == "pkt_tf2":
    return _pkt_tf2_phases(c, num_student_layers) + [_pd_stage(c)]
  if name == "jkt":
    return _jkt_stages(c, num_student_layers)
  if name == "akt":
    return _akt_stages(c, num_student_layers)
  if name == "pd_only":
    return [_pd_stage(c)]
  if name == "scratch":
    return _scratch_stages(c)
  if not c["stages"]:
    raise ValueError("schedule 'custom' needs a non-empty 'stages' list")
  return [stage_from_dict(spec, i, c, num_student_layers) for i, spec in enumerate(c["stages"])]


# ----------------------------------------------------------------------------------------------
# Stage lookup
# ----------------------------------------------------------------------------------------------

def total_steps(stages: Sequence[Stage]) -> int:
  return sum(stage.steps for stage in stages)


def stage_at(stages: Sequence[Stage], global_step: int) -> tuple[int, int]:
  """(stage index, step inside that stage) for a global step in [0, total_steps)."""
  if not stages:
    raise ValueError("empty schedule")
  if not isinstance(global_step, int) or isinstance(global_step, bool) or global_step < 0:
    raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
  start = 0
  for index, stage in enumerate(stages):
    if global_step < start + stage.steps:
      return index, global_step - start
    start += stage.steps
  raise ValueError(f"global_step {global_step} is past the end of the schedule "
                   f"({start} steps)")


# ----------------------------------------------------------------------------------------------
# Per-parameter learning-rate multipliers of a stage (parameter groups, PKT ramp)
# ----------------------------------------------------------------------------------------------

def phase_ramp(step: Any, period: int) -> jax.Array:
  """TF1 PKT's bg(t) = min(0.9 + 0.1*sqrt(1 - t/P), 10*t/P).

  0 at the phase start (which also zeroes the LAMB moment gate, i.e. resets Adam moments), a
  linear ramp over the first ~10% of the phase, then a slow decay from ~1.0 to 0.9 at t = P.
  """
  fraction = jnp.clip(jnp.asarray(step, jnp.float32) / period, 0.0, 1.0)
  return jnp.minimum(0.9 + 0.1 * jnp.sqrt(1.0 - fraction), 10.0 * fraction)


@dataclasses.dataclass(frozen=True)
class ScheduledMultiplier:
  """f(step_in_stage) -> multiplier: a constant, optionally times the PKT ramp bg(t).

  `base` is a float (scalar leaves) or a per-layer tuple (encoder leaves -> [L] vector).
  """
  base: float | tuple[float, ...]
  ramp_period: int | None = None

  @property
  def nonzero_layers(self) -> int | None:
    """For a per-layer base: the layers up to the last non-zero one (the ramp scales but never
    un-zeroes), so the optimizer can skip the rest (`optim.nonzero_layers`); None for a scalar."""
    if not isinstance(self.base, tuple):
      return None
    nonzero = [i for i, v in enumerate(self.base) if v]
    return nonzero[-1] + 1 if nonzero else 0

  def __call__(self, step_in_stage: Any) -> jax.Array:
    base = jnp.asarray(self.base, jnp.float32)
    if self.ramp_period is None:
      return base
    return base * phase_ramp(step_in_stage, self.ramp_period)


def _path_string(path: Sequence[Any]) -> str:
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


TRANSFER_PARAMS_PREFIX = "kt_projection/"  # teacher.PROJECTION_KEY: not a student parameter


def parameter_group(path: str) -> str:
  """Group of a '/'-joined parameter path (first match wins); error if none matches."""
  for group, pattern in GROUP_PATTERNS:
    if pattern.search(path):
      return group
  raise ValueError(f"parameter {path!r} matches no parameter group; groups are "
                   + ", ".join(f"{g} ({p.pattern})" for g, p in GROUP_PATTERNS))


def _leaf_multiplier(stage: Stage, path: str, leaf: Any) -> ScheduledMultiplier | None:
  ramp = stage.steps if stage.phase_ramp else None
  if path.startswith(TRANSFER_PARAMS_PREFIX):
    # The student -> teacher feature projection learns with the layer-wise transfer terms and
    # is frozen where none is computed.
    return ScheduledMultiplier(1.0, ramp) if stage.transfer_layers else None
  group = parameter_group(path)
  if group != "encoder":
    value = getattr(stage.multipliers, group)
    return None if value is None else ScheduledMultiplier(value, ramp)
  shape = tuple(getattr(leaf, "shape", ()))
  if not shape:
    raise ValueError(f"encoder parameter {path!r} has no leading layer axis (shape {shape})")
  vector = stage.multipliers.encoder_vector(shape[0], stage.num_layers)
  return None if vector is None else ScheduledMultiplier(vector, ramp)


def lr_multiplier_tree(stage: Stage, params: Any) -> Any:
  """Same structure as `params`; each leaf None (frozen all stage) or f(step_in_stage).

  Non-encoder leaves get a scalar function; encoder leaves (leading layer axis L) a function
  returning a [L] vector, 0 for layers inactive at that step. Works on concrete arrays or
  `jax.ShapeDtypeStruct`s. Every leaf must belong to a group.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _leaf_multiplier(stage, _path_string(path), leaf), params)
