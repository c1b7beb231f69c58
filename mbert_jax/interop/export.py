"""Export a run's checkpoint for other tools: pretraining, distillation and fine-tuning runs.

    python -m mbert_jax.export --workdir=<run dir> --format=hf --out=<dir> [--step=N]
    python -m mbert_jax.export --workdir=<run dir> --format=flax --out=<dir>
    python -m mbert_jax.export --workdir=<run dir> --format=onnx [--quantize=int8] --out=<dir>

The kind of model follows the run: a pretraining or distillation run exports the MLM + NSP
model, a GLUE fine-tuning run (task.json kind=glue) the sequence classifier (1 output for
STS-B: regression), a SQuAD run the span extractor.

`hf`: a Hugging Face directory (config.json, model.safetensors, tokenizer files) that
`transformers` loads as `MobileBertForPreTraining` / `MobileBertForSequenceClassification` /
`MobileBertForQuestionAnswering`, labels and problem type in config.json. `flax`:
`model_config.json` + `params.safetensors` (flattened '/' keys) + tokenizer files, read back
by `load_flax`. `onnx`: `model.onnx` (dynamic batch and sequence axes; int8 with
`--quantize=int8`), `onnx_io.json` (input/output names and shapes) and tokenizer files (see
`mbert_jax.interop.onnx_export`). A model Hugging Face cannot represent (the IB-BERT teacher) is
refused for hf and onnx with the reason.

Every export also writes README.md (a model card: architecture, parameter count, the run it
came from, its evaluation figures) and, for fine-tuned models, task.json (labels, sequence
length and decoding settings), which `python -m mbert_jax.predict` reads.

The run is read by `model_source`, the one loader of runs and Hugging Face directories; the
names of an export's files are in `export_files`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import numpy as np
from flax import traverse_util

from mbert_jax import cli
from mbert_jax.data.tokenizer import TOKENIZER_FILES
from mbert_jax.finetune.glue import get_task
from mbert_jax.interop import hf_export, model_source, onnx_export
from mbert_jax.interop.export_files import (CARD_FILE, FLAX_PARAMS_FILE, IO_FILE, MODEL_CONFIG_FILE,
                                            TASK_FILE)
from mbert_jax.interop.model_source import LoadedModel
from mbert_jax.models import PRESETS, ModelConfig, to_hf_config
from mbert_jax.training.workdir import CONFIG_FILE, is_mbert_workdir, read_json, read_report

FORMATS = ("hf", "flax", "onnx")
QUANTIZATIONS = ("none", "int8")
# SQuAD decoding settings a fine-tuning config may leave out (the trainer's defaults).
_SQUAD_DECODING = {"doc_stride": 128, "max_query_length": 64, "max_answer_length": 30,
                   "n_best_size": 20, "null_score_diff_threshold": 0.0}


# ---------------------------------------------------------------------------- flax format
def save_flax(cfg: ModelConfig, params: Any, out: str, tokenizer_dir: str | None = None) -> None:
  from safetensors.numpy import save_file
  os.makedirs(out, exist_ok=True)
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in
          traverse_util.flatten_dict(params, sep="/").items()}
  save_file(flat, os.path.join(out, FLAX_PARAMS_FILE))
  with open(os.path.join(out, MODEL_CONFIG_FILE), "w") as f:
    json.dump(cfg.to_dict(), f, indent=1)
  _copy_tokenizer(tokenizer_dir, out)


def load_flax(path: str) -> tuple[ModelConfig, Any]:
  """Reads a `--format=flax` export: (ModelConfig, params as a nested dict of numpy arrays)."""
  from safetensors.numpy import load_file
  with open(os.path.join(path, MODEL_CONFIG_FILE)) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  flat = load_file(os.path.join(path, FLAX_PARAMS_FILE))
  return cfg, traverse_util.unflatten_dict(flat, sep="/")


def _copy_tokenizer(tokenizer_dir: str | None, out: str) -> None:
  if not tokenizer_dir:
    return
  for name in TOKENIZER_FILES:
    src = os.path.join(tokenizer_dir, name)
    if os.path.exists(src):
      shutil.copy(src, os.path.join(out, name))


# ---------------------------------------------------------------------------- task metadata
def export_task_info(model: LoadedModel) -> dict[str, Any] | None:
  """task.json of an export: the fine-tuning task plus what inference needs to reproduce the
  run's input encoding (sequence length, casing) and SQuAD decoding."""
  source = model.source
  if source.task is None:
    return None
  t, c = source.task, source.run_config
  out = {"head": source.head, "kind": t["kind"], "task": t["task"],
         "num_labels": int(t["num_labels"]), "label_names": list(t.get("label_names") or []),
         "max_seq_length": int(t["max_seq_length"]),
         "lower_case": bool(c.get("data", {}).get("lower_case", True))}
  if t["kind"] == "glue":
    out["text_fields"] = list(get_task(t["task"]).text_fields)
  else:
    finetune = c.get("finetune", {})
    out["squad_version"] = t.get("squad_version")
    out.update({k: type(v)(finetune.get(k, v)) for k, v in _SQUAD_DECODING.items()})
  return out


# ---------------------------------------------------------------------------- model card
def _count(tree: Any) -> int:
  return sum(int(np.prod(np.shape(v))) for v in traverse_util.flatten_dict(tree).values())


def _architecture_name(cfg: ModelConfig) -> str:
  if not cfg.use_bottleneck:
    family = "BERT-style encoder (no bottlenecks)"
  elif not cfg.hf_representable:
    family = "IB-BERT teacher (inverted bottlenecks)"
  else:
    family = "MobileBERT student (bottlenecks)"
  # Presets match on the architecture, not on vocabulary, length or dropout.
  fields = [f for f in ModelConfig.HF_FIELDS if f not in (
      "vocab_size", "max_position_embeddings", "hidden_dropout_prob",
      "attention_probs_dropout_prob", "initializer_range", "pad_token_id")]
  for name, p in PRESETS.items():
    if all(getattr(p, f) == getattr(cfg, f) for f in fields):
      return f"{family}, preset `{name}`"
  return family


def _architecture_lines(cfg: ModelConfig) -> list[str]:
  return [
      f"- {_architecture_name(cfg)}",
      f"- {cfg.num_hidden_layers} layers, block width {cfg.hidden_size}, inner width "
      f"{cfg.true_hidden_size}, {cfg.num_attention_heads} heads, "
      f"{cfg.num_feedforward_networks} FFN(s) of {cfg.intermediate_size}, embedding "
      f"{cfg.embedding_size}{' (trigram)' if cfg.trigram_input else ''}",
      f"- normalization `{cfg.normalization_type}`, activation `{cfg.hidden_act}`, vocabulary "
      f"{cfg.vocab_size}, positions {cfg.max_position_embeddings}",
  ]


def _head_line(head: str, task_info: dict | None) -> str:
  if head == "pretraining":
    return "masked-language-model and next-sentence heads (pretraining)"
  if head == "question_answering":
    return f"span extraction (start/end logits), SQuAD v{task_info.get('squad_version')}"
  names = task_info.get("label_names") or []
  if task_info["num_labels"] == 1:
    return f"regression (1 output) on {task_info['task']}"
  return (f"sequence classification on {task_info['task']}, {task_info['num_labels']} labels"
          + (f" ({', '.join(names)})" if names else ""))


def _get(d: Any, *path: str) -> Any:
  for key in path:
    if not isinstance(d, dict) or key not in d:
      return None
    d = d[key]
  return d


def _pretraining_lines(config: dict, report: dict | None, step: int | None) -> list[str]:
  """Schedule, teacher and steps of a pretraining or distillation run, as far as recorded."""
  lines = []
  schedule = _get(config, "schedule", "name")
  if schedule:
    detail = []
    for key in ("steps_per_layer", "distill_steps"):
      value = _get(config, "schedule", key)
      if value is not None:
        detail.append(f"{key} {value}")
    lines.append(f"- schedule `{schedule}`" + (f" ({', '.join(detail)})" if detail else ""))
  teacher = _get(config, "teacher", "checkpoint")
  lines.append(f"- teacher: {teacher}" if teacher else "- teacher: none (trained on labels alone)")
  steps = (report or {}).get("step", step)
  if steps is not None:
    lines.append(f"- steps: {steps}")
  source = _get(config, "data", "source")
  if source:
    lines.append(f"- data: {source}, batch {_get(config, 'data', 'batch_size')}, sequence "
                 f"{_get(config, 'data', 'max_seq_length')}")
  return lines


def _provenance_lines(model: LoadedModel) -> list[str]:
  source, step = model.source, model.step
  if source.task is None:
    return [f"- run: `{source.path}`, checkpoint step {step}",
            *_pretraining_lines(source.run_config, source.report, step)]
  train = source.run_config.get("train", {})
  lines = [f"- run: `{source.path}`, fine-tuned on {source.task['task']} for {step} steps "
           f"(batch {_get(source.run_config, 'data', 'batch_size')}, learning rate "
           f"{train.get('learning_rate')}, sequence {source.task.get('max_seq_length')})"]
  init = source.task.get("init")
  lines.append(f"- initial model: {init or 'random initialisation'}")
  if init and is_mbert_workdir(init):
    # The pretraining run behind the fine-tuned model, when it is still on this disk.
    config_file = os.path.join(init, CONFIG_FILE)
    config = read_json(config_file) if os.path.isfile(config_file) else {}
    report = read_report(init)
    lines += ["  " + line for line in _pretraining_lines(config, report, None)]
  return lines


def _evaluation_lines(report: dict | None) -> list[str]:
  figures = {k: v for k, v in ((report or {}).get("eval") or {}).items()
             if isinstance(v, (int, float)) and math.isfinite(v)}
  if not figures:
    return ["No evaluation figures were recorded (the run has no final.json, or it evaluated "
            "nothing)."]
  rows = ["| metric | value |", "|---|---:|"]
  rows += [f"| {k} | {v:.4f} |" for k, v in sorted(figures.items())]
  return ["Measured by mbert-jax on the Flax model (fp32) at the end of the run:", "", *rows]


def _usage_lines(fmt: str, head: str) -> list[str]:
  if fmt == "hf":
    architecture = hf_export.ARCHITECTURES[head]
    return ["```python", "import transformers",
            f"model = transformers.{architecture}.from_pretrained('<this directory>')", "```"]
  if head == "pretraining":
    return ["`mbert_jax.interop.export.load_flax` reads a flax export; an onnx export runs in ONNX "
            f"Runtime with the inputs in `{IO_FILE}`."]
  return ["```bash", "python -m mbert_jax.predict --model=<this directory> --text='...'", "```"]


def model_card(model: LoadedModel, fmt: str, quantize: str, files: list[str],
               onnx_info: dict | None = None) -> str:
  source = model.source
  task_info = export_task_info(model)
  title = source.task["task"] if source.task else "pretraining"
  cfg = source.model_config
  params = _count(model.params)
  backbone = sum(_count(v) for k, v in model.params.items() if k in ("embeddings", "encoder"))
  fmt_line = {"hf": "Hugging Face `transformers` directory", "flax": "plain Flax parameters",
              "onnx": "ONNX model" + (" (int8, dynamic quantization)" if quantize == "int8"
                                      else " (fp32)")}[fmt]
  lines = [f"# MobileBERT family model: {title}", "",
           f"Exported by `python -m mbert_jax.export`; format: {fmt_line}.", "",
           "## Model", "", *_architecture_lines(cfg),
           f"- head: {_head_line(source.head, task_info)}",
           f"- parameters: {params:,} in this export ({backbone:,} in embeddings and encoder)",
           f"- files: {', '.join(sorted(files))}", ""]
  if onnx_info:
    check = ", ".join(f"{k} {v:.1e}" for k, v in onnx_info["fp32_vs_pytorch_max_relative_error"]
                      .items())
    lines += ["## ONNX", "", f"- opset {onnx_info['opset']}, inputs "
              f"{', '.join(i['name'] for i in onnx_info['inputs'])} (int64, [batch, sequence]), "
              f"outputs {', '.join(o['name'] for o in onnx_info['outputs'])}",
              f"- fp32 graph vs the PyTorch model on a padded batch, max error relative to "
              f"each output's largest magnitude: {check}", ""]
  lines += ["## Training", "", *_provenance_lines(model), "",
            "## Evaluation", "", *_evaluation_lines(source.report), ""]
  if quantize == "int8":
    lines += ["The int8 model's own figures are not measured at export; dynamic quantization "
              "changes logits slightly.", ""]
  lines += ["## Use", "", *_usage_lines(fmt, source.head), ""]
  return "\n".join(lines)


# ---------------------------------------------------------------------------- export
def check_request(fmt: str, quantize: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}")
  if quantize not in QUANTIZATIONS:
    raise ValueError(f"--quantize={quantize!r}: choose one of {', '.join(QUANTIZATIONS)}")
  if quantize != "none" and fmt != "onnx":
    raise ValueError(f"--quantize={quantize} applies to --format=onnx only")


def export(workdir: str, fmt: str, out: str, step: int | None = None,
           quantize: str = "none") -> dict[str, Any]:
  check_request(fmt, quantize)
  if not out:
    raise ValueError("--out is empty: name the directory to write")
  if fmt == "onnx":
    onnx_export.require_onnx_tools()
  source = model_source.locate(workdir, setting="--workdir", runs_only=True)
  if fmt in ("hf", "onnx"):
    try:
      to_hf_config(source.model_config)  # refuse the teacher before reading or writing
    except ValueError as e:
      route = "ONNX export goes through the Hugging Face model, and " if fmt == "onnx" else ""
      raise ValueError(route + str(e)) from e
  model = model_source.load(source, step=step, purpose="export")
  cfg, head, params = source.model_config, source.head, model.params
  if fmt in ("hf", "onnx"):
    cfg = cfg.replace(compute_dtype="float32")
  task_info = export_task_info(model)
  label_names = (task_info or {}).get("label_names") or None
  onnx_info = None
  if fmt == "hf":
    if head == "pretraining":
      hf_export.save(cfg, params, out, tokenizer_dir=source.tokenizer_dir)
    else:
      hf_export.save_task(cfg, params, out, head=head, label_names=label_names,
                          tokenizer_dir=source.tokenizer_dir)
  elif fmt == "flax":
    save_flax(cfg, params, out, tokenizer_dir=source.tokenizer_dir)
  else:
    onnx_info = onnx_export.export(cfg, params, head, out, quantize=quantize,
                                   label_names=label_names)
    with open(os.path.join(out, MODEL_CONFIG_FILE), "w") as f:
      json.dump(cfg.to_dict(), f, indent=1)
    _copy_tokenizer(source.tokenizer_dir, out)
  if task_info is not None:
    with open(os.path.join(out, TASK_FILE), "w") as f:
      json.dump(task_info, f, indent=1)
  files = sorted(os.listdir(out)) + [CARD_FILE]
  with open(os.path.join(out, CARD_FILE), "w") as f:
    f.write(model_card(model, fmt, quantize, sorted(set(files)), onnx_info))
  return {"workdir": workdir, "step": model.step, "format": fmt, "head": head,
          "quantize": quantize, "out": os.path.abspath(out)}


def main(argv=None):
  from absl import app, flags

  # Plain strings, not enums: a wrong value gets the one-line error and exit 2 of every command.
  flags.DEFINE_string("workdir", None, "an mbert-jax run directory (pretraining or fine-tuning)")
  flags.DEFINE_string("format", "hf", "hf: Hugging Face directory; flax: params + config; "
                      "onnx: one .onnx file + io names")
  flags.DEFINE_string("quantize", "none", "none | int8 (onnx only: dynamic int8 quantization)")
  flags.DEFINE_string("out", None, "output directory")
  flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
  flags.mark_flags_as_required(["workdir", "out"])
  FLAGS = flags.FLAGS

  def run(_):
    info = cli.guarded(export, FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.step,
                       FLAGS.quantize)
    print(json.dumps(info))

  app.run(run, argv)


if __name__ == "__main__":
  main()
