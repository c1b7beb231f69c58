"""The int8 variants beyond plain dynamic quantization (`mbert_jax.interop.quantize`):

- NoNorm folding keeps the fp32 graph's outputs (feature maps at 1e7 included) while dropping
  its Mul/Add pairs;
- `--quantize=int8_static`, calibrated on the fine-tuning run's dev set or on a file the user
  names, runs every dense layer as an integer matmul in the graph ONNX Runtime executes, and
  scores within one point of fp32 on the dev set of tests/test_export_int8.py;
- `int8`, `int8_dynamic` and `int8_static` exports all run through `predict`, and
  onnx_io.json and the model card say which quantization was used;
- what cannot apply is refused in one line.

Needs the `onnx` extra (CI installs it)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from export_util import init_tree, padded_batch, random_tree, run_module
from mbert_jax.interop import export
from mbert_jax.interop import onnx_export as ox
from mbert_jax.interop import predict
from mbert_jax.interop import quantize as qz
from mbert_jax.models import build_classifier, preset
from test_export_int8 import N_DEV, _accuracy, _dev

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op"),
              pytest.mark.filterwarnings("ignore:# The axis name"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STUDENT = preset("mobilebert_micro", num_hidden_layers=2, vocab_size=97,
                 max_position_embeddings=32)


@pytest.fixture(scope="module")
def fp32_graph(tmp_path_factory):
  """A classifier's fp32 export from a random tree with large activations and random NoNorm
  scales and shifts (an initialised model's are 1 and 0, which would hide a wrong fold)."""
  params = random_tree(init_tree(build_classifier(STUDENT, 3, 0.1), STUDENT, "classification"),
                       seed=5, large=200.0)
  d = str(tmp_path_factory.mktemp("fp32"))
  ox.export(STUDENT, params, "classification", d)
  return os.path.join(d, ox.ONNX_FILE)


def test_nonorm_folding_keeps_outputs_and_drops_ops(fp32_graph, tmp_path):
  import onnx
  before = ox.op_inventory(fp32_graph)
  model, counts = qz.fold_nonorm(onnx.load(fp32_graph))
  folded = str(tmp_path / "folded.onnx")
  onnx.save(model, folded)
  onnx.checker.check_model(folded)
  after = ox.op_inventory(folded)
  layers = STUDENT.num_hidden_layers
  # Per layer: the two bottleneck projections lose their NoNorm, every NoNorm after a residual
  # keeps one Mul.
  assert counts["full"] == 2 * layers, counts
  assert counts["residual"] >= 3 * layers, counts
  assert after["Add"] == before["Add"] - counts["full"] - counts["residual"]
  assert after["Mul"] == before["Mul"] - counts["full"]
  assert len(ox.float_dense_layers(folded)) == len(ox.float_dense_layers(fp32_graph))
  for b, s in ((1, 5), (3, 11), (2, 32)):
    batch = padded_batch(STUDENT.vocab_size, b, s, seed=s)
    errors = ox.max_relative_errors(ox.run_session(ox.session(folded), batch),
                                    ox.run_session(ox.session(fp32_graph), batch))
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize("variant", ["int8", "int8_static"])
def test_variants_run_every_dense_layer_in_integers(fp32_graph, tmp_path, variant):
  feeds = (qz.calibration_batches(padded_batch(STUDENT.vocab_size, 32, 24, seed=1))
           if variant == "int8_static" else None)
  q = str(tmp_path / f"{variant}.onnx")
  ops, details = qz.quantize_model(fp32_graph, q, variant, feeds)
  dense = len(ox.float_dense_layers(fp32_graph))
  assert sum(ops[k] for k in ox.INTEGER_MATMULS) >= dense, dict(ops)
  # What stays float in the executed graph: the attention products, two per layer.
  assert ops["MatMul"] + ops["FusedMatMul"] == 2 * STUDENT.num_hidden_layers, dict(ops)
  assert ox.float_dense_layers(q) == []
  assert details["nonorm_folded"]["full"] == 2 * STUDENT.num_hidden_layers
  assert os.path.getsize(q) < 0.7 * os.path.getsize(fp32_graph)


def test_refusals(fp32_graph, tmp_path):
  with pytest.raises(ValueError, match="--quantize=int8_static needs calibration data"):
    qz.quantize_model(fp32_graph, str(tmp_path / "q.onnx"), "int8_static")
  with pytest.raises(ValueError, match=r"--calibration applies to --quantize=int8_static only"):
    qz.check("int8", [{}])
  with pytest.raises(ValueError, match=r"--quantize='int4': choose one of none, int8, "):
    export.check_request("onnx", "int4")
  with pytest.raises(ValueError, match="--quantize=int8_static applies to --format=onnx only"):
    export.check_request("hf", "int8_static")
  with pytest.raises(FileNotFoundError, match="--calibration=/nonexistent: no such file"):
    export.check_request("onnx", "int8_static", "/nonexistent")


# ---------------------------------------------------------------------------- a fine-tuned run
@pytest.fixture(scope="module")
def run(sst2_run):
  return sst2_run


@pytest.mark.slow
def test_static_int8_keeps_accuracy_and_every_variant_predicts(run):
  root = run["root"] / "static"  # the run is shared with test_export_int8.py: own outputs
  root.mkdir(exist_ok=True)
  fp32_dir = str(root / "fp32")
  export.export(run["workdir"], "onnx", fp32_dir)
  fp32_acc, fp32_ids = _accuracy(fp32_dir, run["data"])
  examples, _ = _dev(run["data"])
  sentences = [e.text for e in examples[:4]]
  text_file = str(root / "calibration.txt")
  with open(text_file, "w") as f:
    f.write("\n".join(e.text for e in _dev(run["data"])[0][:64]) + "\n")

  for variant, extra in (("int8", []), ("int8_dynamic", []), ("int8_static", []),
                         ("int8_static", [f"--calibration={text_file}"])):
    out = str(root / f"{variant}{'_file' if extra else ''}")
    proc = run_module("mbert_jax.export", f"--workdir={run['workdir']}", "--format=onnx",
                      f"--quantize={variant}", f"--out={out}", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    io = json.load(open(os.path.join(out, ox.IO_FILE)))
    assert io["quantization"] == variant
    assert io["quantization_details"]["method"] == qz.DESCRIPTIONS[variant]
    card = open(os.path.join(out, "README.md")).read()
    assert f"`--quantize={variant}`" in card and qz.DESCRIPTIONS[variant] in card
    q_path = os.path.join(out, ox.ONNX_FILE)
    ops = qz.runtime_op_inventory(q_path)
    dense = len(ox.float_dense_layers(os.path.join(fp32_dir, ox.ONNX_FILE)))
    assert sum(ops[k] for k in ox.INTEGER_MATMULS) >= dense, dict(ops)
    acc, ids = _accuracy(out, run["data"])
    print(f"{variant} {extra}: dev accuracy {acc:.4f} (fp32 {fp32_acc:.4f}), agrees with fp32 "
          f"on {np.mean(ids == fp32_ids):.4f}")
    assert abs(acc - fp32_acc) <= 0.01 + 1e-9
    # Round trip through the command a user runs.
    proc = run_module("mbert_jax.predict", f"--model={out}", "--json",
                      f"--text={sentences[0]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["label"] in ("0", "1") or line["label_id"] in (0, 1)
    model = predict.load(out, backend="onnx")
    assert len(predict.predict(model, examples[:4])) == 4
    if variant == "int8_static":
      rows = io["quantization_details"]["calibration_rows"]
      assert rows == (64 if extra else min(N_DEV, qz.CALIBRATION_ROWS))


@pytest.mark.slow
def test_static_int8_refused_where_it_cannot_apply(run, tmp_path):
  proc = run_module("mbert_jax.export", f"--workdir={run['workdir']}", "--format=onnx",
                    "--quantize=int8", f"--calibration={run['data']}/dev.tsv",
                    f"--out={tmp_path / 'x'}")
  assert proc.returncode != 0
  assert "--calibration applies to --quantize=int8_static only" in proc.stderr
  config = os.path.join(run["workdir"], "config.json")
  saved = open(config).read()
  # A run whose data came from elsewhere (the hub) has no local dev set to calibrate on.
  c = json.loads(saved)
  c["task"]["data"] = ""
  try:
    with open(config, "w") as f:
      json.dump(c, f)
    proc = run_module("mbert_jax.export", f"--workdir={run['workdir']}", "--format=onnx",
                      "--quantize=int8_static", f"--out={tmp_path / 'y'}")
  finally:
    with open(config, "w") as f:
      f.write(saved)
  assert proc.returncode != 0
  assert "give --calibration=<file of text lines or a dev TSV>" in proc.stderr
