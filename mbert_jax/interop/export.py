"""Export a run's checkpoint for other tools: pretraining, distillation and fine-tuning runs.

    python -m mbert_jax.export --workdir=<run dir> --format=hf --out=<dir> [--step=N]
    python -m mbert_jax.export --workdir=<run dir> --format=flax --out=<dir>
    python -m mbert_jax.export --workdir=<run dir> --format=onnx [--quantize=int8] --out=<dir>
    python -m mbert_jax.export --workdir=<run dir> --format=onnx --quantize=int8_static \
        [--calibration=<text lines or dev TSV>] --out=<dir>

The kind of model follows the run: a pretraining or distillation run exports the MLM + NSP
model (the MLM model alone, `MobileBertForMaskedLM`, when it trained without NSP:
data.next_sentence=False), a GLUE fine-tuning run (task.json kind=glue) the sequence classifier (1 output for
STS-B: regression), a SQuAD run the span extractor.

`hf`: a Hugging Face directory (config.json, model.safetensors, tokenizer files) that
`transformers` loads as `MobileBertForPreTraining` / `MobileBertForSequenceClassification` /
`MobileBertForQuestionAnswering`, labels and problem type in config.json. `flax`:
`model_config.json` + `params.safetensors` (flattened '/' keys) + tokenizer files, read back
by `load_flax`. `onnx`: `model.onnx` (dynamic batch and sequence axes; int8 with
`--quantize=int8`, the fastest variant measured; `int8_dynamic`, plain dynamic quantization;
`int8_static`, calibrated static quantization, see `mbert_jax.interop.quantize`),
`onnx_io.json` (input/output names and shapes, the quantization used) and tokenizer files (see
`mbert_jax.interop.onnx_export`). `int8_static` calibrates on the fine-tuning run's dev set, or
on `--calibration`: a file of text lines (pairs and question<TAB>context tab-separated, as
`predict --file` reads) or, for a GLUE run, a TSV/JSONL file of the task's layout. A model Hugging Face cannot represent (the IB-BERT teacher) is
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
from typing import Any

import numpy as np
from flax import traverse_util

from mbert_jax import cli
from mbert_jax.data.tokenizer import FINETUNE_SPECIAL_TOKENS, export_tokenizer, load_tokenizer
from mbert_jax.finetune import glue, squad
from mbert_jax.finetune.glue import get_task
from mbert_jax.interop import hf_export, model_source, onnx_export, predict
from mbert_jax.interop import quantize as quantize_lib
from mbert_jax.interop.export_files import (CARD_FILE, FLAX_PARAMS_FILE, IO_FILE, MODEL_CONFIG_FILE,
                                            TASK_FILE)
# load_flax reads what save_flax writes; callers know it as export.load_flax.
from mbert_jax.interop.model_source import LoadedModel, load_flax
from mbert_jax.models import PRESETS, ModelConfig, to_hf_config
from mbert_jax.training.workdir import CONFIG_FILE, is_mbert_workdir, read_json, read_report

FORMATS = ("hf", "flax", "onnx")
QUANTIZATIONS = quantize_lib.QUANTIZATIONS
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


def _copy_tokenizer(tokenizer_dir: str | None, out: str) -> None:
  if tokenizer_dir:
    export_tokenizer(tokenizer_dir, out)


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


def export_head(source: model_source.ModelSource) -> str:
  """The head an export carries: a run's own, except that a pretraining run trained without
  NSP (data.next_sentence=False) leaves as a masked-LM model (`ModelSource.nsp_trained`)."""
  if source.head == "pretraining" and not source.nsp_trained:
    return "masked_lm"
  return source.head


def _head_line(head: str, task_info: dict | None) -> str:
  if head == "pretraining":
    return "masked-language-model and next-sentence heads (pretraining)"
  if head == "masked_lm":
    return ("masked-language-model head; trained without next-sentence prediction "
            "(data.next_sentence=False), so the NSP head never learned: hf and onnx leave it "
            "and the pooler out, flax keeps their untrained parameters so the model builds")
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
            f"model = transformers.{architecture}.from_pretrained('<this directory>')",
            "tokenizer = transformers.AutoTokenizer.from_pretrained('<this directory>')", "```"]
  if head in ("pretraining", "masked_lm"):
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
              "onnx": f"ONNX model ({quantize_lib.DESCRIPTIONS[quantize]}, "
                      f"`--quantize={quantize}`)"}[fmt]
  lines = [f"# MobileBERT family model: {title}", "",
           f"Exported by `python -m mbert_jax.export`; format: {fmt_line}.", "",
           "## Model", "", *_architecture_lines(cfg),
           f"- head: {_head_line(export_head(source), task_info)}",
           f"- parameters: {params:,} in this export ({backbone:,} in embeddings and encoder)",
           f"- files: {', '.join(sorted(files))}", ""]
  if onnx_info:
    check = ", ".join(f"{k} {v:.1e}" for k, v in onnx_info["fp32_vs_pytorch_max_relative_error"]
                      .items())
    lines += ["## ONNX", "", f"- opset {onnx_info['opset']}, inputs "
              f"{', '.join(i['name'] for i in onnx_info['inputs'])} (int64, [batch, sequence]), "
              f"outputs {', '.join(o['name'] for o in onnx_info['outputs'])}",
              f"- fp32 graph vs the PyTorch model on a padded batch, max error relative to "
              f"each output's largest magnitude: {check}"]
    details = onnx_info.get("quantization_details") or {}
    if quantize != "none":
      q_check = ", ".join(f"{k} {v:.1e}" for k, v in
                          details.get("vs_fp32_max_relative_error", {}).items())
      lines.append(f"- quantization: `{quantize}`, {details.get('method')}"
                   + (f"; NoNorm folded into {sum(details['nonorm_folded'].values())} dense "
                      "layers" if details.get("nonorm_folded") else "")
                   + (f"; calibrated on {details['calibration_rows']} examples"
                      if details.get("calibration_rows") else "")
                   + (f"; vs the fp32 graph on that batch: {q_check}" if q_check else ""))
    lines.append("")
  lines += ["## Training", "", *_provenance_lines(model), "",
            "## Evaluation", "", *_evaluation_lines(source.report), ""]
  if quantize != "none":
    lines += [f"The {quantize} model's own figures are not measured at export; quantization "
              "changes logits slightly.", ""]
  lines += ["## Use", "", *_usage_lines(fmt, export_head(source)), ""]
  return "\n".join(lines)


# ---------------------------------------------------------------------------- export
def check_request(fmt: str, quantize: str, calibration: str | None = None) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}")
  quantize_lib.check(quantize, calibration or None)
  if quantize != "none" and fmt != "onnx":
    raise ValueError(f"--quantize={quantize} applies to --format=onnx only")
  if calibration and not os.path.isfile(calibration):
    raise FileNotFoundError(f"--calibration={calibration}: no such file")


def _calibration_texts(source, task_info: dict | None, path: str | None
                       ) -> tuple[list[str], list[str] | None]:
  """(first texts, second texts or None) to calibrate on: `path`, else the run's dev set."""
  kind = (source.task or {}).get("kind")
  pair = task_info is not None and predict.needs_pair(task_info)
  if path and kind == "glue" and path.endswith((".tsv", ".csv", ".json", ".jsonl")):
    spec = get_task(task_info["task"])
    rows = _glue_rows(spec, path)
    return ([r[spec.text_fields[0]] for r in rows],
            [r[spec.text_fields[1]] for r in rows] if pair else None)
  if path:
    with open(path, encoding="utf-8") as f:
      examples = predict.parse_lines(f.readlines(), pair, f"--calibration={path}")
    return [e.text for e in examples], [e.pair for e in examples] if pair else None
  data = _get(source.run_config, "task", "data")
  if kind is None:
    raise ValueError("--quantize=int8_static: a pretraining run has no dev set to calibrate on; "
                     "give --calibration=<file of text lines>")
  if not data or not os.path.isdir(str(data)):
    raise ValueError(f"--quantize=int8_static: the run read its data from {data or 'the hub'}, "
                     "not a local directory; give --calibration=<file of text lines or a dev "
                     "TSV>")
  if kind == "squad":
    ds = squad.load_squad(data, version=source.task.get("squad_version") or "1.1",
                          split="validation")
    return list(ds["question"]), list(ds["context"])
  spec = get_task(task_info["task"])
  rows = _glue_rows(spec, data, spec.eval_splits[0])
  return ([r[spec.text_fields[0]] for r in rows],
          [r[spec.text_fields[1]] for r in rows] if pair else None)


def _glue_rows(spec, path: str, split: str = "validation") -> list[dict]:
  ds = glue.load_glue(spec, path, split)
  n = min(len(ds), quantize_lib.CALIBRATION_ROWS)
  return [ds[i] for i in range(n)]


def calibration_data(source, task_info: dict | None, path: str | None,
                     max_seq_length: int) -> list[dict[str, np.ndarray]]:
  """Encoded calibration batches for `--quantize=int8_static`, tokenized as the run's inputs
  (question answering: question and context truncated to one window, which spans the ranges
  the sliding windows see)."""
  if not source.tokenizer_dir:
    raise ValueError("--quantize=int8_static needs the run's tokenizer to encode calibration "
                     "text, and the run has no tokenizer/; export with --quantize=int8")
  texts, pairs = _calibration_texts(source, task_info, path)
  texts = texts[:quantize_lib.CALIBRATION_ROWS]
  pairs = pairs[:quantize_lib.CALIBRATION_ROWS] if pairs is not None else None
  lower = bool((task_info or {}).get("lower_case", True))
  tokenizer = load_tokenizer(source.tokenizer_dir, lower_case=lower,
                             require=FINETUNE_SPECIAL_TOKENS, setting="--workdir")
  return quantize_lib.calibration_batches(glue.encode_pairs(tokenizer, texts, pairs,
                                                            max_seq_length))


def export(workdir: str, fmt: str, out: str, step: int | None = None,
           quantize: str = "none", calibration: str | None = None) -> dict[str, Any]:
  check_request(fmt, quantize, calibration)
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
  cfg, head, params = source.model_config, export_head(source), model.params
  if fmt in ("hf", "onnx"):
    cfg = cfg.replace(compute_dtype="float32")
  task_info = export_task_info(model)
  label_names = (task_info or {}).get("label_names") or None
  onnx_info = None
  if fmt == "hf":
    if head in ("pretraining", "masked_lm"):
      hf_export.save(cfg, params, out, tokenizer_dir=source.tokenizer_dir,
                     nsp=head == "pretraining")
    else:
      hf_export.save_task(cfg, params, out, head=head, label_names=label_names,
                          tokenizer_dir=source.tokenizer_dir)
  elif fmt == "flax":
    save_flax(cfg, params, out, tokenizer_dir=source.tokenizer_dir)
  else:
    feeds = None
    if quantize in quantize_lib.NEEDS_CALIBRATION:
      length = int((task_info or {}).get("max_seq_length") or
                   min(128, cfg.max_position_embeddings))
      feeds = calibration_data(source, task_info, calibration, length)
    onnx_info = onnx_export.export(cfg, params, head, out, quantize=quantize,
                                   label_names=label_names, calibration=feeds)
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
  flags.DEFINE_string("quantize", "none", "onnx only: none | int8 (fastest measured: NoNorm "
                      "folded + dynamic int8) | int8_dynamic (plain dynamic int8) | "
                      "int8_static (calibrated static QDQ int8)")
  flags.DEFINE_string("calibration", None, "int8_static: a file of text lines (tab-separated "
                      "pairs) or a GLUE dev TSV/JSONL to calibrate on (default: the run's dev "
                      "set)")
  flags.DEFINE_string("out", None, "output directory")
  flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
  flags.mark_flags_as_required(["workdir", "out"])
  FLAGS = flags.FLAGS

  def run(_):
    info = cli.guarded(export, FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.step,
                       FLAGS.quantize, FLAGS.calibration)
    print(json.dumps(info))

  app.run(run, argv)


if __name__ == "__main__":
  main()
