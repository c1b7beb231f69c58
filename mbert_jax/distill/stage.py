"""One stage of a training strategy, as a value: how long it runs, how deep the two models run,
which loss terms count and how much, which parameter groups train at which relative learning
rate, and its learning-rate curve. A schedule (`schedule.build_schedule`) is a list of them.

Loss-weight terms:
  'fmt', 'at', 'mean', 'var': layer-wise transfer terms (`losses.transfer_losses`), each weight
      applied to every layer of `transfer_layers` and already including the official /L;
  'mlm': ground-truth masked-LM cross-entropy; 'kd': cross-entropy against the teacher's MLM
      distribution; TF1's mixed target alpha*onehot + (1-alpha)*teacher is mlm=alpha, kd=1-alpha
      (`losses.distillation_mlm_loss` returns both components);
  'nsp': next-sentence cross-entropy (ground truth only).
The stage loss is sum(weight * term) / loss_divisor.

A `Stage` is frozen and hashable, so it can be a static argument of a jitted step: depth and
frozen groups are static, and each stage compiles once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import jax

from mbert_jax.distill.transfer_options import layer_map
from mbert_jax.training.optim import make_lr_schedule

LAYER_TERMS = ("fmt", "at", "mean", "var")
OUTPUT_TERMS = ("mlm", "kd", "nsp")
LOSS_TERMS = LAYER_TERMS + OUTPUT_TERMS
TEACHER_TERMS = LAYER_TERMS + ("kd",)
LR_KINDS = ("constant", "linear", "polynomial")


class FrozenMapping(Mapping[str, float]):
  """Read-only, hashable str -> float mapping, so a `Stage` can be a static jit argument."""

  def __init__(self, items: Mapping[str, float] | Sequence[tuple[str, float]] = ()):
    self._items = dict(items)

  def __getitem__(self, key: str) -> float:
    return self._items[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash(tuple(sorted(self._items.items())))

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

  def __repr__(self) -> str:
    return f"FrozenMapping({self._items!r})"


# Checks of the numbers a stage is made of; `schedule` uses them for its config values too.

def is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_int(value: Any, what: str, minimum: int) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
  return value


def require_nonnegative(value: Any, what: str) -> float:
  if not is_number(value) or not math.isfinite(value) or value < 0:
    raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
  return float(value)


@dataclasses.dataclass(frozen=True)
class LRSchedule:
  """Learning rate as a function of the step inside a stage.

  'constant': base_lr (after the optional linear warm-up).
  'linear' / 'polynomial' (TF1 `create_optimizer`): linear warm-up 0 -> base_lr over
    warmup_steps; otherwise base_lr * ((1 - end_factor) * (1 - t/N)^power + end_factor), where
    the decay is measured from step 0 (not from the end of warm-up) and N = stage steps. 'linear'
    is the power-1 case and ignores `power`.
  """
  kind: str = "constant"
  base_lr: float = 1.5e-3
  warmup_steps: int = 0
  end_factor: float = 1.0
  power: float = 1.0

  def __post_init__(self):
    if self.kind not in LR_KINDS:
      raise ValueError(f"lr kind must be one of {LR_KINDS}, got {self.kind!r}")
    if not is_number(self.base_lr) or not self.base_lr > 0:
      raise ValueError(f"base_lr must be > 0, got {self.base_lr!r}")
    require_int(self.warmup_steps, "warmup_steps", 0)
    require_nonnegative(self.end_factor, "end_factor")
    if not is_number(self.power) or not self.power > 0:
      raise ValueError(f"power must be > 0, got {self.power!r}")

  def __call__(self, step: Any, total_steps: int) -> jax.Array:
    # One implementation of every schedule: the optimizer module's (optax-based).
    power = self.power if self.kind == "polynomial" else 1.0
    return make_lr_schedule(self.kind, self.base_lr, total_steps, self.warmup_steps,
                            self.end_factor, power)(step)


EncoderSpec = float | tuple[float, ...] | None


@dataclasses.dataclass(frozen=True)
class GroupMultipliers:
  """Static per-group LR multipliers. None = frozen for the whole stage.

  `encoder` is one number for every layer or a tuple with one entry per encoder layer; a 0
  entry marks an inactive layer (its multiplier and moment gate stay 0). Any multiplier that is
  statically 0 everywhere is stored as None so the optimizer can drop its state.
  """
  embeddings: float | None = 1.0
  encoder: EncoderSpec = 1.0
  heads: float | None = 1.0

  def __post_init__(self):
    for group in ("embeddings", "heads"):
      value = getattr(self, group)
      if value is not None:
        value = require_nonnegative(value, f"{group} lr multiplier")
        object.__setattr__(self, group, None if value == 0 else value)
    encoder = self.encoder
    if isinstance(encoder, (list, tuple)):
      if not encoder:
        raise ValueError("encoder lr multipliers: empty per-layer list")
      encoder = tuple(require_nonnegative(v, f"encoder lr multiplier of layer {i + 1}")
                      for i, v in enumerate(encoder))
      encoder = None if not any(encoder) else encoder
    elif encoder is not None:
      encoder = require_nonnegative(encoder, "encoder lr multiplier")
      encoder = None if encoder == 0 else encoder
    object.__setattr__(self, "encoder", encoder)

  def encoder_vector(self, num_layers: int, run_layers: int | None) -> tuple[float, ...] | None:
    """Per-layer encoder multipliers, with layers beyond `run_layers` (not run) gated to 0.

    Layers that do not run get no gradient, but a non-zero gate would still apply LAMB's weight
    decay to them, so they must be 0, not merely untouched.
    """
    if self.encoder is None:
      return None
    if isinstance(self.encoder, tuple):
      if len(self.encoder) != num_layers:
        raise ValueError(f"encoder lr multipliers list {len(self.encoder)} layers, but the "
                         f"encoder parameters have {num_layers}")
      vector = self.encoder
    else:
      vector = (self.encoder,) * num_layers
    if run_layers is not None:
      vector = tuple(v if i < run_layers else 0.0 for i, v in enumerate(vector))
    return vector if any(vector) else None


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a schedule. Hashable: usable as a static argument of a jitted step."""
  name: str
  steps: int
  loss_weights: Mapping[str, float]
  num_layers: int | None = None            # encoder depth both models run; None = all
  transfer_layers: tuple[int, ...] = ()    # 1-based student layers the layer terms apply to
  loss_divisor: float = 1.0                # TF2 divides stage l's loss by l
  multipliers: GroupMultipliers = GroupMultipliers()
  reset_optimizer: bool = True             # zero the optimizer moments when the stage starts
  lr: LRSchedule = LRSchedule()
  phase_ramp: bool = False                 # multiply every multiplier by bg(step_in_stage)
  temperature: float = 1.0                 # divides teacher MLM logits for the 'kd' term

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"stage name must be a non-empty string, got {self.name!r}")
    require_int(self.steps, f"stage {self.name!r}: steps", 1)
    if self.num_layers is not None:
      require_int(self.num_layers, f"stage {self.name!r}: num_layers", 1)
    object.__setattr__(self, "loss_weights", self._validated_weights(self.loss_weights))
    object.__setattr__(self, "transfer_layers", self._validated_layers(self.transfer_layers))
    self._check_terms_fit_depth()
    if not is_number(self.loss_divisor) or not self.loss_divisor > 0:
      raise ValueError(f"stage {self.name!r}: loss_divisor must be > 0, got "
                       f"{self.loss_divisor!r}")
    if not isinstance(self.multipliers, GroupMultipliers):
      raise TypeError(f"stage {self.name!r}: multipliers must be GroupMultipliers")
    if not isinstance(self.lr, LRSchedule):
      raise TypeError(f"stage {self.name!r}: lr must be an LRSchedule")
    if self.lr.warmup_steps > self.steps:
      raise ValueError(f"stage {self.name!r}: warmup_steps {self.lr.warmup_steps} exceeds the "
                       f"stage's {self.steps} steps")
    if not is_number(self.temperature) or not self.temperature > 0:
      raise ValueError(f"stage {self.name!r}: temperature must be > 0, got "
                       f"{self.temperature!r}")

  def _validated_weights(self, weights: Mapping[str, float]) -> FrozenMapping:
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
      raise ValueError(f"stage {self.name!r}: unknown loss term(s) {unknown}; known terms are "
                       f"{LOSS_TERMS}")
    checked = {term: require_nonnegative(w, f"stage {self.name!r}: weight of {term!r}")
               for term, w in weights.items()}
    positive = {term: w for term, w in checked.items() if w > 0}
    if not positive:
      raise ValueError(f"stage {self.name!r}: every loss weight is 0; nothing to train")
    return FrozenMapping(positive)

  def _validated_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
    layers = tuple(layers)
    for layer in layers:
      require_int(layer, f"stage {self.name!r}: transfer layer", 1)
    if len(set(layers)) != len(layers):
      raise ValueError(f"stage {self.name!r}: duplicate transfer layers {layers}")
    uses_layer_terms = any(term in self.loss_weights for term in LAYER_TERMS)
    if uses_layer_terms and not layers:
      raise ValueError(f"stage {self.name!r}: layer-wise terms need transfer_layers")
    if layers and not uses_layer_terms:
      raise ValueError(f"stage {self.name!r}: transfer_layers {layers} given but no layer-wise "
                       f"term ({LAYER_TERMS}) has a weight")
    return layers

  def _check_terms_fit_depth(self) -> None:
    if self.num_layers is None:
      return
    deepest = max(self.transfer_layers, default=0)
    if deepest > self.num_layers:
      raise ValueError(f"stage {self.name!r}: transfer layer {deepest} is deeper than "
                       f"num_layers={self.num_layers}")
    heads_terms = sorted(term for term in OUTPUT_TERMS if term in self.loss_weights)
    if heads_terms:
      raise ValueError(f"stage {self.name!r}: {heads_terms} read the model's output heads, "
                       f"which need the full encoder (num_layers=None)")

  @property
  def needs_teacher(self) -> bool:
    return any(term in self.loss_weights for term in TEACHER_TERMS)

  @property
  def alpha(self) -> float:
    """TF1's distill_ground_truth_ratio implied by the 'mlm' and 'kd' weights (1 = no teacher)."""
    ground_truth = self.loss_weights.get("mlm", 0.0)
    distill = self.loss_weights.get("kd", 0.0)
    return 1.0 if distill == 0 else ground_truth / (ground_truth + distill)

  def weight(self, term: str) -> float:
    if term not in LOSS_TERMS:
      raise KeyError(f"unknown loss term {term!r}; known terms are {LOSS_TERMS}")
    return self.loss_weights.get(term, 0.0)

  def learning_rate(self, step_in_stage: Any) -> jax.Array:
    return self.lr(step_in_stage, self.steps)

  def teacher_num_layers(self, num_student_layers: int, num_teacher_layers: int) -> int | None:
    """Depth the teacher must run so every transfer layer's teacher partner exists."""
    if self.num_layers is None:
      return None
    return layer_map(num_student_layers, num_teacher_layers)[self.num_layers - 1]
