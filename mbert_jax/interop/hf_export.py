"""Hugging Face export: MobileBERT students as directories that `transformers` loads.

    save(cfg, params, "out_dir", tokenizer_dir=...)  # loads in MobileBertForPreTraining
    save_task(cfg, params, "out_dir", head="classification", label_names=[...])
                    # fine-tuned: MobileBertForSequenceClassification / ...ForQuestionAnswering

Which tensor goes where is the table of `hf_names`, shared with the import, so a round trip
reproduces every tensor bit for bit. The IB-BERT teacher has no Hugging Face form and is
refused with the reason.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from mbert_jax.data.tokenizer import TOKENIZER_FILES, export_tokenizer
from mbert_jax.interop.hf_names import (CONFIG_NAME, SAFETENSORS_NAME, entries, is_head,
                                        placeholders)
from mbert_jax.models import modern_config
from mbert_jax.models.config import ModelConfig, to_hf_config
from mbert_jax.models.modern_config import ModernConfig
from mbert_jax.models.summary import param_shapes

# What each exported head becomes in transformers.
# "masked_lm": a student trained without NSP (data.next_sentence=False), its never-trained NSP
# head and the pooler only that head reads left out.
ARCHITECTURES = {"pretraining": "MobileBertForPreTraining", "masked_lm": "MobileBertForMaskedLM",
                 "classification": "MobileBertForSequenceClassification",
                 "question_answering": "MobileBertForQuestionAnswering"}
# Our fine-tuning heads are one Dense each, named as Hugging Face names the Linear.
_TASK_HEADS = {"classification": "classifier", "question_answering": "qa_outputs"}


def _flat_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(nn.unbox(dict(params)), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def _check_shapes(flat: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> None:
  problems = [f"  {p}: missing (expected {s})" for p, s in shapes.items() if p not in flat]
  problems += [f"  {p}: expected shape {s}, found {tuple(flat[p].shape)}"
               for p, s in shapes.items() if p in flat and tuple(flat[p].shape) != tuple(s)]
  problems += [f"  {p}: not a parameter of this config" for p in flat if p not in shapes]
  if problems:
    raise ValueError("parameters do not match the model config:\n" + "\n".join(problems))


def _table_state_dict(cfg: ModelConfig, flat: Mapping[str, np.ndarray],
                      parts: tuple[str, ...]) -> dict[str, np.ndarray]:
  """HF tensors of the table `entries` in `parts` (plus the placeholders HF builds for them)."""
  def hf_name(key: str) -> str:
    return key if is_head(key) else "mobilebert." + key

  sd: dict[str, np.ndarray] = {}
  for entry in entries(cfg):
    if entry.part not in parts:
      continue
    arr = flat[entry.ours].astype(np.float32)
    if entry.layered:
      for i in range(cfg.num_hidden_layers):
        t = arr[i].T if entry.transpose else arr[i]
        sd[hf_name(entry.hf.format(i=i))] = np.ascontiguousarray(t)
    else:
      sd[hf_name(entry.hf)] = np.ascontiguousarray(arr.T if entry.transpose else arr)
  for key, value in placeholders(cfg).items():
    if "heads" in parts or not is_head(key):
      sd[hf_name(key)] = value
  return sd


def to_state_dict(model_config: ModelConfig, params: Mapping[str, Any], nsp: bool = True
                  ) -> dict[str, np.ndarray]:
  """The `MobileBertForPreTraining` state dict of a parameter tree (float32 numpy, HF names);
  nsp=False: `MobileBertForMaskedLM`'s (no NSP head, no pooler)."""
  cfg = model_config.validate()
  to_hf_config(cfg)  # raises for the IB-BERT teacher before any work
  flat = _flat_params(params)
  _check_shapes(flat, param_shapes(cfg))
  sd = _table_state_dict(cfg, flat, ("backbone", "pooler", "heads"))
  if not nsp:
    sd = {k: v for k, v in sd.items()
          if not k.startswith(("cls.seq_relationship.", "mobilebert.pooler."))}
  return sd


def _task_layout(cfg: ModelConfig, head: str, flat: Mapping[str, np.ndarray]
                 ) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...], int]:
  """(expected shapes, table parts, outputs) of a fine-tuning tree for `head`."""
  name = _TASK_HEADS[head]
  kernel = flat.get(f"{name}/kernel")
  if kernel is None or kernel.ndim != 2:
    raise ValueError(f"no {name}/kernel in the parameters: not a {head} model")
  outputs = int(kernel.shape[1])
  if head == "question_answering" and outputs != 2:
    raise ValueError(f"qa_outputs/kernel has {outputs} outputs; a span extractor has 2 "
                     "(start, end)")
  # Hugging Face's QA model has no pooler, and our span extractor never reads its own.
  parts = ("backbone", "pooler") if head == "classification" else ("backbone",)
  shapes = {p: s for p, s in param_shapes(cfg).items()
            if p.startswith(("embeddings/", "encoder/")) or ("pooler" in parts
                                                              and p.startswith("pooler/"))}
  shapes[f"{name}/kernel"] = (cfg.hidden_size, outputs)
  shapes[f"{name}/bias"] = (outputs,)
  return shapes, parts, outputs


def task_state_dict(model_config: ModelConfig, params: Mapping[str, Any], head: str
                    ) -> dict[str, np.ndarray]:
  """The state dict of `MobileBertForSequenceClassification` (head="classification") or
  `MobileBertForQuestionAnswering` (head="question_answering") for the params of
  `build_classifier` / `build_span_extractor`."""
  if head not in _TASK_HEADS:
    raise ValueError(f"head {head!r}: choose one of {sorted(_TASK_HEADS)}")
  cfg = model_config.validate()
  to_hf_config(cfg)
  flat = _flat_params(params)
  shapes, parts, _ = _task_layout(cfg, head, flat)
  if "pooler" not in parts:
    flat = {k: v for k, v in flat.items() if not k.startswith("pooler/")}
  _check_shapes(flat, shapes)
  sd = _table_state_dict(cfg, flat, parts)
  name = _TASK_HEADS[head]
  sd[f"{name}.weight"] = np.ascontiguousarray(flat[f"{name}/kernel"].astype(np.float32).T)
  sd[f"{name}.bias"] = flat[f"{name}/bias"].astype(np.float32)
  return sd


def task_hf_config(model_config: ModelConfig, head: str, num_labels: int,
                   label_names: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
  """config.json of a task model: architecture, labels and (classification) problem type."""
  d = to_hf_config(model_config.validate())
  d["architectures"] = [ARCHITECTURES[head]]
  if head == "question_answering":
    return {**d, "num_labels": 2, "id2label": {"0": "start", "1": "end"},
            "label2id": {"start": 0, "end": 1}}
  names = list(label_names or ())
  if names and len(names) != num_labels:
    raise ValueError(f"{len(names)} label names {names} for a classifier with {num_labels} "
                     "outputs")
  if not names:
    names = ["score"] if num_labels == 1 else [f"LABEL_{i}" for i in range(num_labels)]
  return {**d, "num_labels": num_labels,
          "id2label": {str(i): n for i, n in enumerate(names)},
          "label2id": {n: i for i, n in enumerate(names)},
          # transformers would infer these from the label dtype at training time; state them so
          # a user fine-tuning further gets MSE for STS-B and cross-entropy elsewhere.
          "problem_type": "regression" if num_labels == 1 else "single_label_classification"}


def _tokenizer_dir(tokenizer_dir: str | os.PathLike | None) -> str | None:
  """`tokenizer_dir` checked before anything is written; None when there is none."""
  if tokenizer_dir is None:
    return None
  tok = Path(tokenizer_dir)
  if not any((tok / f).is_file() for f in TOKENIZER_FILES):
    raise FileNotFoundError(f"tokenizer_dir {tok}: none of {TOKENIZER_FILES} found")
  return str(tok)


def _warn_lossy_semantics(cfg: ModelConfig) -> None:
  if cfg.normalization_type == "layer_norm" and not cfg.hf_layer_norm_eps_quirk:
    warnings.warn(
        "Hugging Face MobileBERT normalises the embeddings and the final FFN output with eps "
        f"1e-5, this model with layer_norm_eps={cfg.layer_norm_eps}: its outputs will differ "
        "slightly after export", stacklevel=3)
  if cfg.attention_mask_value is not None:
    warnings.warn(
        f"attention_mask_value={cfg.attention_mask_value} is not exported; Hugging Face masks "
        "padded keys with the dtype minimum", stacklevel=3)


def _write(path: str | os.PathLike, hf_cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray],
           tokenizer_dir: str | None) -> Path:
  from safetensors.numpy import save_file
  out = Path(path)
  out.mkdir(parents=True, exist_ok=True)
  hf_cfg = {**hf_cfg, "dtype": "float32"}
  (out / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
  save_file(dict(sd), str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
  if tokenizer_dir is not None:
    # A BPE student leaves with a tokenizer.json-based fast tokenizer AutoTokenizer loads.
    export_tokenizer(tokenizer_dir, str(out))
  return out


def save(model_config: ModelConfig, params: Mapping[str, Any], path: str | os.PathLike, *,
         tokenizer_dir: str | os.PathLike | None = None, nsp: bool = True) -> Path:
  """Writes a Hugging Face `MobileBertForPreTraining` directory; returns its path.

  config.json states every architecture field (Hugging Face's defaults are not the released
  model's); model.safetensors holds `mobilebert.*` and `cls.*` tensors with [out, in]
  kernels; the tied `cls.predictions.decoder.*` are left out as `save_pretrained` leaves them
  out. The IB-BERT teacher cannot be represented and raises ValueError. With `tokenizer_dir`,
  its tokenizer files are copied alongside. nsp=False (a student trained without NSP): a
  `MobileBertForMaskedLM` directory, without the head that never learned.
  """
  cfg = model_config.validate()
  hf_cfg = to_hf_config(cfg)
  if not nsp:
    hf_cfg = {**hf_cfg, "architectures": [ARCHITECTURES["masked_lm"]]}
  sd = to_state_dict(cfg, params, nsp)
  tok_dir = _tokenizer_dir(tokenizer_dir)
  _warn_lossy_semantics(cfg)
  return _write(path, hf_cfg, sd, tok_dir)


def save_task(model_config: ModelConfig, params: Mapping[str, Any], path: str | os.PathLike, *,
              head: str, label_names: list[str] | tuple[str, ...] | None = None,
              tokenizer_dir: str | os.PathLike | None = None) -> Path:
  """Writes a fine-tuned model as a Hugging Face directory; returns its path.

  head="classification": the params of `build_classifier` (num_labels read from the head;
  1 = regression) as `MobileBertForSequenceClassification`, with id2label/label2id from
  `label_names` and problem_type. head="question_answering": the params of
  `build_span_extractor` as `MobileBertForQuestionAnswering`. Every check of `save` applies.
  """
  cfg = model_config.validate()
  to_hf_config(cfg)
  sd = task_state_dict(cfg, params, head)
  outputs = int(sd[f"{_TASK_HEADS[head]}.bias"].shape[0])
  hf_cfg = task_hf_config(cfg, head, outputs, label_names)
  tok_dir = _tokenizer_dir(tokenizer_dir)
  _warn_lossy_semantics(cfg)
  return _write(path, hf_cfg, sd, tok_dir)


# ---------------------------------------------------------------------------- ModernBERT, EuroBERT
# Fields of a ModernConfig that config.json does not carry: they change how we run, not what.
_RUN_FIELDS = ("compute_dtype", "scan_layers", "remat", "attention_mask_value")


def modern_state_dict(cfg: ModernConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The `ModernBertForMaskedLM` / `EuroBertForMaskedLM` state dict of a parameter tree: the
  inverse of the import's table (fused projections re-joined, [out, in] kernels)."""
  flat = _flat_params(params)
  _check_shapes(flat, param_shapes(cfg))
  sd: dict[str, np.ndarray] = {}
  for entry in entries(cfg):
    arr = flat[entry.ours].astype(np.float32)
    slices = ([(entry.hf.format(i=i), arr[i]) for i in range(entry.from_layer,
                                                              cfg.num_hidden_layers)]
              if entry.layered else [(entry.hf, arr)])
    for key, t in slices:
      if entry.split:
        t = t.reshape(t.shape[:-2] + (-1,))
      sd[key if is_head(key) else "model." + key] = np.ascontiguousarray(
          t.T if entry.transpose else t)
  return sd


def save_modern(cfg: ModernConfig, params: Mapping[str, Any], path: str | os.PathLike, *,
                tokenizer_dir: str | os.PathLike | None = None) -> Path:
  """Writes a ModernBERT/EuroBERT model as the Hugging Face masked-LM directory that
  `hf_import` (and transformers) read back; ValueError for options config.json cannot carry."""
  cfg = cfg.validate()
  hf_cfg = modern_config.to_hf_config(cfg)
  back = modern_config.from_hf_config(hf_cfg)
  lost = [f for f in cfg.to_dict() if f not in _RUN_FIELDS
          and getattr(back, f) != getattr(cfg, f)]
  if lost:
    raise ValueError(f"a Hugging Face {cfg.family} config.json cannot represent this model's "
                     f"{', '.join(lost)}: keep it as an mbert-jax run (--format=flax)")
  return _write(path, hf_cfg, modern_state_dict(cfg, params), _tokenizer_dir(tokenizer_dir))


__all__ = ["ARCHITECTURES", "modern_state_dict", "save", "save_modern", "save_task", "task_hf_config", "task_state_dict",
           "to_state_dict"]
