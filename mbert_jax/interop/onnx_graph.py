"""What an ONNX graph holds and what ONNX Runtime makes of it: op counts, the dense layers
still in float, the integer matmuls. Both the export (`onnx_export`) and the int8 variants
(`quantize`) check their graphs with these; kept apart so that neither needs the other to do so.

Needs `onnx` (and `onnxruntime` for `runtime_op_inventory`), imported when called.
"""

from __future__ import annotations

import collections
import os
import tempfile
from typing import Any

# Ops that compute a dense layer in integers: a dynamic file holds MatMulInteger, which
# session-time fusion turns into the next two; a static QDQ file's DequantizeLinear -> MatMul /
# Gemm run as MatMulIntegerToFloat / QGemm.
INTEGER_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm")


def op_inventory(model_or_path: Any) -> collections.Counter:
  """Op type -> count over the graph and every subgraph."""
  import onnx
  model = (onnx.load(model_or_path) if isinstance(model_or_path, (str, os.PathLike))
           else model_or_path)
  counts: collections.Counter = collections.Counter()

  def walk(graph):
    for node in graph.node:
      counts[node.op_type] += 1
      for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
          walk(attr.g)
        for g in attr.graphs:
          walk(g)

  walk(model.graph)
  return counts


def float_dense_layers(model_or_path: Any) -> list[str]:
  """MatMul / Gemm / Einsum nodes multiplying by a stored 2-D weight, i.e. dense layers that
  still run in float (the attention products multiply two activations and are not listed)."""
  import onnx
  model = (onnx.load(model_or_path) if isinstance(model_or_path, (str, os.PathLike))
           else model_or_path)
  weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
  weights |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
  return [n.name or n.output[0] for n in model.graph.node
          if n.op_type in ("MatMul", "Gemm", "Einsum") and any(i in weights for i in n.input)]


def runtime_op_inventory(path: str) -> collections.Counter:
  """Op type -> count of the graph ONNX Runtime actually runs (after its session-time fusions:
  a QDQ file holds float MatMuls between DequantizeLinear nodes, which run as integer ops)."""
  import onnxruntime as ort
  with tempfile.TemporaryDirectory() as tmp:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return op_inventory(options.optimized_model_filepath)


__all__ = ["INTEGER_MATMULS", "float_dense_layers", "op_inventory", "runtime_op_inventory"]
