"""The knowledge-transfer options (config section `kt`) and what they resolve to for a given
student and teacher: which teacher layer each student layer learns from, whether feature maps go
through a projection, and whether attention is compared head by head or as MiniLMv2 relations.

`teacher.check_transfer` resolves all of them before anything compiles, so a combination that
cannot run is refused with the fix named; `losses.transfer_losses` reads the same options.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import ml_collections

from mbert_jax.distill.loss_utils import require_choice

# How feature maps are compared: the (possibly projected) features themselves, or the
# parameter-free token-by-token similarity matrices (any two widths).
FEATURE_TRANSFERS = ("features", "similarity")
# Student -> teacher width projection for 'features': auto = `shared` exactly when widths differ.
FEATURE_PROJECTIONS = ("auto", "shared", "per_layer", "none")
# auto = per_head when the head counts match, else MiniLMv2 Q-Q/K-K/V-V relations.
ATTENTION_TRANSFERS = ("auto", "per_head", "relation")

# Keys `transfer_losses` reads from its config, with the official TF1 behaviour as default.
TRANSFER_DEFAULTS: dict[str, Any] = {
    "normalize_features": True,    # FMT on LN0-standardised features (official); False = raw MSE
    "feature_over": "all",         # FMT and mean/var averaged over 'all' positions or 'real' tokens
    "attention_over": "all",       # AT averaged over 'all' query rows or 'real' ones
    "attention_kind": "ce",        # 'ce' = official cross-entropy; 'kl' = true KL (0 when equal)
    "tf1_all_layer_stats": False,  # teacher mean/var from all teacher outputs (a TF1 quirk)
    "num_student_layers": None,    # full model depths for `layer_map`; None = infer from outputs
    "num_teacher_layers": None,
    "feature_transfer": "features",  # 'features' (FMT, projected if widths differ) | 'similarity'
    "feature_projection": "auto",    # auto | shared | per_layer | none (see FEATURE_PROJECTIONS)
    "attention_transfer": "auto",    # auto | per_head | relation (see ATTENTION_TRANSFERS)
    "relation_heads": 0,             # relation heads; 0 = auto (`auto_relation_heads`)
    "layer_map": (),                 # 1-based teacher layer per student layer; () = uniform
    # Pre-norm (ModernBERT/EuroBERT) teachers: what their un-normalised residual stream goes
    # through before the feature terms, and whether relations see rotated queries and keys
    # (teacher_outputs.py says why each default).
    "teacher_feature_norm": "auto",  # auto | final_norm | layer_norm | none
    "relation_rotary": "rotated",    # rotated | none
}


def _config_value(cfg: Mapping[str, Any] | Any, key: str) -> Any:
  """Reads `key` from a dict or ConfigDict, falling back to the official default."""
  if cfg is None:
    return TRANSFER_DEFAULTS[key]
  getter = getattr(cfg, "get", None)
  if getter is None:
    raise TypeError(f"transfer config must be a dict or ConfigDict, got {type(cfg).__name__}")
  value = getter(key, None)
  return TRANSFER_DEFAULTS[key] if value is None else value


def transfer_option(cfg: Mapping[str, Any] | Any, key: str) -> Any:
  """The value `transfer_losses` uses for a kt config key (its TRANSFER_DEFAULTS when unset)."""
  if key not in TRANSFER_DEFAULTS:
    raise KeyError(f"unknown knowledge-transfer option {key!r}; known: {sorted(TRANSFER_DEFAULTS)}")
  return _config_value(cfg, key)


def default_transfer_config():
  """The `cfg` for `transfer_losses` as a ConfigDict: the official TF1 behaviour, except that
  mean/variance transfer compares each student layer with its own teacher layer."""
  cfg = ml_collections.ConfigDict()
  for key, value in TRANSFER_DEFAULTS.items():
    if value is None:
      cfg[key] = ml_collections.config_dict.placeholder(int)
    else:
      cfg[key] = value
  return cfg


# ----------------------------------------------------------------------------------------------
# Features and attention across widths and head counts
# ----------------------------------------------------------------------------------------------

def resolve_feature_projection(feature_transfer: str, feature_projection: str,
                               student_width: int, teacher_width: int) -> str:
  """'none', 'shared' or 'per_layer'; ValueError when features of different widths would meet
  without a projection."""
  require_choice(feature_transfer, FEATURE_TRANSFERS, "kt.feature_transfer")
  require_choice(feature_projection, FEATURE_PROJECTIONS, "kt.feature_projection")
  if feature_transfer == "similarity":
    if feature_projection in ("shared", "per_layer"):
      raise ValueError(f"kt.feature_projection={feature_projection!r} has nothing to project: "
                       "kt.feature_transfer='similarity' is parameter-free; set "
                       "kt.feature_projection='auto' or 'none'")
    return "none"
  if feature_projection == "auto":
    return "shared" if student_width != teacher_width else "none"
  if feature_projection == "none" and student_width != teacher_width:
    raise ValueError(f"kt.feature_projection='none' but the student's feature maps are "
                     f"{student_width} wide and the teacher's {teacher_width}: set "
                     "kt.feature_projection='auto' (or 'shared'/'per_layer'), or "
                     "kt.feature_transfer='similarity'")
  return feature_projection


def resolve_attention_transfer(mode: str, student_heads: int, teacher_heads: int) -> str:
  """'per_head' or 'relation' for a configured mode; ValueError for per_head across head counts."""
  require_choice(mode, ATTENTION_TRANSFERS, "kt.attention_transfer")
  if mode == "auto":
    return "per_head" if student_heads == teacher_heads else "relation"
  if mode == "per_head" and student_heads != teacher_heads:
    raise ValueError(f"kt.attention_transfer='per_head' compares attention maps head by head, "
                     f"but the student has {student_heads} heads and the teacher "
                     f"{teacher_heads}: set kt.attention_transfer='relation' (or 'auto')")
  return mode


def auto_relation_heads(student_width: int, teacher_width: int, student_heads: int,
                        teacher_heads: int) -> int:
  """Relation heads when `relation_heads` = 0: the most, up to the larger attention head count,
  that split both Q/K/V widths evenly (BERT-large 1024/16 -> MobileBERT 128: 16; BERT-base
  768/12 -> 128: 8), so each relation head is about as wide as the models' own heads.
  """
  common = math.gcd(int(student_width), int(teacher_width))
  cap = max(int(student_heads), int(teacher_heads), 1)
  return max(n for n in range(1, min(cap, common) + 1) if common % n == 0)


def resolve_relation_heads(relation_heads: int, student_width: int, teacher_width: int,
                           student_heads: int, teacher_heads: int) -> int:
  """The relation head count to use; ValueError when it does not divide both widths."""
  if not isinstance(relation_heads, int) or isinstance(relation_heads, bool) or relation_heads < 0:
    raise ValueError(f"kt.relation_heads must be an int >= 0 (0 = auto), got {relation_heads!r}")
  if relation_heads == 0:
    return auto_relation_heads(student_width, teacher_width, student_heads, teacher_heads)
  for who, width in (("student", student_width), ("teacher", teacher_width)):
    if width % relation_heads:
      divisors = [n for n in range(1, math.gcd(student_width, teacher_width) + 1)
                  if student_width % n == 0 and teacher_width % n == 0]
      raise ValueError(f"kt.relation_heads={relation_heads} does not divide the {who}'s Q/K/V "
                       f"width {width} (student {student_width}, teacher {teacher_width}); "
                       f"choose one of {divisors[-8:]} or 0 (auto)")
  return relation_heads


# ----------------------------------------------------------------------------------------------
# Which teacher layer each student layer learns from
# ----------------------------------------------------------------------------------------------

def layer_map(num_student_layers: int, num_teacher_layers: int) -> tuple[int, ...]:
  """The uniform map: teacher hidden-state index (1-based; 0 is the embedding output) for
  student layers 1..Ls.

  Identity for equal depths; for a shallower student, layer i -> round(i * Lt / Ls), so the
  last student layer always learns from the last teacher layer. Ties round up, which keeps the
  map strictly increasing.
  """
  for name, value in (("num_student_layers", num_student_layers),
                      ("num_teacher_layers", num_teacher_layers)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if num_student_layers > num_teacher_layers:
    raise ValueError(f"student has more layers ({num_student_layers}) than the teacher "
                     f"({num_teacher_layers}): no layer-to-layer transfer map exists")
  return tuple((2 * i * num_teacher_layers + num_student_layers) // (2 * num_student_layers)
               for i in range(1, num_student_layers + 1))


def _positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def configured_layer_map(custom: Sequence[int] | None, num_student_layers: int,
                         num_teacher_layers: int | None) -> tuple[int, ...]:
  """Teacher layer (1-based) for each student layer: `custom` (kt.layer_map) checked against
  the depths when non-empty, else the uniform `layer_map`. A custom map may repeat teacher
  layers, so a student deeper than its teacher (MobileBERT's 24 layers from BERT-base's 12) can
  still learn layer-wise. `num_teacher_layers` None skips the range check (the caller checks
  what ran).
  """
  custom = tuple(custom or ())
  if not custom:
    if num_teacher_layers is not None and num_student_layers > num_teacher_layers:
      repeat = [-(-i * num_teacher_layers // num_student_layers)
                for i in range(1, num_student_layers + 1)]
      raise ValueError(f"the student has more layers ({num_student_layers}) than the teacher "
                       f"({num_teacher_layers}), so the uniform layer map does not exist: set "
                       f"kt.layer_map to one teacher layer per student layer, e.g. {repeat}")
    return layer_map(num_student_layers, num_teacher_layers)
  if len(custom) != num_student_layers:
    raise ValueError(f"kt.layer_map has {len(custom)} entries but the student has "
                     f"{num_student_layers} layers: give one 1-based teacher layer per student "
                     "layer, or leave it empty for the uniform map")
  for i, value in enumerate(custom, start=1):
    if not _positive_int(value) or (num_teacher_layers is not None
                                    and value > num_teacher_layers):
      top = "" if num_teacher_layers is None else f"..{num_teacher_layers}"
      raise ValueError(f"kt.layer_map[{i - 1}] = {value!r} (student layer {i}) is not a teacher "
                       f"layer 1{top}; 0 (the embeddings) cannot be a target")
  return custom


def teacher_depth(mapping: Sequence[int], num_student_layers_run: int | None) -> int | None:
  """Teacher layers to run when the student runs its first `num_student_layers_run` layers
  (None = the whole student, so the whole teacher too)."""
  if num_student_layers_run is None:
    return None
  return max(mapping[:num_student_layers_run])
