"""The teacher side of knowledge transfer: load a teacher (sharded, forward only) from an
mbert-jax workdir or a Hugging Face directory, check that it can teach this student with this
schedule, create the small learned transfer parameters, and seed the student from it.

Teachers may be any BERT-family encoder: feature maps of another width go through a learned
projection (`init_transfer_params`) or are compared as token-similarity matrices; another head
count switches attention transfer to MiniLMv2 relations; another depth uses `kt.layer_map`.
`check_transfer` validates all of it before anything compiles.

Loads through `mbert_jax.interop.model_source` (runs, Hugging Face and sentence-transformers
directories alike); knows models and sharding, nothing of the training loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from mbert_jax.models import build, example_inputs
from mbert_jax.distill import teacher_outputs, transfer_options
from mbert_jax.interop import model_source
from mbert_jax.training import sharding
from mbert_jax.models import ModelConfig, ModernConfig

# Top-level key of the projection tree in the student's params (sibling of `embeddings`,
# `encoder`, `cls`); the student model ignores it.
PROJECTION_KEY = "kt_projection"
# teacher.reinitialise: fixed, so two control runs of one config agree.
REINIT_SEED = 0
_VOCAB_FILES = ("vocab.txt", "tokenizer.json")
# Loss terms of `Stage.loss_weights` that read the teacher's feature maps / attention / logits.
_FEATURE_TERMS = ("fmt", "mean", "var")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded teacher and what the loop must know about it before it compiles anything."""
  config: ModelConfig
  params: Any
  path: str
  layout: str                # 'mbert-jax' or the Hugging Face layout (LoadedModel.layout)
  has_mlm_head: bool         # False: a bare encoder, whose MLM logits are random (no 'kd')
  has_nsp_head: bool
  fresh: tuple[str, ...]     # parameter paths the checkpoint lacked (initialised fresh)
  vocab_file: str            # the teacher's vocabulary beside its weights; '' when none


def _vocab_file(directory: str | None) -> str:
  for name in _VOCAB_FILES:
    if directory and os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return ""


def _locate(path: str) -> model_source.ModelSource:
  return model_source.locate(path, setting="teacher.checkpoint")


def open_teacher(teacher_cfg, mesh, rules) -> Teacher:
  """Loads `teacher_cfg.checkpoint` (an mbert-jax run, a Hugging Face or sentence-transformers
  directory), sharded by `rules` on `mesh`."""
  path = teacher_cfg.checkpoint
  source = _locate(path)
  cfg = source.model_config.replace(compute_dtype=teacher_cfg.compute_dtype)
  _, abstract, shardings = sharding.abstract_params(build(cfg), example_inputs(cfg), mesh, rules)
  step = None if teacher_cfg.step < 0 else int(teacher_cfg.step)
  loaded = model_source.load(source, sharding.with_shardings(abstract, shardings), step=step)
  params = loaded.params
  if teacher_cfg.get("reinitialise", False):
    # Loaded first all the same: a broken checkpoint is refused the same way in the control.
    params, _ = sharding.init_params(build(cfg), example_inputs(cfg), REINIT_SEED, mesh, rules)
    logging.warning("teacher: %s re-initialised (teacher.reinitialise=True, seed %d): a "
                    "control run, nothing pretrained is transferred", path, REINIT_SEED)
  if source.kind == model_source.RUN:
    logging.info("teacher: %s step %d", path, loaded.step)
  else:
    logging.info("teacher: %s (%s, %d layers, width %d, %d heads)", loaded.weights,
                 loaded.layout, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads)
  return Teacher(cfg, params, path, loaded.layout, loaded.has_mlm_head,
                 loaded.has_nsp_head, loaded.fresh, _vocab_file(source.tokenizer_dir))


def vocab_source(path: str) -> str:
  """Where a teacher's tokenizer lives: an mbert-jax run's tokenizer/, else its directory."""
  if not path:
    raise ValueError("data.vocab = 'teacher' but teacher.checkpoint is empty: set the teacher, "
                     "or name a vocabulary in data.vocab")
  source = _locate(path)
  return source.tokenizer_dir or source.path


def read_teacher_config(teacher_cfg) -> ModelConfig:
  """The teacher's architecture without reading its weights."""
  cfg = _locate(teacher_cfg.checkpoint).model_config
  return cfg.replace(compute_dtype=teacher_cfg.compute_dtype)


def load_teacher(teacher_cfg, mesh, rules) -> tuple[ModelConfig, Any]:
  """Teacher config and params (sharded by the same rules), from a workdir or an HF directory."""
  teacher = open_teacher(teacher_cfg, mesh, rules)
  return teacher.config, teacher.params


# ----------------------------------------------------------------------------------------------
# What the transfer needs, validated before compilation
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TransferPlan:
  """The resolved knowledge-transfer choices for one student/teacher pair (for the log)."""
  layer_map: tuple[int, ...]       # teacher layer (1-based) per student layer; () = no layer terms
  feature_transfer: str            # 'features' | 'similarity'
  projection: str                  # 'none' | 'shared' | 'per_layer' ('none' also: no feature term)
  attention_transfer: str          # 'per_head' | 'relation' | 'none' (no stage weights 'at')
  relation_heads: int | None       # relation heads when attention_transfer = 'relation'
  # teacher_outputs.adapt's options, resolved: what the feature terms see of the teacher's
  # states ('final_norm' | 'layer_norm' | 'none'), and whether relations rotate Q and K.
  teacher_feature_norm: str = "none"
  relation_rotary: str = "none"

  @property
  def needs_qkv(self) -> bool:
    """Whether both models must run with return_qkv=True for the 'at' term."""
    return self.attention_transfer == "relation"

  def teacher_layers(self, student_layers_run: int | None) -> int | None:
    """Teacher depth to run for a stage whose student runs `student_layers_run` layers (use it
    instead of `Stage.teacher_num_layers`, which knows only the uniform map)."""
    if not self.layer_map:
      return None
    return transfer_options.teacher_depth(self.layer_map, student_layers_run)

  def describe(self) -> str:
    attention = self.attention_transfer + (
        f" ({self.relation_heads} relation heads)" if self.needs_qkv else "")
    if self.needs_qkv and self.relation_rotary == "rotated":
      attention += " on rotated queries/keys"
    features = f"feature transfer {self.feature_transfer} (projection {self.projection}"
    if self.teacher_feature_norm != "none":
      features += f", teacher states through {self.teacher_feature_norm}"
    return f"{features}), attention transfer {attention}, layer map {list(self.layer_map)}"


def check_vocabulary(student_vocab_size: int, teacher_cfg: ModelConfig | ModernConfig, *,
                     teacher_path: str = "", student_vocab: str = "",
                     teacher_vocab: str = "") -> None:
  """ValueError naming the fix when the student's table is not the teacher's vocabulary."""
  if student_vocab_size == teacher_cfg.vocab_size:
    return
  where = f" at {teacher_path}" if teacher_path else ""
  fix = (f"set data.vocab={teacher_vocab}" if teacher_vocab else
         "set data.vocab to the teacher's vocabulary file")
  raise ValueError(
      f"the student's vocabulary has {student_vocab_size} tokens "
      f"(data.vocab={student_vocab or '?'}) but the teacher{where} has "
      f"{teacher_cfg.vocab_size} (vocab file {teacher_vocab or 'unknown'}): knowledge "
      f"transfer needs one vocabulary; {fix} (and model.vocab_size=-1)")


def teacher_vocab_file(path: str) -> str:
  """The tokenizer.json or vocab.txt beside a teacher's weights ('' when it has none)."""
  return _vocab_file(_locate(path).tokenizer_dir)


def _uses(stages: Sequence[Any], terms: Sequence[str]) -> list[Any]:
  return [s for s in stages if any(s.weight(t) > 0 for t in terms)]


def check_transfer(kt_cfg: Any, stages: Sequence[Any], student_cfg: ModelConfig,
                   teacher_cfg: ModelConfig, teacher_has_mlm_head: bool, *,
                   teacher_path: str = "", student_vocab: str = "",
                   teacher_vocab: str = "") -> TransferPlan:
  """Refuses, before any compilation, a student/teacher/schedule combination that cannot run.

  `stages` is the built schedule (`schedule.build_schedule`). Raises ValueError, naming the fix,
  for: a student vocabulary other than the teacher's; a `kt.layer_map` of the wrong length or
  out of range; `per_head` attention transfer across different head counts; relation heads
  that do not divide both Q/K/V widths; features of different widths without a projection;
  and a 'kd' term (teacher MLM logits) from a teacher without an MLM head. Checks of terms no
  stage weights are skipped. `teacher_path`, `student_vocab` (data.vocab) and `teacher_vocab`
  only make messages name the files. Returns the resolved plan (log `plan.describe()`).
  """
  where = f" at {teacher_path}" if teacher_path else ""
  check_vocabulary(student_cfg.vocab_size, teacher_cfg, teacher_path=teacher_path,
                   student_vocab=student_vocab, teacher_vocab=teacher_vocab)
  kd_stages = _uses(stages, ("kd",))
  if kd_stages and not teacher_has_mlm_head:
    names = ", ".join(repr(s.name) for s in kd_stages)
    raise ValueError(
        f"stage(s) {names} weight the 'kd' term (the teacher's MLM distribution), but the "
        f"teacher{where} has no MLM head (a bare encoder): make the pre-training distillation "
        "stage ground-truth only with schedule.alpha=1.0 (its kd weight is 1 - alpha; for a "
        "custom schedule drop 'kd' from that stage's loss_weights), or use a teacher with an "
        "MLM head (BertForPreTraining / BertForMaskedLM)")

  option = lambda key: transfer_options.transfer_option(kt_cfg, key)
  layer_stages = _uses(stages, _FEATURE_TERMS + ("at",))
  mapping = transfer_options.configured_layer_map(
      option("layer_map"), student_cfg.num_hidden_layers,
      teacher_cfg.num_hidden_layers) if layer_stages else ()
  projection = "none"
  if _uses(stages, _FEATURE_TERMS):
    projection = transfer_options.resolve_feature_projection(
        option("feature_transfer"), option("feature_projection"), student_cfg.hidden_size,
        teacher_cfg.hidden_size)
  feature_norm = "none"
  if _uses(stages, _FEATURE_TERMS):
    feature_norm = teacher_outputs.resolve_feature_norm(option("teacher_feature_norm"),
                                                        teacher_cfg)
  attention, heads, rotary = "none", None, "none"
  if _uses(stages, ("at",)):
    attention = transfer_options.resolve_attention_transfer(
        option("attention_transfer"), student_cfg.num_attention_heads,
        teacher_cfg.num_attention_heads)
    if attention == "relation":
      heads = transfer_options.resolve_relation_heads(
          option("relation_heads"), teacher_outputs.qkv_width(student_cfg),
          teacher_outputs.qkv_width(teacher_cfg), student_cfg.num_attention_heads,
          teacher_cfg.num_attention_heads)
      if isinstance(teacher_cfg, ModernConfig):
        rotary = teacher_outputs.resolve_relation_rotary(option("relation_rotary"))
  return TransferPlan(mapping, option("feature_transfer"), projection, attention, heads,
                      feature_norm, rotary)


# ----------------------------------------------------------------------------------------------
# Learned transfer parameters
# ----------------------------------------------------------------------------------------------

def init_transfer_params(kt_cfg: Any, student_cfg: ModelConfig, teacher_cfg: ModelConfig,
                         key: jax.Array) -> dict[str, jax.Array] | None:
  """The student -> teacher feature projection (TinyBERT's fit_dense), or None when none is
  needed (equal widths under `auto`, `none`, or similarity transfer).

  Plain float32 arrays without logical axes, to live in the train state at
  params[PROJECTION_KEY]: `shared` = {'kernel': [Hs, Ht], 'bias': [Ht]}, `per_layer` =
  {'kernel': [Ls, Hs, Ht], 'bias': [Ls, Ht]}. Equal widths start from the identity, so forcing
  a projection starts from exactly the unprojected transfer; different widths start
  variance-preserving (LeCun normal), because the mean/variance terms see the projected scale.
  """
  mode = transfer_options.resolve_feature_projection(
      transfer_options.transfer_option(kt_cfg, "feature_transfer"),
      transfer_options.transfer_option(kt_cfg, "feature_projection"),
      student_cfg.hidden_size, teacher_cfg.hidden_size)
  if mode == "none":
    return None
  hs, ht = student_cfg.hidden_size, teacher_cfg.hidden_size

  def one(k: jax.Array) -> jax.Array:
    if hs == ht:
      return jnp.eye(hs, dtype=jnp.float32)
    return jax.nn.initializers.lecun_normal()(k, (hs, ht), jnp.float32)

  if mode == "shared":
    return {"kernel": one(key), "bias": jnp.zeros((ht,), jnp.float32)}
  layers = student_cfg.num_hidden_layers
  return {"kernel": jnp.stack([one(k) for k in jax.random.split(key, layers)]),
          "bias": jnp.zeros((layers, ht), jnp.float32)}


# ----------------------------------------------------------------------------------------------
# Seeding the student
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SeedReport:
  """What `init_student_from_teacher` copied and what it left fresh, and why.

  Iterating (and `len`) goes over the copied paths, as the plain list it replaces did.
  """
  copied: tuple[str, ...]
  skipped: tuple[tuple[str, str], ...]   # (student path, reason)

  def __iter__(self) -> Iterator[str]:
    return iter(self.copied)

  def __len__(self) -> int:
    return len(self.copied)

  def lines(self) -> list[str]:
    """One log line per path: 'copied <path>' or 'fresh <path>: <reason>'."""
    return ([f"copied {p}" for p in self.copied]
            + [f"fresh {p}: {why}" for p, why in self.skipped])


def _copy_candidates(s_cfg: ModelConfig, t_cfg: ModelConfig,
                     teacher_cfg: Any) -> list[tuple[str, str | None]]:
  """(path prefix, None if switched on else why it is off) for everything a teacher may seed."""
  norm = teacher_cfg.copy_embedding_norm
  if norm == "auto":
    teacher_norm = (t_cfg.norm_type if isinstance(t_cfg, ModernConfig)
                    else t_cfg.normalization_type)
    same = s_cfg.normalization_type == teacher_norm
    norm_off = None if same else (
        f"switched off (teacher.copy_embedding_norm=auto: student {s_cfg.normalization_type} "
        f"vs teacher {teacher_norm})")
  else:
    norm_off = None if norm else "switched off (teacher.copy_embedding_norm=False)"
  embeddings_off = None if teacher_cfg.copy_embeddings else (
      "switched off (teacher.copy_embeddings=False)")
  mlm_off = None if teacher_cfg.copy_mlm_head else "switched off (teacher.copy_mlm_head=False)"
  nsp_off = None if teacher_cfg.copy_nsp_head else "switched off (teacher.copy_nsp_head=False)"
  return [("embeddings/word_embeddings/", embeddings_off),
          ("embeddings/embedding_transformation/", embeddings_off),
          ("embeddings/position_embeddings/", embeddings_off),
          ("embeddings/token_type_embeddings/", embeddings_off),
          ("embeddings/norm/", norm_off),
          ("cls/predictions/", mlm_off),
          ("cls/seq_relationship/", nsp_off)]


def _copy_leaf(teacher_leaf: Any, student_leaf: Any) -> Any:
  # A real copy: device_put onto an equal sharding would alias the teacher's buffer, and the
  # student's state is donated to every step while the teacher's must survive it.
  # Each resharding copy is waited for: on XLA:CPU, several in flight at once can enter their
  # collectives in different orders on different devices and deadlock (seen on 8 fake devices).
  copy = jax.block_until_ready(jnp.copy(jnp.asarray(teacher_leaf)))
  if hasattr(student_leaf, "sharding"):
    return jax.block_until_ready(jax.device_put(copy, student_leaf.sharding))
  return copy


def plan_seed(student_shapes: Mapping[str, Sequence[int]],
              teacher_shapes: Mapping[str, Sequence[int]], s_cfg: ModelConfig,
              t_cfg: ModelConfig | ModernConfig, teacher_cfg: Any, *,
              teacher_fresh: Sequence[str] = ()) -> SeedReport:
  """What `init_student_from_teacher` will copy, from the flattened parameter shapes alone (so
  it can be checked before anything is loaded or compiled)."""
  fresh_in_teacher = set(teacher_fresh)
  candidates = _copy_candidates(s_cfg, t_cfg, teacher_cfg)
  copied: list[str] = []
  skipped: list[tuple[str, str]] = []
  for path in sorted(student_shapes):
    off = [why for prefix, why in candidates if path.startswith(prefix)]
    if not off:
      continue
    s_shape = tuple(student_shapes[path])
    if off[0] is not None:
      skipped.append((path, off[0]))
    elif path not in teacher_shapes:
      skipped.append((path, "missing in teacher"))
    elif path in fresh_in_teacher:
      skipped.append((path, "missing in teacher checkpoint (initialised fresh on import)"))
    elif tuple(teacher_shapes[path]) != s_shape:
      skipped.append((path, f"shape {s_shape} vs {tuple(teacher_shapes[path])} (student vs "
                            "teacher)"))
    else:
      copied.append(path)
  return SeedReport(tuple(copied), tuple(skipped))


def _shapes(flat: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in flat.items()}


def init_student_from_teacher(params: Any, teacher_params: Any, s_cfg: ModelConfig,
                              t_cfg: ModelConfig | ModernConfig, teacher_cfg: Any, *,
                              teacher_fresh: Sequence[str] = ()) -> tuple[Any, SeedReport]:
  """Copies the teacher's embeddings and heads into the student where the shapes agree (spec
  §9.3); every other candidate stays freshly initialised and is reported with the reason.

  Candidates are the embedding tables, embedding transformation and norm, and the MLM and NSP
  heads, each switched by `teacher_cfg.copy_*`. `teacher_fresh` lists teacher paths its
  checkpoint lacked (`Teacher.fresh`): random, so never copied. Returns the new params and a
  `SeedReport` (`plan_seed`'s); the encoder and anything else are untouched and not reported.
  """
  s_flat = traverse_util.flatten_dict(params, sep="/")
  t_flat = traverse_util.flatten_dict(teacher_params, sep="/")
  report = plan_seed(_shapes(s_flat), _shapes(t_flat), s_cfg, t_cfg, teacher_cfg,
                     teacher_fresh=teacher_fresh)
  for path in report.copied:
    s_flat[path] = _copy_leaf(t_flat[path], s_flat[path])
  return traverse_util.unflatten_dict(s_flat, sep="/"), report


# Parameter groups (schedule.GROUPS) a stage runs: embeddings always, the heads only for the
# output terms.
_HEAD_TERMS = ("mlm", "kd", "nsp")
FROZEN_FRESH_MODES = ("refuse", "warn")


def frozen_fresh(stages: Sequence[Any], report: SeedReport) -> list[tuple[str, list[str], bool]]:
  """(stage, fresh paths it runs frozen, whether any could not be copied) per stage that runs
  freshly initialised embeddings or heads without training them. Paths switched off by
  `teacher.copy_*` are the user's choice; the others (another width, a headless teacher)
  could never have been copied."""
  out = []
  for stage in stages:
    frozen = []
    if stage.multipliers.embeddings is None:
      frozen.append("embeddings/")
    if stage.multipliers.heads is None and any(stage.weight(t) > 0 for t in _HEAD_TERMS):
      frozen.extend(("cls/", "pooler/"))
    paths = [(p, why) for p, why in report.skipped if p.startswith(tuple(frozen))]
    if paths:
      uncopyable = any(not why.startswith("switched off") for _, why in paths)
      out.append((stage.name, [p for p, _ in paths], uncopyable))
  return out


def check_frozen_fresh(stages: Sequence[Any], report: SeedReport, mode: str,
                       schedule_name: str) -> list[str]:
  """Refuses (mode 'refuse') a schedule whose stages freeze parameters the teacher could not
  seed, naming `pkt_tf2`; returns the warnings to log otherwise (one per stage)."""
  if mode not in FROZEN_FRESH_MODES:
    raise ValueError(f"teacher.frozen_fresh={mode!r}: choose one of {FROZEN_FRESH_MODES}")
  found = frozen_fresh(stages, report)
  names = [name for name, _, uncopyable in found if uncopyable]
  if names and mode == "refuse":
    paths = sorted({p for _, ps, uncopyable in found if uncopyable for p in ps})
    shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    raise ValueError(
        f"schedule `{schedule_name}` freezes {shown} in {len(names)} stage(s) ({names[0]} ...) "
        "but the teacher could not seed them (see the kept-fresh list: another width or no "
        "such tensor), so they would stay random through those stages: use "
        "schedule.name=pkt_tf2 (trains the embeddings in the layer-wise phases), or set "
        "teacher.frozen_fresh=warn to run it anyway")
  return [f"stage `{name}` runs {', '.join(paths)} frozen at their fresh initialisation "
          "(not copied from the teacher)" + ("; schedule.name=pkt_tf2 trains them"
                                             if uncopyable else "")
          for name, paths, uncopyable in found]


def seed_report_summary(report: SeedReport) -> str:
  """One log line: the copied groups, and the fresh paths grouped by reason."""
  groups = sorted({p.rsplit("/", 2)[0] for p in report.copied})
  by_reason: dict[str, list[str]] = {}
  for path, why in report.skipped:
    by_reason.setdefault(why, []).append(path)
  fresh = "; ".join(f"{why}: {', '.join(paths)}" for why, paths in sorted(by_reason.items()))
  return (f"copied {len(report.copied)} tensors from the teacher ({', '.join(groups) or 'none'})"
          + (f"; kept fresh: {fresh}" if fresh else ""))


__all__ = ["PROJECTION_KEY", "Teacher", "TransferPlan", "SeedReport", "open_teacher",
           "load_teacher", "check_transfer", "init_transfer_params",
           "init_student_from_teacher", "plan_seed", "check_vocabulary", "teacher_vocab_file", "check_frozen_fresh", "frozen_fresh",
           "seed_report_summary"]
