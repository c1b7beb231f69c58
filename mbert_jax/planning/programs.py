"""Every distinct compiled program of a run, built from its config alone: no data, no weights.

This module is the planner's only link to the tasks. Pretraining and distillation stages come
from `distill.task.design` (the part of `PretrainTask`'s setup that needs no inputs);
fine-tuning's one stage is assembled from the pieces `finetune.task.FinetuneTask` builds it
from (model config, optimizer, loss); the teacher-cache writer's forward is jitted as
`distill.cache_writer` jits it. Every train step goes through `training.step.jit_train_step`,
the step the loop compiles. Shapes stand in for what a run reads: the vocabulary size from the
config (or the teacher's), a teacher's architecture from `teacher.checkpoint`'s config file, the
model its pretraining recipe trains, or a model preset, and batches as ShapeDtypeStructs.

A `Program.build(mesh, global_batch, remat)` returns the jitted step and its arguments as
ShapeDtypeStructs; the planner lowers and compiles it for its devices, at the config's batch or
at the batches `--fit` tries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from tokenizers import Tokenizer

from mbert_jax import config_files
from mbert_jax.data import BATCH_KEYS
from mbert_jax.data.tokenizer import parse_trained_vocab_size
from mbert_jax.distill import teacher as teacher_lib
from mbert_jax.distill import cache_config, cache_format, cache_writer, micro_teacher
from mbert_jax.distill import config as distill_config
from mbert_jax.distill import task as distill_task
from mbert_jax.finetune import task as ft
from mbert_jax.models import MODERN_PRESETS, ModelConfig, build, example_inputs, modern_preset, preset
from mbert_jax.models import summary as model_summary
from mbert_jax.training import optim, sharding
from mbert_jax.training.state import abstract_state, state_shardings
from mbert_jax.training.step import jit_train_step
from mbert_jax.training.task import StagePlan
from mbert_jax.training.workdir import is_mbert_workdir

KINDS = ("pretraining", "layerwise", "transfer", "pd_online", "pd_cached", "finetune_glue",
         "finetune_squad", "cache_writer")
DEFAULT_TEACHER = "ib_bert_large"        # configs/distill_mobilebert.py's default teacher
TEACHER_RECIPE = os.path.join("configs", "ib_bert_large.py")  # how an IB-BERT teacher is made
FINETUNE_SEQ = {"glue": 128, "squad": 384}
# A vocabulary file the planner cannot size (a hub model's, offline): BERT's uncased WordPiece.
BERT_VOCAB = 30522
_PHASE_FAMILY = re.compile(r"^(.*?)(\d+)$")

# (mesh, global batch, remat) -> (the jitted program, its arguments as ShapeDtypeStructs)
Build = Callable[[Any, int, bool], tuple[Any, tuple]]


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled program of a run: a table row. `group`: 'run' (the config's own schedule),
  'teacher' (the pretraining its teacher needs) or 'finetune' (the student downstream)."""
  name: str
  stage: str
  kind: str   # one of KINDS
  group: str
  seq: int
  global_batch: int
  grad_accum: int
  flops_per_example: float
  build: Build
  mesh_cfg: Any
  remat: bool
  remat_field: str | None        # the config field that turns on rematerialisation, if any
  depth: int | None = None       # a layer-wise phase's depth
  note: str = ""


@dataclasses.dataclass(frozen=True)
class ScheduleEntry:
  """One stage of a schedule: its steps and the program(s) its step time comes from. A
  layer-wise phase that was not compiled is interpolated by depth between two that were."""
  stage: str
  steps: int
  group: str
  rows: tuple[str, ...]
  weights: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class RunPrograms:
  programs: list[Program]
  schedule: list[ScheduleEntry]
  notes: list[str]


# ============================================================================ config reading

def _ref_args(ref: str | None) -> dict[str, str]:
  _, arg = config_files.split_ref(ref or "")
  out = {}
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    out[key.strip()] = value.strip() or "true"
  return out


def teacher_preset_from_ref(ref: str | None) -> str:
  """The teacher model preset a config file argument asks for (`:teacher=bert_base`, with
  `smoke` its CPU-sized twin); configs/distill_mobilebert.py's default otherwise."""
  args = _ref_args(ref)
  name = args.get("teacher", DEFAULT_TEACHER)
  return name + "_micro" if args.get("smoke") == "true" else name


def _vocab_file_size(spec: str) -> int | None:
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    for name in ("tokenizer.json", "vocab.txt"):
      if os.path.isfile(os.path.join(path, name)):
        return _vocab_file_size(os.path.join(path, name))
    return None
  if path.endswith(".json") and os.path.isfile(path):
    return Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return sum(1 for line in f if line.strip())
  return None


def vocab_size(model_section, vocab_spec: str, teacher: ModelConfig | None = None,
               fallback: int | None = None) -> int:
  """The vocabulary a run's tokenizer will have, without building it: `model.vocab_size`, a
  trained size (`train:N`), a vocabulary file's, or the teacher's (`data.vocab=teacher`)."""
  given = int(model_section.get("vocab_size", -1))
  if given > 0:
    return given
  spec = str(vocab_spec or "")
  if spec.startswith("train:"):
    return int(parse_trained_vocab_size(spec))
  if teacher is not None and (spec in ("", "teacher") or not os.path.exists(spec)):
    return teacher.vocab_size
  size = _vocab_file_size(spec) if spec else None
  if size is not None:
    return size
  if fallback is not None:
    return fallback
  raise ValueError(f"data.vocab = {spec!r}: the planner cannot tell its size; set "
                   "model.vocab_size")


def _hf_has_mlm_head(path: str) -> bool:
  """From config.json's `architectures` alone (the weights are not read): a bare encoder
  (BertModel) has no MLM head."""
  try:
    with open(os.path.join(path, "config.json")) as f:
      archs = json.load(f).get("architectures") or []
  except (OSError, ValueError):
    return True
  return not archs or any(a.endswith(("ForPreTraining", "ForMaskedLM")) for a in archs)


def teacher_config(config, preset_name: str) -> tuple[ModelConfig, bool, str]:
  """(architecture, has an MLM head, where it came from): `teacher.checkpoint`'s config file
  when it names a directory, else the model preset."""
  path = str(config.teacher.get("checkpoint", "") or "")
  if micro_teacher.is_micro(path):  # made in the workdir at run time: its preset is its shape
    preset_name, path = path[len(micro_teacher.PREFIX):], ""
  if path and os.path.isdir(path):
    cfg = teacher_lib.read_teacher_config(config.teacher)
    has_mlm = True if is_mbert_workdir(path) else _hf_has_mlm_head(path)
    return cfg, has_mlm, path
  if path:
    raise FileNotFoundError(f"teacher.checkpoint = {path!r} is not a directory")
  architecture = modern_preset if preset_name in MODERN_PRESETS else preset
  cfg = architecture(preset_name).replace(compute_dtype=config.teacher.compute_dtype)
  return cfg, True, f"preset {preset_name}"


# ============================================================================ shapes

def _struct(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def pretraining_batch(mesh, batch: int, seq: int, preds: int) -> dict[str, jax.ShapeDtypeStruct]:
  """What `data.Pipeline.batch_at` yields, as shapes (mbert_jax/data/pipeline.py)."""
  dtypes = {"masked_lm_weights": jnp.float32}
  shapes = {"masked_lm_positions": (batch, preds), "masked_lm_ids": (batch, preds),
            "masked_lm_weights": (batch, preds), "next_sentence_labels": (batch,)}
  return {k: _struct(shapes.get(k, (batch, seq)), dtypes.get(k, jnp.int32), mesh)
          for k in BATCH_KEYS}


def cached_targets(mesh, batch: int, preds: int, settings, vocab: int) -> dict:
  """The fields `TeacherCache.targets_at` adds to a PD batch."""
  k = int(settings.k)
  return {"teacher_topk_values": _struct((batch, preds, k), settings.value_dtype, mesh),
          "teacher_topk_indices": _struct((batch, preds, k),
                                          cache_format.index_dtype(vocab), mesh),
          "teacher_log_normalizer": _struct((batch, preds), jnp.float32, mesh)}


def finetune_batch(mesh, batch: int, seq: int, info: ft.TaskInfo) -> dict:
  """What `FinetuneTask.batch_at` yields, as shapes."""
  out = {k: _struct((batch, seq), jnp.int32, mesh)
         for k in ("input_ids", "token_type_ids", "attention_mask")}
  if info.kind == "squad":
    out.update(start_positions=_struct((batch,), jnp.int32, mesh),
               end_positions=_struct((batch,), jnp.int32, mesh))
  else:
    out["labels"] = _struct((batch,), jnp.float32 if info.is_regression else jnp.int32, mesh)
  return out


def _abstract_model(cfg: ModelConfig, mesh, rules):
  """(module, its params as ShapeDtypeStructs carrying their shardings), nothing allocated."""
  model = build(cfg)
  _, abs_params, shardings = sharding.abstract_params(model, example_inputs(cfg), mesh, rules)
  return model, sharding.with_shardings(abs_params, shardings)


def _step(plan: StagePlan, config, abs_params, p_shardings, mesh, batch):
  st_sh = state_shardings(p_shardings, plan.tx, abs_params, mesh)
  state = abstract_state(st_sh, abs_params, plan.tx)
  batch_sh = {k: v.sharding for k, v in batch.items()}
  return (jit_train_step(plan, int(config.train.seed), int(config.train.grad_accum_steps), st_sh,
                         batch_sh, mesh, sharding.rules_from_config(config.mesh)),
          (state, plan.aux, batch))


# ============================================================================ pretraining

@dataclasses.dataclass(frozen=True)
class _Pretraining:
  """What every stage of a pretraining / distillation config shares."""
  config: Any
  stages: list
  s_cfg: ModelConfig
  t_cfg: ModelConfig | None
  transfer: Any
  seq: int
  preds: int

  def design(self, mesh, remat: bool, cached_stage: int | None) -> distill_task.Design:
    """`PretrainTask`'s programs on `mesh`, the teacher's parameters as shapes."""
    rules = sharding.rules_from_config(self.config.mesh)
    t_params = None
    if self.t_cfg is not None:
      _, t_params = _abstract_model(self.t_cfg, mesh, rules)
    return distill_task.design(self.config, self.stages, self.s_cfg.replace(remat=remat),
                               self.t_cfg, self.transfer, t_params, mesh, rules, cached_stage,
                               cache_config.cache_dir_of(self.config) or "(planned)")

  def build_stage(self, index: int, cached: bool) -> Build:
    def build(mesh, batch: int, remat: bool):
      d = self.design(mesh, remat, index if cached else None)
      shapes = pretraining_batch(mesh, batch, self.seq, self.preds)
      if cached:
        shapes.update(cached_targets(mesh, batch, self.preds,
                                     cache_config.cache_settings(self.config),
                                     d.student.vocab_size))
      return _step(d.plans[index], self.config, d.abstract_params, d.param_shardings,
                   mesh, shapes)
    return build

  def build_cache_writer(self, temperature: float) -> Build:
    """The teacher-cache writer's forward, jitted as `teacher_cache.write_cache` jits it."""
    def build(mesh, batch: int, remat: bool):
      del remat  # a forward pass keeps no activations for a backward
      settings = cache_config.cache_settings(self.config)
      rules = sharding.rules_from_config(self.config.mesh)
      teacher, t_params = _abstract_model(self.t_cfg, mesh, rules)
      fn = cache_writer.jit_targets_fn(teacher, int(settings.k), temperature,
                                       settings.value_dtype,
                                       cache_format.index_dtype(self.t_cfg.vocab_size), mesh, rules)
      shapes = pretraining_batch(mesh, batch, self.seq, self.preds)
      return fn, (t_params, {k: shapes[k] for k in ("input_ids", "token_type_ids",
                                                      "attention_mask", "masked_lm_positions")})
    return build


def _stop_steps(stages, stop: int) -> list[int]:
  """Each stage's steps in a run that stops at global step `stop` (-1: the schedule's end)."""
  out, start = [], 0
  for s in stages:
    end = start + s.steps if stop == -1 else min(start + s.steps, stop)
    out.append(max(end - start, 0))
    start += s.steps
  return out


def _phase_family(stage) -> str | None:
  """Layer-wise phases that differ only in depth share a family (`pkt_layer_`)."""
  m = _PHASE_FAMILY.match(stage.name)
  if m and stage.num_layers and stage.transfer_layers:
    return m.group(1)
  return None


def _sampled_depths(depths: list[int], full: int) -> list[int]:
  """The depths of a phase family to compile: the first, the deepest truncated one, the middle
  one between them, and the full depth (a different program: it updates every layer)."""
  truncated = [d for d in depths if d < full]
  picked = set()
  if truncated:
    lo, hi = truncated[0], truncated[-1]
    mid = min(truncated, key=lambda d: abs(d - (lo + hi) / 2))
    picked |= {lo, mid, hi}
  picked |= {d for d in depths if d >= full}
  return sorted(picked)


def _pretraining_rows(p: _Pretraining, group: str, prefix: str, steps: list[int],
                      cache_dir: str) -> tuple[list[Program], list[ScheduleEntry]]:
  c, L = p.config, p.s_cfg.num_hidden_layers
  batch, accum = int(c.data.batch_size), int(c.train.grad_accum_steps)
  common = dict(group=group, seq=p.seq, global_batch=batch, grad_accum=accum, mesh_cfg=c.mesh,
                remat=bool(p.s_cfg.remat), remat_field="model.remat")
  rows: list[Program] = []
  sched: list[ScheduleEntry] = []
  families: dict[str, list[int]] = {}
  for i, s in enumerate(p.stages):
    fam = _phase_family(s)
    if fam is not None:
      families.setdefault(fam, []).append(i)
  sampled = {}
  for fam, idx in families.items():
    depths = [p.stages[i].num_layers for i in idx]
    keep = _sampled_depths(depths, L)
    sampled[fam] = [(p.stages[i].num_layers, i) for i in idx if p.stages[i].num_layers in keep]
  cacheable = {cache_config.distillation_stage(p.stages)[0]} if any(
      cache_config.is_cacheable(s) for s in p.stages) else set()
  # FLOPs as the loop logs them (`StagePlan.flops_per_example`): a design on one local device.
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  flops = [plan.flops_per_example for plan in p.design(one, False, None).plans]
  cached_flops = {i: p.design(one, False, i).plans[i].flops_per_example for i in cacheable}
  for i, s in enumerate(p.stages):
    fam = _phase_family(s)
    if fam is not None:
      picks = sampled[fam]
      if any(j == i for _, j in picks):
        rows.append(Program(name=prefix + s.name, stage=s.name, kind="layerwise",
                            flops_per_example=flops[i], build=p.build_stage(i, False),
                            depth=s.num_layers, **common))
        sched.append(ScheduleEntry(s.name, steps[i], group, (prefix + s.name,), (1.0,)))
      else:
        below = max((d, j) for d, j in picks if d < s.num_layers)
        above = min((d, j) for d, j in picks if d > s.num_layers)
        w = (s.num_layers - below[0]) / (above[0] - below[0])
        sched.append(ScheduleEntry(s.name, steps[i], group,
                                   (prefix + p.stages[below[1]].name,
                                    prefix + p.stages[above[1]].name), (1.0 - w, w)))
      continue
    if i in cacheable:
      online = Program(name=prefix + "pd_teacher_online", stage=s.name, kind="pd_online",
                       flops_per_example=flops[i], build=p.build_stage(i, False), **common)
      cached = Program(name=prefix + "pd_teacher_cache", stage=s.name, kind="pd_cached",
                       flops_per_example=cached_flops[i], build=p.build_stage(i, True),
                       note="teacher targets read from a cache", **common)
      writer = Program(name=prefix + "teacher_cache_writer", stage=s.name, kind="cache_writer",
                       flops_per_example=float(model_summary.forward_flops(
                           p.t_cfg, p.seq, None, p.preds, heads=True)),
                       build=p.build_cache_writer(s.temperature),
                       note="python -m mbert_jax.teacher_cache: one teacher forward per step",
                       **{**common, "grad_accum": 1, "remat_field": None})
      rows += [online, cached, writer]
      if cache_dir:
        sched.append(ScheduleEntry(s.name, steps[i], group, (cached.name,), (1.0,)))
        sched.append(ScheduleEntry("teacher_cache_writer", steps[i], group, (writer.name,),
                                   (1.0,)))
      else:
        sched.append(ScheduleEntry(s.name, steps[i], group, (online.name,), (1.0,)))
      continue
    kind = ("pretraining" if not s.needs_teacher else
            "transfer" if s.transfer_layers else "pd_online")
    name = prefix + (s.name if kind != "pd_online" or "pd" in s.name else f"pd_{s.name}")
    rows.append(Program(name=name, stage=s.name, kind=kind, flops_per_example=flops[i],
                        build=p.build_stage(i, False), **common))
    sched.append(ScheduleEntry(s.name, steps[i], group, (name,), (1.0,)))
  return rows, sched


def _stages(config) -> list:
  for section in ("model", "data", "train", "mesh", "schedule"):
    if section not in config:
      raise ValueError(f"config has no `{section}` section")
  return distill_config.build_stages(config, int(config.model.num_hidden_layers))


def _pretraining(config, teacher: tuple[ModelConfig, bool, str] | None = None) -> _Pretraining:
  """The shared pieces of a pretraining / distillation config; `teacher` (architecture, has an
  MLM head, where it came from) when its stages need one."""
  stages = _stages(config)
  seq, preds = int(config.data.max_seq_length), int(config.data.max_predictions_per_seq)
  t_cfg, transfer = None, None
  if any(s.needs_teacher for s in stages):
    t_cfg, has_mlm, source = teacher
  vocab = vocab_size(config.model, str(config.data.vocab), t_cfg)
  if t_cfg is not None and source.startswith("preset "):
    # A preset has no tokenizer of its own: the teacher this run reads will have been trained
    # on the run's vocabulary.
    t_cfg = t_cfg.replace(vocab_size=vocab)
  s_cfg = distill_config.model_config_from(config.model, vocab, str(config.train.compute_dtype),
                                           seq)
  if t_cfg is not None:
    transfer = teacher_lib.check_transfer(config.kt, stages, s_cfg, t_cfg, has_mlm,
                                          teacher_path=source)
  return _Pretraining(config, stages, s_cfg, t_cfg, transfer, seq, preds)


def _teacher_recipe(config, teacher_preset: str, recipe: str | None) -> tuple[Any, str]:
  """(the config that pretrains this run's teacher, its reference), or (None, '') when the
  teacher exists (a checkpoint) or is not an IB-BERT (a pretrained BERT is downloaded, not
  trained)."""
  if config.teacher.get("checkpoint"):
    return None, ""
  if recipe is None:
    if not teacher_preset.startswith("ib_bert_large"):
      return None, ""
    args = [a for a in ("smoke" if teacher_preset.endswith("_micro") else "",
                        "bf16" if config.train.compute_dtype == "bfloat16" else "") if a]
    recipe = TEACHER_RECIPE + (":" + ",".join(args) if args else "")
  path, arg = config_files.split_ref(recipe)
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(config_files.REPO_ROOT, path)
  return config_files.load_config(path + (f":{arg}" if arg is not None else "")), recipe


# ============================================================================ fine-tuning

def _finetune_program(ft_config, info: ft.TaskInfo, m_cfg: ModelConfig, name: str, group: str,
                      batch: int, steps: int, remat_field: str | None,
                      note: str = "") -> Program:
  seq = int(ft_config.data.max_seq_length)
  tc = ft_config.train
  opt_cfg = ft.optimizer_config(tc, total_steps=max(steps, 1), warmup_steps=0)

  def build(mesh, b: int, remat: bool):
    cfg = m_cfg.replace(remat=remat)
    model = ft.build_model(info, cfg, float(ft_config.finetune.classifier_dropout))
    abs_params, p_sh = ft.abstract_params(model, cfg, mesh,
                                          sharding.rules_from_config(ft_config.mesh))
    tx = optim.build_optimizer(opt_cfg, abs_params)
    plan = StagePlan(name="finetune", steps=max(steps, 1), tx=tx, loss=ft.make_loss(model, info),
                     learning_rate=lambda s: 0.0)
    return _step(plan, ft_config, sharding.with_shardings(abs_params, p_sh), p_sh, mesh,
                 finetune_batch(mesh, b, seq, info))

  # The classifier / span head adds a few FLOPs per sequence; models.summary counts the
  # backbone, as the paper does.
  return Program(name=name, stage="finetune", kind=f"finetune_{info.kind}", group=group,
                 seq=seq, global_batch=batch, grad_accum=int(tc.grad_accum_steps),
                 flops_per_example=3.0 * model_summary.forward_flops(m_cfg, seq), build=build,
                 mesh_cfg=ft_config.mesh, remat=bool(m_cfg.remat), remat_field=remat_field,
                 note=note)


def _random_init(config) -> ml_collections.ConfigDict:
  """`config` with `init.checkpoint` empty: fine-tuning builds `config.model` then."""
  c = config.copy_and_resolve_references()
  c.init.checkpoint = ""
  return c


def _finetune_model(config) -> ModelConfig:
  """The architecture a fine-tuning config trains: a local `init.checkpoint`'s (its config
  file only), else `config.model` (a hub model offline is planned as `config.model`)."""
  spec = str(config.init.checkpoint or "")
  if spec and os.path.isdir(os.path.expanduser(spec)):
    source = ft.resolve_init(config.init)
    return ft.finetune_model_config(source, config, source.model_config.vocab_size)
  fallback = int(config.data.train_vocab_size)
  if spec:
    logging.info("init.checkpoint = %s is not a local directory: planning config.model with "
                 "BERT's %d-token vocabulary", spec, BERT_VOCAB)
    fallback = BERT_VOCAB
  c = _random_init(config)
  vocab = vocab_size(c.model, str(c.data.vocab), fallback=fallback)
  return ft.finetune_model_config(ft.resolve_init(c.init), c, vocab)


def _downstream(student: ModelConfig, run_config, num_devices: int) -> tuple[list[Program], list]:
  """GLUE at 128 and SQuAD at 384 for the student a run makes, with the fine-tuning defaults
  (finetune/defaults.py) on every device; a default batch smaller than the data-parallel size
  is raised to it."""
  rows, notes = [], []
  for kind in ("glue", "squad"):
    c = ft.default_config(kind)
    c.model = ml_collections.ConfigDict(student.to_dict())
    seq = min(FINETUNE_SEQ[kind], student.max_position_embeddings)
    if seq < FINETUNE_SEQ[kind]:
      notes.append(f"finetune_{kind}: sequence {seq}, the student's position table, not "
                   f"{FINETUNE_SEQ[kind]}")
    c.data.max_seq_length = seq
    c.train.compute_dtype = str(run_config.train.compute_dtype)
    info = ft.task_info(c)
    m_cfg = ft.finetune_model_config(ft.resolve_init(c.init), c, student.vocab_size)
    batch = int(c.data.batch_size)
    data, fsdp, _ = sharding.mesh_shape(c.mesh, num_devices)
    dp = data * fsdp
    note = ""
    if batch % dp:
      raised = -(-batch // dp) * dp
      note = f"default batch {batch} raised to {raised}, a multiple of the {dp} data shards"
      notes.append(f"finetune_{kind}: {note}")
      batch = raised
    c.data.batch_size = batch
    rows.append(_finetune_program(c, info, m_cfg, f"finetune_{kind}", "finetune", batch, 0,
                                  None, note))
  return rows, notes


# ============================================================================ entry

def programs_for(config: ml_collections.ConfigDict, num_devices: int, *,
                 teacher_preset: str = DEFAULT_TEACHER,
                 teacher_recipe: str | None = None) -> RunPrograms:
  """Every distinct program of `config`'s run, its schedule, and what the planner assumed.

  Pretraining / distillation configs: each stage kind (layer-wise phases sampled by depth),
  the PD stage with the teacher online and from a cache, the cache writer, the teacher's own
  pretraining when the run needs one (group 'teacher'), and the student's fine-tuning (group
  'finetune'). Fine-tuning configs: their one program.
  """
  if "runs" in config:
    raise ValueError("the config is a pipeline of runs (a `runs` section): plan each run's "
                     "config on its own")
  if "finetune" in config:
    info = ft.task_info(config)
    m_cfg = _finetune_model(config)
    steps = int(config.train.steps) if int(config.train.steps) > 0 else 0
    name = f"finetune_{info.kind}"
    # With an initial checkpoint its own config (not `model`) sets the architecture.
    remat_field = None if str(config.init.checkpoint or "") else "model.remat"
    prog = _finetune_program(config, info, m_cfg, name, "run", int(config.data.batch_size),
                             steps, remat_field)
    notes = [] if steps else ["fine-tuning steps follow the dataset size (train.epochs), which "
                              "the planner does not read: set train.steps to schedule them"]
    return RunPrograms([prog], [ScheduleEntry(info.name, steps, "run", (name,), (1.0,))], notes)

  notes: list[str] = []
  recipe, recipe_ref, teacher, tp = None, "", None, None
  if any(st.needs_teacher for st in _stages(config)):
    recipe, recipe_ref = _teacher_recipe(config, teacher_preset, teacher_recipe)
    if recipe is not None:
      # The teacher this run reads is the one its recipe trains (vocabulary and positions
      # included, which a smoke-sized recipe changes).
      tp = _pretraining(recipe)
      teacher = (tp.s_cfg.replace(compute_dtype=str(config.teacher.compute_dtype)), True,
                 f"the model {recipe_ref} pretrains")
    else:
      teacher = teacher_config(config, teacher_preset)
    notes.append(f"teacher: {teacher[2]}")
  p = _pretraining(config, teacher)
  rows, sched = _pretraining_rows(p, "run", "", _stop_steps(p.stages, int(config.train.steps)),
                                  cache_config.cache_dir_of(config))
  if tp is not None:
    t_rows, t_sched = _pretraining_rows(tp, "teacher", "teacher_",
                                        _stop_steps(tp.stages, int(recipe.train.steps)), "")
    if len(t_rows) == 1:  # the one `scratch` stage of a pretraining recipe
      t_rows = [dataclasses.replace(t_rows[0], name="teacher_pretraining")]
      t_sched = [dataclasses.replace(e, rows=("teacher_pretraining",)) for e in t_sched]
    rows += t_rows
    sched += t_sched
    notes.append(f"teacher pretraining: {recipe_ref}, batch {int(recipe.data.batch_size)} x "
                 f"{int(recipe.data.max_seq_length)}")
  elif p.t_cfg is not None and not config.teacher.get("checkpoint"):
    notes.append(f"teacher {teacher_preset}: a pretrained model, nothing to pretrain")
  ft_rows, ft_notes = _downstream(p.s_cfg, config, num_devices)
  return RunPrograms(rows + ft_rows, sched, notes + ft_notes)
