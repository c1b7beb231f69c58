"""A run's teacher cache as its config describes it: the writer settings, the directory a run
reads, the global steps of the pre-training distillation (PD) stage the cache holds, and the
identity key that ties the cached targets to their data and teacher.

Writer and reader both derive everything here from the run's config, so a cache built for other
data or another teacher is refused (`refuse_other_key`) with each differing field named.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import ml_collections

from mbert_jax.data.pipeline import CACHE_VERSION, complete_data_config
from mbert_jax.distill.cache_format import FORMAT_VERSION
from mbert_jax.distill.schedule import build_schedule
from mbert_jax.training.workdir import CHECKPOINT_DIR, MODEL_CONFIG_FILE, is_mbert_workdir

VALUE_DTYPES = ("float16", "float32")
# Data settings that decide which batch a step gets; the tokenizer and corpus enter as digests.
DATA_FIELDS = ("source", "text_field", "max_seq_length", "max_predictions_per_seq",
               "masked_lm_prob", "short_seq_prob", "whole_word_mask", "batch_size", "seed",
               "dynamic_masking", "dupe_factor", "pairing_rounds", "sentence_splitter",
               "document_grouping", "min_document_sentences", "max_line_chars",
               "max_document_chars")


# ============================================================================ config

def default_cache_config() -> ml_collections.ConfigDict:
  """The `teacher_cache` section (writer settings). The reader's switch is
  `schedule.teacher_cache` (a cache directory; empty = the teacher runs online)."""
  c = ml_collections.ConfigDict()
  c.k = 64                    # teacher logits kept per prediction (20 x 64 x 4 B = 5.1 KB/seq)
  c.value_dtype = "float16"   # float16 | float32 (exactness checks)
  c.steps_per_shard = 0       # 0 = auto, about 256 MiB per shard file
  return c


def cache_settings(config) -> ml_collections.ConfigDict:
  """`config.teacher_cache` over the defaults (configs may predate the section), validated."""
  out = default_cache_config()
  given = config.get("teacher_cache") if hasattr(config, "get") else None
  given = {} if given is None else (given.to_dict() if hasattr(given, "to_dict") else dict(given))
  unknown = sorted(set(given) - set(out.keys()))
  if unknown:
    raise ValueError(f"unknown teacher_cache field(s) {unknown}; known: {sorted(out.keys())}")
  for key, value in given.items():
    out[key] = value
  if not isinstance(out.k, int) or out.k < 1:
    raise ValueError(f"teacher_cache.k = {out.k!r}: a positive number of logits per prediction")
  if out.value_dtype not in VALUE_DTYPES:
    raise ValueError(f"teacher_cache.value_dtype = {out.value_dtype!r}: one of {VALUE_DTYPES}")
  if not isinstance(out.steps_per_shard, int) or out.steps_per_shard < 0:
    raise ValueError(f"teacher_cache.steps_per_shard = {out.steps_per_shard!r}: >= 0 (0 = auto)")
  return out


def cache_dir_of(config) -> str:
  """`schedule.teacher_cache`: where a run reads its PD targets; '' = teacher online."""
  return str(config.schedule.get("teacher_cache", "") or "").strip()


def schedule_stages(config) -> list:
  """The run's stages, built from `config.schedule` as the training task builds them.
  (`schedule.teacher_cache` is one of the schedule config's keys; `build_schedule` accepts it
  and no stage reads it: it says where the PD targets come from, not how a stage trains.)"""
  return build_schedule(config.schedule, int(config.model.num_hidden_layers))


def is_cacheable(stage) -> bool:
  """A stage whose only use of the teacher is its MLM distribution (the 'kd' term)."""
  return (stage.weight("kd") > 0 and not stage.transfer_layers and stage.num_layers is None)


def distillation_stage(stages: Sequence) -> tuple[int, int]:
  """(index, first global step) of the pre-training distillation stage: the last cacheable one."""
  start, found = 0, None
  for index, stage in enumerate(stages):
    if is_cacheable(stage):
      found = (index, start)
    start += stage.steps
  if found is None:
    raise ValueError("the schedule has no pre-training distillation stage to cache (a stage "
                     "with a 'kd' weight and no layer-wise terms); stages: "
                     + ", ".join(s.name for s in stages))
  return found


def pd_stage_steps(config, stages: Sequence) -> tuple[int, int, int]:
  """(stage index, first, end): global steps of the PD stage that this run executes
  (train.steps may stop it early, or before it starts: end <= first)."""
  index, first = distillation_stage(stages)
  end = first + stages[index].steps
  limit = int(config.train.get("steps", -1)) if "train" in config else -1
  return index, first, end if limit == -1 else min(end, limit)


def cached_steps(config, stages: Sequence | None = None) -> tuple[int, int]:
  """Global steps [first, end) of the PD stage that this run executes (train.steps may stop it
  early); refused when the run stops before the stage starts."""
  stages = schedule_stages(config) if stages is None else stages
  index, first, end = pd_stage_steps(config, stages)
  limit = config.train.get("steps", -1)
  if end <= first:
    raise ValueError(f"train.steps = {limit} stops the run before its distillation stage "
                     f"`{stages[index].name}` (global steps {first}.."
                     f"{first + stages[index].steps})")
  return first, end


# ============================================================================ identity

def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def digest(obj: Any) -> str:
  """16 hex digits of the SHA-256 of `obj` as canonical JSON (the header's `key_digest`)."""
  return _sha256(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


def _checkpoint_steps(run_dir: str) -> list[int]:
  root = os.path.join(run_dir, CHECKPOINT_DIR)
  if not os.path.isdir(root):
    return []
  # orbax renames a step directory into place when it is complete; temporaries carry suffixes.
  return sorted(int(n) for n in os.listdir(root)
                if n.isdigit() and os.path.isdir(os.path.join(root, n)))


def resolve_teacher_step(teacher_cfg) -> int:
  """The checkpoint step a teacher config names, found without loading any parameter:
  `teacher.step`, else the newest step of an mbert-jax run; -1 for a Hugging Face directory."""
  path = str(teacher_cfg.checkpoint or "")
  if not path:
    raise ValueError("teacher.checkpoint is empty: the cache needs the teacher that made it")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"teacher.checkpoint = {path!r} is not a directory")
  if not is_mbert_workdir(path):
    return -1
  if int(teacher_cfg.step) >= 0:
    return int(teacher_cfg.step)
  steps = _checkpoint_steps(path)
  if not steps:
    raise FileNotFoundError(f"teacher.checkpoint = {path!r} holds no checkpoint")
  return steps[-1]


def _teacher_fingerprint(path: str) -> str:
  """The teacher's architecture file, plus names and sizes of a Hugging Face directory's weight
  files (an mbert-jax run is pinned by path and step instead)."""
  name = MODEL_CONFIG_FILE if is_mbert_workdir(path) else "config.json"
  material = {}
  config_path = os.path.join(path, name)
  if os.path.isfile(config_path):
    with open(config_path) as f:
      model = json.load(f)
    model.pop("compute_dtype", None)  # a key field of its own
    material["config"] = model
  if name == "config.json":
    material["weights"] = sorted((n, os.path.getsize(os.path.join(path, n)))
                                 for n in os.listdir(path)
                                 if n.endswith((".safetensors", ".bin", ".msgpack")))
  return digest(material)


def identity_key(config, teacher_step: int, pipeline) -> dict[str, Any]:
  """What the cached targets depend on: data, tokenizer, corpus, teacher, k, temperature.

  Writer and reader both call this; `pipeline` is the run's train pipeline (its corpus and
  tokenizer digests catch changed files behind an unchanged config string).
  """
  data = complete_data_config(config.data)
  stages = schedule_stages(config)
  index, _ = distillation_stage(stages)
  settings = cache_settings(config)
  teacher_path = os.path.realpath(str(config.teacher.checkpoint))
  data_key = {field: data[field] for field in DATA_FIELDS}
  # Only a hold-out carved from `source` changes the training documents.
  data_key["eval_fraction"] = None if str(data.eval_source).strip() else float(data.eval_fraction)
  data_key.update(
      pipeline_version=CACHE_VERSION,
      corpus=os.path.basename(os.path.normpath(pipeline.corpus.directory)),
      tokenizer=_sha256(pipeline.tokenizer.to_str().encode())[:16],
      vocab_size=int(pipeline.vocab_size))
  return {
      "format": FORMAT_VERSION,
      "data": data_key,
      "teacher": {"checkpoint": teacher_path, "step": int(teacher_step),
                  "reinitialise": bool(config.teacher.get("reinitialise", False)),
                  "compute_dtype": str(config.teacher.compute_dtype),
                  "model": _teacher_fingerprint(teacher_path)},
      "targets": {"k": int(settings.k), "value_dtype": str(settings.value_dtype),
                  "temperature": float(stages[index].temperature)},
  }


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def key_differences(cached: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  """One line per differing field: `data.seed: cache 12345, this run 7`."""
  a, b = _flatten(cached), _flatten(expected)
  missing = "(absent)"
  return [f"{name}: cache {a.get(name, missing)!r}, this run {b.get(name, missing)!r}"
          for name in sorted(set(a) | set(b))
          if json.dumps(a.get(name, missing)) != json.dumps(b.get(name, missing))]


def refuse_other_key(cache_dir: str, cached: Mapping[str, Any],
                      expected: Mapping[str, Any]) -> None:
  differences = key_differences(cached, expected)
  if differences:
    raise ValueError(f"teacher cache {cache_dir!r} was built for other data or another teacher: "
                     + "; ".join(differences)
                     + ". Build a cache for this run in another directory, or set "
                     "schedule.teacher_cache='' to run the teacher online.")
