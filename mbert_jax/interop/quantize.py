"""int8 ONNX models of the exported MobileBERT graph, and the graph folding that precedes them.

Variants (`--quantize`):
- `int8_dynamic`: ONNX Runtime's dynamic quantization (weights int8 per tensor, each
  activation's range measured on every call).
- `int8`: MobileBERT's NoNorm (`x * scale + bias`) folded into the dense layers around it, then
  the same dynamic quantization. The choice came from profiles and side-by-side timings on an
  AVX2 CPU (no VNNI): see `benchmarks/inference_latency.py --profile` and the report of issue 22.
- `int8_static`: NoNorm folded, then static QDQ quantization (`quantize_static`, weights int8 per
  output channel, activations uint8 with ranges calibrated on real token ids: the fine-tuning
  run's dev set or a file of text the user names). Kept as a choice for processors where it
  pays; it needs calibration data.

Why fold NoNorm: MobileBERT normalises with an elementwise affine map instead of LayerNorm, and
the exporter writes it as a Mul and an Add after every dense layer: about a fifth of the int8
graph's time on a 1 x 128 batch went to these small elementwise ops, not to the matmuls.
Where a NoNorm follows a dense layer alone (`NoNorm(x W + b)`: the bottleneck projections) it
disappears into `W` and `b`; where a residual comes in between (`NoNorm(x W + b + r)`) the
scale still moves into `W` and the shift into `b`, and `r * scale` plus one Add stay, two
elementwise ops instead of three. The arithmetic is the same up to float32 rounding.
"""

from __future__ import annotations

import collections
import os
import tempfile
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from mbert_jax.interop.onnx_graph import (INTEGER_MATMULS, float_dense_layers, op_inventory,
                                          runtime_op_inventory)

# What each --quantize value makes; "none" is the fp32 graph as traced.
DESCRIPTIONS = {
    "none": "fp32",
    "int8": "int8, dynamic quantization of the NoNorm-folded graph",
    "int8_dynamic": "int8, dynamic quantization",
    "int8_static": "int8, static QDQ quantization calibrated on task text, NoNorm folded",
}
QUANTIZATIONS = tuple(DESCRIPTIONS)
NEEDS_CALIBRATION = ("int8_static",)
# Calibration batches: enough rows for stable activation ranges, few enough to stay quick.
CALIBRATION_ROWS = 256
CALIBRATION_BATCH = 16


# ---------------------------------------------------------------------------- graph access
class _Graph:
  """Producer/consumer maps and constant values of an ONNX graph's top level."""

  def __init__(self, model):
    from onnx import numpy_helper
    self.model, self.graph = model, model.graph
    self.inits = {t.name: t for t in self.graph.initializer}
    self.values = {}
    for n in self.graph.node:
      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
        self.values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    self.producer = {o: n for n in self.graph.node for o in n.output}
    self.consumers: dict[str, list] = collections.defaultdict(list)
    for n in self.graph.node:
      for i in n.input:
        self.consumers[i].append(n)
    self.graph_outputs = {o.name for o in self.graph.output}

  def const(self, name: str) -> np.ndarray | None:
    from onnx import numpy_helper
    if name in self.inits:
      return numpy_helper.to_array(self.inits[name])
    return self.values.get(name)

  def only_use(self, name: str, node) -> bool:
    """`name` feeds `node` and nothing else (not even a graph output)."""
    users = self.consumers.get(name, [])
    return len(users) == 1 and users[0] is node and name not in self.graph_outputs

  def made_by(self, name: str, op_type: str):
    node = self.producer.get(name)
    return node if node is not None and node.op_type == op_type else None


def _dense_add(g: _Graph, name: str):
  """(MatMul node, its weight name, bias-Add node, bias name) when `name` is `x @ W + b` with a
  stored 2-D W and 1-D b, each intermediate used once; else None."""
  add = g.made_by(name, "Add")
  if add is None or len(add.input) != 2:
    return None
  for mm_out, bias in (add.input, add.input[::-1]):
    mm = g.made_by(mm_out, "MatMul")
    b = g.const(bias)
    if mm is None or b is None or b.ndim != 1 or not g.only_use(mm_out, add):
      continue
    w = g.const(mm.input[1])
    if w is not None and w.ndim == 2 and w.shape[1] == b.shape[0]:
      return mm, mm.input[1], add, bias
  return None


def _affine_after(g: _Graph, mul):
  """(scale, shift Add node, shift) when `mul` is the `* scale` of a NoNorm whose `+ shift`
  follows it alone; else None."""
  for x, s in (mul.input, mul.input[::-1]):
    scale = g.const(s)
    if scale is None or scale.ndim != 1:
      continue
    users = g.consumers.get(mul.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or mul.output[0] in g.graph_outputs:
      return None
    shift_add = users[0]
    other = [i for i in shift_add.input if i != mul.output[0]]
    shift = g.const(other[0]) if len(other) == 1 else None
    if shift is None or shift.shape != scale.shape:
      return None
    return x, scale, shift_add, shift
  return None


def fold_nonorm(model) -> tuple[Any, dict[str, int]]:
  """Folds NoNorm into the dense layer before it, in place; returns (model, counts).

  counts: "full" (the NoNorm vanished), "residual" (only `r * scale` stays).
  """
  from onnx import helper, numpy_helper
  g = _Graph(model)
  counts = {"full": 0, "residual": 0}
  drop: set[int] = set()
  new_inits, insert_before = [], {}
  for mul in list(g.graph.node):
    if mul.op_type != "Mul":
      continue
    affine = _affine_after(g, mul)
    if affine is None:
      continue
    x, scale, shift_add, shift = affine
    dense = _dense_add(g, x)
    residual = None
    if dense is None:
      # NoNorm(x W + b + r): the sum of a dense layer and a residual, each used once.
      top = g.made_by(x, "Add")
      if top is None or not g.only_use(x, mul):
        continue
      for d, r in (top.input, top.input[::-1]):
        dense = _dense_add(g, d)
        if dense is not None and g.only_use(d, top):
          residual = (top, d, r)
          break
      if residual is None:
        continue
    elif not g.only_use(x, mul):
      continue
    mm, w_name, bias_add, b_name = dense
    w, b = g.const(w_name), g.const(b_name)
    if w.shape[1] != scale.shape[0]:
      continue
    # New names: a weight shared with another node must keep its value there.
    w_new, b_new = f"{w_name}_{mul.name}", f"{b_name}_{mul.name}"
    new_inits += [numpy_helper.from_array((w * scale[None, :]).astype(w.dtype), w_new),
                  numpy_helper.from_array((b * scale + shift).astype(b.dtype), b_new)]
    mm.input[1] = w_new
    bias_add.input[list(bias_add.input).index(b_name)] = b_new
    out = shift_add.output[0]
    if residual is None:
      bias_add.output[0] = out
      counts["full"] += 1
    else:
      top, d, r = residual
      s_name = f"{mul.output[0]}_scale"
      new_inits.append(numpy_helper.from_array(scale, s_name))
      scaled = f"{r}_times_{s_name}"
      insert_before[id(top)] = helper.make_node("Mul", [r, s_name], [scaled],
                                                name=f"{mul.name}_residual")
      top.input[:] = [d, scaled]
      top.output[0] = out
      counts["residual"] += 1
    drop |= {id(mul), id(shift_add)}
  nodes = []
  for n in g.graph.node:
    if id(n) in insert_before:
      nodes.append(insert_before[id(n)])
    if id(n) not in drop:
      nodes.append(n)
  del g.graph.node[:]
  g.graph.node.extend(nodes)
  g.graph.initializer.extend(new_inits)
  _drop_unused_initializers(g.graph)
  return model, counts


def _drop_unused_initializers(graph) -> None:
  used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
  keep = [t for t in graph.initializer if t.name in used]
  del graph.initializer[:]
  graph.initializer.extend(keep)


# ---------------------------------------------------------------------------- quantizers
def check(quantize: str, calibration: Any = None) -> None:
  """Refuses an unknown variant, or calibration data the variant would not use."""
  if quantize not in QUANTIZATIONS:
    raise ValueError(f"--quantize={quantize!r}: choose one of {', '.join(QUANTIZATIONS)}")
  if calibration is not None and quantize not in NEEDS_CALIBRATION:
    raise ValueError(f"--calibration applies to --quantize={'|'.join(NEEDS_CALIBRATION)} only "
                     f"(--quantize={quantize} measures activation ranges at run time)")


def calibration_batches(arrays: Mapping[str, np.ndarray], rows: int = CALIBRATION_ROWS,
                        batch: int = CALIBRATION_BATCH) -> list[dict[str, np.ndarray]]:
  """Encoded inputs (input_ids, token_type_ids, attention_mask; [N, sequence]) cut into the
  feeds the calibrator runs; the first `rows` rows are enough for stable ranges."""
  n = min(int(np.shape(arrays["input_ids"])[0]), rows)
  if n == 0:
    raise ValueError("the calibration data holds no examples")
  names = ("input_ids", "token_type_ids", "attention_mask")
  return [{k: np.asarray(arrays[k][s:s + batch], np.int64) for k in names}
          for s in range(0, n, batch)]


def quantize_int8(src: str, dst: str) -> collections.Counter:
  """Dynamic int8 quantization (weights int8 per tensor, activations uint8 per call).

  Refuses a result whose dense layers still run in float: the quantizer skips ops it does not
  handle (Einsum, say) without a word, which would ship a model neither small nor fast.
  """
  from onnxruntime.quantization import QuantType, quantize_dynamic
  dense = len(float_dense_layers(src))
  quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
  left = float_dense_layers(dst)
  ops = op_inventory(dst)
  integer = sum(ops[k] for k in INTEGER_MATMULS)
  if left or integer < dense or not dense:
    os.remove(dst)
    raise ValueError(f"int8 quantization left {len(left)} of {dense} dense layer(s) in float "
                     f"({', '.join(left[:5])}); op inventory: {dict(ops)}")
  return ops


def _reader(feeds: Iterable[Mapping[str, np.ndarray]]):
  from onnxruntime.quantization import CalibrationDataReader

  class Reader(CalibrationDataReader):
    def __init__(self):
      self._it: Iterator = iter(list(feeds))

    def get_next(self):
      return next(self._it, None)

  return Reader()


def _fold_to(src: str, dst: str) -> dict[str, int]:
  import onnx
  model, counts = fold_nonorm(onnx.load(src))
  onnx.save(model, dst)
  return counts


def _static_qdq(src: str, dst: str, feeds: list[dict[str, np.ndarray]]) -> None:
  import onnx
  from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                        quantize_static)
  dense = set(float_dense_layers(src))
  # The attention products multiply two activations; quantizing them cost accuracy and time.
  others = [n.name for n in onnx.load(src, load_external_data=False).graph.node
            if n.op_type in ("MatMul", "Gemm") and n.name not in dense]
  quantize_static(
      src, dst, _reader(feeds), quant_format=QuantFormat.QDQ,
      op_types_to_quantize=["MatMul", "Gemm", "Gather"], nodes_to_exclude=others,
      per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
      # MinMax: MobileBERT's few huge channels carry signal, a percentile would clip them.
      calibrate_method=CalibrationMethod.MinMax,
      # Float outputs let ONNX Runtime fuse DQ -> MatMul into MatMulIntegerToFloat, with no
      # requantization of the result, which would need a second calibrated range.
      extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Gather"]})


def quantize_model(src: str, dst: str, quantize: str,
                   calibration: list[dict[str, np.ndarray]] | None = None
                   ) -> tuple[collections.Counter, dict[str, Any]]:
  """Writes the `quantize` variant of the fp32 graph `src` to `dst`.

  Returns (op inventory of the graph ONNX Runtime runs, details for onnx_io.json). Refuses a
  result whose dense layers do not all run as integer matmuls.
  """
  check(quantize, calibration)
  if quantize == "none":
    raise ValueError("quantize_model makes int8 variants; --quantize=none is the fp32 graph")
  if quantize in NEEDS_CALIBRATION and not calibration:
    raise ValueError(f"--quantize={quantize} needs calibration data: fine-tune with a local "
                     "dev set, or give --calibration=<file of text lines or a dev TSV>")
  details: dict[str, Any] = {"method": DESCRIPTIONS[quantize]}
  if quantize == "int8_dynamic":
    quantize_int8(src, dst)
  else:
    dense = len(float_dense_layers(src))
    with tempfile.TemporaryDirectory() as tmp:
      folded = os.path.join(tmp, "folded.onnx")
      details["nonorm_folded"] = _fold_to(src, folded)
      if quantize == "int8":
        quantize_int8(folded, dst)
      else:
        _static_qdq(folded, dst, calibration)
        details["calibration_rows"] = int(sum(len(f["input_ids"]) for f in calibration))
    ops = runtime_op_inventory(dst)
    integer = sum(ops[k] for k in INTEGER_MATMULS)
    if integer < dense:
      os.remove(dst)
      raise ValueError(f"--quantize={quantize} left dense layers in float: {integer} integer "
                       f"matmuls for {dense} dense layers; runtime op inventory: {dict(ops)}")
  return runtime_op_inventory(dst), details
