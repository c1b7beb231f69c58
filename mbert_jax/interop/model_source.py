"""One loader for the models a job starts from or exports: an mbert-jax run directory, a
Hugging Face model directory, a sentence-transformers package directory, or (where the caller
allows it) a Hugging Face hub name, downloaded first.

    source = locate("runs/student", setting="teacher.checkpoint")  # what it is; no weights read
    model = load(source, target)   # its parameters: placed as `target` says, or numpy

The teacher (`distill.teacher`), fine-tuning's initial model (`finetune.task`) and the export
(`interop.export`) all load through here. A path that does not exist, a file, a directory that
is neither kind, or a config.json of another model family is refused in one line naming the
setting that gave it. An mbert-jax run is recognised by its model_config.json and read from
its checkpoints/; a Hugging Face directory goes through `hf_import`. `load_flax` reads a
`--format=flax` export back; it sits here, below both, because `export` writes that format and
`predict` runs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from mbert_jax.data.tokenizer import TOKENIZER_FILES
from mbert_jax.interop import export_files, hf_import
from mbert_jax.interop.hf_names import (CONFIG_NAME, SENTENCE_TRANSFORMERS_MODULES,
                                        TORCH_INDEX_NAME, TORCH_NAME)
from mbert_jax.models import (ModelConfig, ModernConfig, build_for, config_from_dict,
                              example_inputs)
from mbert_jax.training import checkpoint as ckpt_lib
from mbert_jax.training import sharding
from mbert_jax.training.workdir import (CHECKPOINT_DIR, CONFIG_FILE, MODEL_CONFIG_FILE, TASK_FILE,
                                        TOKENIZER_DIR, has_checkpoints, is_mbert_workdir,
                                        read_json, read_report)

RUN = "mbert"                               # an mbert-jax run directory
HF = "hf"                                   # a Hugging Face model directory
SENTENCE_TRANSFORMERS = "sentence-transformers"  # a sentence-transformers package directory
# What a fine-tuning run's checkpoint holds, by the kind in its task.json (none: pretraining).
_RUN_HEADS = {None: "pretraining", "glue": "classification", "squad": "question_answering"}
# Files whose presence makes a directory a tokenizer directory (`load_tokenizer` reads either).
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt")


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """What a path or hub name holds, read without its weights."""
  kind: str                      # RUN | HF | SENTENCE_TRANSFORMERS
  path: str                      # the local directory (for a hub name: its downloaded copy)
  model_config: ModelConfig | ModernConfig
  tokenizer_dir: str | None      # holds tokenizer.json or vocab.txt; None when there is none
  setting: str                   # the config field or flag that named it, for messages
  hub_name: str | None = None    # the hub name `path` was downloaded from
  run_config: dict = dataclasses.field(default_factory=dict)  # a run's config.json
  task: dict | None = None       # a fine-tuning run's task.json
  report: dict | None = None     # a finished run's final.json

  @property
  def head(self) -> str:
    """The head of the checkpoint's model: a run's per its task.json; a Hugging Face directory
    imports as the pretraining model."""
    kind = None if self.task is None else self.task.get("kind")
    if kind not in _RUN_HEADS:
      raise ValueError(f"{os.path.join(self.path, TASK_FILE)} has kind={kind!r}; expected glue "
                       "or squad")
    return _RUN_HEADS[kind]

  @property
  def nsp_trained(self) -> bool:
    """False for a pretraining run with data.next_sentence=False: its NSP head (and the pooler
    only that head reads) exists but never learned anything, so nothing should treat it as
    trained (export leaves it out, fine-tuning starts the pooler fresh)."""
    data = self.run_config.get("data") or {}
    return not (self.kind == RUN and self.task is None and data.get("next_sentence") is False)

  @property
  def num_labels(self) -> int:
    """Outputs of a fine-tuned classifier (2 otherwise, which no other head reads)."""
    return int((self.task or {}).get("num_labels", 2))


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A source and its parameters, as `load` read them."""
  source: ModelSource
  params: Any                    # numpy, or jax arrays placed as the target asked
  step: int | None               # a run's checkpoint step; None for a Hugging Face directory
  layout: str                    # 'mbert-jax', or the Hugging Face layout (`Imported.layout`)
  has_mlm_head: bool             # False: a bare encoder (its MLM head, if any, is fresh)
  has_nsp_head: bool
  fresh: tuple[str, ...]         # parameter paths the checkpoint lacked (initialised fresh)
  weights: str                   # what was read: the checkpoint directory or the weights file


# ---------------------------------------------------------------------------- what it is
def looks_like_hub_name(spec: str) -> bool:
  """`name` or `owner/name` as the Hugging Face hub spells them, not a path or a file name."""
  return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec) is not None
          and not spec.startswith((".", "/", "~")) and not spec.endswith((".json", ".txt")))


def _download(name: str, setting: str) -> str:
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(name, allow_patterns=[
        CONFIG_NAME, "*.safetensors", "*.safetensors.index.json", TORCH_NAME, TORCH_INDEX_NAME,
        *TOKENIZER_FILES])
  except Exception as e:  # offline, unknown repo, gated model: all end the same way here
    raise FileNotFoundError(f"{setting} = {name!r} is not a local directory, and "
                            f"downloading it from the Hugging Face hub failed ({e})") from e


def _read_json_if_any(path: str) -> Any:
  return read_json(path) if os.path.isfile(path) else None


def _run_source(path: str, setting: str) -> ModelSource:
  cfg = config_from_dict(read_json(os.path.join(path, MODEL_CONFIG_FILE)))
  tokenizer = os.path.join(path, TOKENIZER_DIR)
  return ModelSource(RUN, path, cfg, tokenizer if os.path.isdir(tokenizer) else None, setting,
                     run_config=_read_json_if_any(os.path.join(path, CONFIG_FILE)) or {},
                     task=_read_json_if_any(os.path.join(path, TASK_FILE)),
                     report=read_report(path))


def _hf_source(path: str, spec: str, setting: str, hub_name: str | None) -> ModelSource:
  d = hf_import.model_dir(Path(path))
  if not (d / CONFIG_NAME).is_file():
    raise ValueError(f"{setting} = {spec!r} holds neither an mbert-jax run ({MODEL_CONFIG_FILE}) "
                     f"nor a Hugging Face model ({CONFIG_NAME})")
  cfg, _ = hf_import.read_config(d)
  kind = (SENTENCE_TRANSFORMERS if (Path(path) / SENTENCE_TRANSFORMERS_MODULES).is_file()
          else HF)
  # An older sentence-transformers package keeps its vocabulary in the encoder's folder.
  tokenizer = next((str(t) for t in (d, Path(path))
                    if any((t / name).is_file() for name in _VOCABULARY_FILES)), None)
  return ModelSource(kind, path, cfg, tokenizer, setting, hub_name)


def locate(spec: str | os.PathLike, *, setting: str = "model", allow_hub: bool = False,
           runs_only: bool = False) -> ModelSource:
  """What `spec` holds: its kind, ModelConfig, tokenizer directory and (a run) its files.

  `setting` names the config field or flag that gave `spec` in every message. `allow_hub`: a
  hub name that is no local path is downloaded (online only). `runs_only`: only an mbert-jax
  run will do (the export). Raises FileNotFoundError for a path that does not exist, and
  ValueError for a file, a directory that holds neither kind of model, or a config.json of
  another model family.
  """
  spec = os.fspath(spec)
  path = os.path.expanduser(spec)
  hub_name = None
  if not os.path.exists(path):
    if not (allow_hub and looks_like_hub_name(spec)):
      raise FileNotFoundError(f"{setting} = {spec!r}: no such directory")
    path, hub_name = _download(spec, setting), spec
  elif not os.path.isdir(path):
    raise ValueError(f"{setting} = {spec!r} is a file; expected an mbert-jax run directory or "
                     "a Hugging Face model directory")
  if is_mbert_workdir(path):
    return _run_source(path, setting)
  if runs_only:
    raise ValueError(f"{setting} = {spec!r} is not an mbert-jax run directory (no "
                     f"{MODEL_CONFIG_FILE})")
  return _hf_source(path, spec, setting, hub_name)


# ---------------------------------------------------------------------------- its parameters
def _host_target(source: ModelSource) -> Any:
  """The run's own model (its head per task.json), abstract, on one device."""
  cfg, head = source.model_config, source.head
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  _, abstract, shardings = sharding.abstract_params(
      build_for(cfg, head, source.num_labels), example_inputs(cfg, head), mesh,
      sharding.DEFAULT_RULES)
  return sharding.with_shardings(abstract, shardings)


def _load_run(source: ModelSource, target: Any, step: int | None, purpose: str) -> LoadedModel:
  on_host = target is None
  head = source.head  # a task.json of an unknown kind is refused before anything is read
  ckpt_dir = os.path.join(source.path, CHECKPOINT_DIR)
  if not has_checkpoints(source.path):
    state = "holds no saved step" if os.path.isdir(ckpt_dir) else "does not exist"
    raise FileNotFoundError(f"{source.path} has no checkpoint to {purpose} ({ckpt_dir} {state}); "
                            "run training until it saves one")
  try:
    params, at = ckpt_lib.restore_params_only(
        ckpt_dir, _host_target(source) if on_host else target, step)
  except ValueError as e:
    raise ValueError(f"{source.setting} = {source.path!r}: cannot restore its parameters "
                     f"({e})") from e
  if on_host:
    params = jax.tree.map(np.asarray, params)
  pretraining = head == "pretraining"
  nsp = pretraining and source.nsp_trained and isinstance(source.model_config, ModelConfig)
  return LoadedModel(source, params, at, "mbert-jax", pretraining, nsp, (), ckpt_dir)


def _place(source: ModelSource, part: str, params: dict[str, Any], target: Any) -> Any:
  """`params[part]` onto the devices `target` names, after checking names and shapes."""
  where = f"{source.setting} = {source.path!r}"
  if part not in params:
    raise ValueError(f"{where} has no `{part}` parameters")
  flat_src = traverse_util.flatten_dict(params[part], sep="/")
  flat_abs = traverse_util.flatten_dict(target, sep="/")
  if set(flat_src) != set(flat_abs):
    raise ValueError(f"{where}: `{part}` parameters differ from the model's: "
                     f"{sorted(set(flat_src) ^ set(flat_abs))[:6]}")
  for p, a in flat_abs.items():
    if tuple(flat_src[p].shape) != tuple(a.shape):
      raise ValueError(f"{where}: {part}/{p} has shape {tuple(flat_src[p].shape)}, the model "
                       f"needs {tuple(a.shape)}")
  return jax.tree.map(lambda a, t: jax.device_put(np.asarray(a, np.float32), t.sharding),
                      params[part], target)


def _load_hf(source: ModelSource, target: Any) -> LoadedModel:
  imported = hf_import.import_model(source.path)
  params = imported.params
  if target is not None:
    params = {part: _place(source, part, params, target[part]) for part in target}
  return LoadedModel(source, params, None, imported.layout, imported.has_mlm_head,
                     imported.has_nsp_head, imported.fresh, imported.source)


def load(source: ModelSource, target: Any = None, *, step: int | None = None,
         purpose: str = "load") -> LoadedModel:
  """The parameters of `source`.

  `target`: abstract parameters (ShapeDtypeStructs carrying shardings, as
  `sharding.with_shardings` makes them) of the top-level parts to read, e.g. only the backbone;
  they come placed as it says. None: the whole model as numpy (a run: the model of its own
  head; a Hugging Face directory: the pretraining model, heads it lacks initialised fresh).
  `step`: a run's checkpoint step (None: the newest that restores). `purpose` names the job
  in the message for a run that has saved no checkpoint yet.
  """
  if source.kind == RUN:
    return _load_run(source, target, step, purpose)
  return _load_hf(source, target)


def load_run(workdir: str, step: int | None = None) -> tuple[ModelConfig, Any, int]:
  """Model config and numpy params of an mbert-jax run's checkpoint (the newest good one by
  default); a fine-tuning run gives its classifier's or span extractor's params."""
  model = load(locate(workdir, setting="workdir", runs_only=True), step=step)
  return model.source.model_config, model.params, model.step


def load_flax(path: str) -> tuple[ModelConfig | ModernConfig, Any]:
  """Reads a `--format=flax` export: (its model config, params as a nested dict of numpy)."""
  from safetensors.numpy import load_file
  with open(os.path.join(path, export_files.MODEL_CONFIG_FILE)) as f:
    cfg = config_from_dict(json.load(f))
  flat = load_file(os.path.join(path, export_files.FLAX_PARAMS_FILE))
  return cfg, traverse_util.unflatten_dict(flat, sep="/")


__all__ = ["HF", "RUN", "SENTENCE_TRANSFORMERS", "LoadedModel", "ModelSource", "load",
           "load_flax", "load_run", "locate", "looks_like_hub_name"]
