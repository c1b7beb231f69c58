"""ONNX export of MobileBERT students (pretraining, classification, question answering), int8.

Route: the parameters go through the Hugging Face export (`mbert_jax.interop.hf_export`, checked
against the Flax model to 1e-5), the `transformers` PyTorch model is traced by `torch.onnx.export`'s
dynamo exporter (onnxscript) into one `.onnx` file with symbolic `batch` and `sequence` axes,
and `mbert_jax.interop.quantize` makes the int8 variants. Why not jax2onnx on the Flax model:
it pins orbax-checkpoint below the version this project trains and checkpoints with, and
needs Python 3.11; the torch route adds no pin and its exporter and ONNX Runtime are kept by
their maintainers. The IB-BERT teacher has no Hugging Face form and is refused with the reason.

Numerics: the graph is fp32 throughout. MobileBERT's feature maps reach 1e7, so an absolute
difference of tens in the hidden states is float32 rounding (the 34 reported in
huggingface/optimum#1027); agreement is judged relative to each tensor's largest magnitude.

Everything here needs the `onnx` extra (torch, transformers, onnx, onnxscript, onnxruntime);
training never imports this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from mbert_jax.interop import hf_export
from mbert_jax.interop import quantize as quantize_lib
from mbert_jax.interop.export_files import IO_FILE, ONNX_FILE
# The graph checks and the int8 quantizer stay importable from here, where callers found them.
from mbert_jax.interop.onnx_graph import INTEGER_MATMULS, float_dense_layers, op_inventory
from mbert_jax.interop.quantize import quantize_int8
from mbert_jax.models import ModelConfig

OPSET = 18
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
# masked_lm: a student trained without NSP, exported without the head that never learned.
HEADS = ("pretraining", "masked_lm", "classification", "question_answering")
OUTPUT_NAMES = {"pretraining": ("mlm_logits", "nsp_logits", "hidden_states"),
                "masked_lm": ("mlm_logits", "hidden_states"),
                "classification": ("logits",),
                "question_answering": ("start_logits", "end_logits")}
QUANTIZATIONS = quantize_lib.QUANTIZATIONS
_EXTRA_HINT = "pip install 'mbert-jax[onnx]' (after a CPU torch, see README)"


def require_onnx_tools() -> None:
  """Raises a ValueError naming the extra when a package of the ONNX route is missing."""
  missing = []
  for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
    try:
      __import__(name)
    except ImportError:
      missing.append(name)
  if missing:
    raise ValueError(f"ONNX export needs {', '.join(missing)}: {_EXTRA_HINT}")


# ---------------------------------------------------------------------------- torch model
def _hf_directory(cfg: ModelConfig, params: Any, head: str, label_names: Sequence[str] | None,
                  out: str) -> str:
  try:
    if head in ("pretraining", "masked_lm"):
      hf_export.save(cfg, params, out, nsp=head == "pretraining")
    else:
      hf_export.save_task(cfg, params, out, head=head, label_names=label_names)
  except ValueError as e:
    if "cannot represent" in str(e):
      raise ValueError(f"ONNX export goes through the Hugging Face model, and {e}") from e
    raise
  return out


def torch_model(cfg: ModelConfig, params: Any, head: str,
                label_names: Sequence[str] | None = None):
  """The `transformers` model of `head` holding `params`, in eval mode, eager attention."""
  import transformers

  with tempfile.TemporaryDirectory() as tmp:
    path = _hf_directory(cfg, params, head, label_names, tmp)
    cls = getattr(transformers, hf_export.ARCHITECTURES[head])
    model = cls.from_pretrained(path, attn_implementation="eager")
  return model.eval()


def _named_outputs(model, head: str):
  """A module returning the head's outputs as a flat tuple, in OUTPUT_NAMES order."""
  import torch

  class Outputs(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):
      kw = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
      if head == "pretraining":
        out = self.model(**kw, output_hidden_states=True)
        # One [layers + 1, batch, sequence, hidden] tensor: the embedding output, then each layer.
        return (out.prediction_logits, out.seq_relationship_logits,
                torch.stack(out.hidden_states))
      if head == "masked_lm":
        out = self.model(**kw, output_hidden_states=True)
        return out.logits, torch.stack(out.hidden_states)
      out = self.model(**kw)
      if head == "classification":
        return (out.logits,)
      return out.start_logits, out.end_logits

  return Outputs().eval()


def example_batch(cfg: ModelConfig, batch: int = 2, seq: int = 12) -> dict[str, np.ndarray]:
  """A padded two-segment batch: traces every branch the mask and the types take."""
  seq = min(seq, cfg.max_position_embeddings)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, cfg.vocab_size, (batch, seq)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[-1, seq // 2:] = 0
  types = np.zeros_like(ids)
  types[:, seq // 3:] = 1
  return {"input_ids": np.where(mask == 1, ids, 0), "token_type_ids": types * mask,
          "attention_mask": mask}


# ---------------------------------------------------------------------------- export
def trace_to_onnx(model, head: str, cfg: ModelConfig, path: str) -> None:
  """Writes the fp32 graph of a `transformers` model to `path` (one file, dynamic axes)."""
  import torch
  wrapper = _named_outputs(model, head)
  example = example_batch(cfg)
  args = tuple(torch.tensor(example[k]) for k in INPUT_NAMES)
  batch = torch.export.Dim("batch")
  sequence = torch.export.Dim("sequence", max=cfg.max_position_embeddings)
  dynamic = {k: {0: batch, 1: sequence} for k in INPUT_NAMES}
  # The exporter reports progress on stdout, which belongs to the command's JSON result.
  with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
    torch.onnx.export(wrapper, args, path, input_names=list(INPUT_NAMES),
                      output_names=list(OUTPUT_NAMES[head]), dynamic_shapes=dynamic,
                      opset_version=OPSET, dynamo=True, external_data=False, optimize=True)


def session(path: str, threads: int | None = None):
  """An ONNX Runtime CPU session (threads: intra-op threads; None = ONNX Runtime's choice)."""
  import onnxruntime as ort
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
  options.log_severity_level = 3  # unused-initializer notes are not the user's business
  return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_session(sess, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  feeds = {k: np.asarray(batch[k], np.int64) for k in INPUT_NAMES}
  names = [o.name for o in sess.get_outputs()]
  return dict(zip(names, sess.run(names, feeds)))


def max_relative_errors(ours: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]
                        ) -> dict[str, float]:
  """max |ours - ref| / max |ref| per output."""
  out = {}
  for k, r in ref.items():
    a, r = np.asarray(ours[k], np.float64), np.asarray(r, np.float64)
    out[k] = float(np.max(np.abs(a - r)) / max(float(np.max(np.abs(r))), 1e-30))
  return out


def _torch_outputs(model, head: str, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  import torch
  with torch.no_grad():
    outs = _named_outputs(model, head)(*(torch.tensor(np.asarray(batch[k], np.int64))
                                         for k in INPUT_NAMES))
  return {n: o.numpy() for n, o in zip(OUTPUT_NAMES[head], outs)}


def _io_spec(path: str) -> dict[str, list[dict[str, Any]]]:
  import onnx
  model = onnx.load(path, load_external_data=False)

  def describe(v):
    t = v.type.tensor_type
    return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

  return {"inputs": [describe(v) for v in model.graph.input],
          "outputs": [describe(v) for v in model.graph.output]}


def export(cfg: ModelConfig, params: Any, head: str, out: str, *, quantize: str = "none",
           label_names: Sequence[str] | None = None,
           calibration: Sequence[Mapping[str, np.ndarray]] | None = None) -> dict[str, Any]:
  """Writes `out/model.onnx` (fp32, or an int8 variant of `quantize_lib.QUANTIZATIONS`) and
  `out/onnx_io.json`.

  calibration: encoded input batches for the static variant (`quantize_lib.calibration_batches`).
  Returns the io description, which also holds the fp32 graph's agreement with the PyTorch
  model on a padded batch, checked here, and for int8 the quantized graph's agreement with the
  fp32 one on that batch, the method and the op inventory of the graph ONNX Runtime runs.
  """
  if head not in HEADS:
    raise ValueError(f"head {head!r}: choose one of {HEADS}")
  quantize_lib.check(quantize, calibration)
  if quantize in quantize_lib.NEEDS_CALIBRATION and not calibration:
    raise ValueError(f"--quantize={quantize} needs calibration data: give "
                     "--calibration=<file of text lines or a dev TSV>")
  require_onnx_tools()
  cfg = cfg.replace(compute_dtype="float32")
  model = torch_model(cfg, params, head, label_names)
  os.makedirs(out, exist_ok=True)
  target = os.path.join(out, ONNX_FILE)
  with tempfile.TemporaryDirectory() as tmp:
    fp32 = os.path.join(tmp, "fp32.onnx") if quantize != "none" else target
    trace_to_onnx(model, head, cfg, fp32)
    batch = example_batch(cfg, batch=3, seq=16)
    fp32_out = run_session(session(fp32), batch)
    check = max_relative_errors(fp32_out, _torch_outputs(model, head, batch))
    details: dict[str, Any] = {"method": quantize_lib.DESCRIPTIONS[quantize]}
    if quantize == "none":
      ops = op_inventory(fp32)
    else:
      ops, details = quantize_lib.quantize_model(
          fp32, target, quantize, list(calibration) if calibration else None)
      details["vs_fp32_max_relative_error"] = max_relative_errors(
          run_session(session(target), batch), fp32_out)
    fp32_bytes = os.path.getsize(fp32)
  info = {"format": "onnx", "file": ONNX_FILE, "head": head, "opset": OPSET,
          "quantization": quantize, "quantization_details": details, **_io_spec(target),
          "max_sequence_length": cfg.max_position_embeddings,
          "fp32_vs_pytorch_max_relative_error": check,
          "bytes": os.path.getsize(target), "fp32_bytes": fp32_bytes,
          "op_inventory": dict(sorted(ops.items()))}
  with open(os.path.join(out, IO_FILE), "w") as f:
    json.dump(info, f, indent=1)
  return info


__all__ = ["ONNX_FILE", "IO_FILE", "INPUT_NAMES", "OUTPUT_NAMES", "HEADS", "QUANTIZATIONS",
           "INTEGER_MATMULS", "export", "torch_model", "trace_to_onnx", "quantize_int8",
           "op_inventory", "float_dense_layers", "session", "run_session",
           "max_relative_errors", "example_batch", "require_onnx_tools"]
