"""ONNX export (`mbert_jax.interop.onnx_export`): fp32 graphs of the pretraining, classification and
question-answering students agree with the Flax models within 1e-4 of each tensor's largest
magnitude, on padded batches of other shapes than the traced one, with feature maps driven to
1e7; the int8 graph runs integer matmuls for every dense layer; a graph whose dense layers the
quantizer would skip is refused; the IB-BERT teacher is refused with the reason.

Needs the `onnx` extra; CI installs it, so these run there (no skip on a missing package)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export_util import init_tree, padded_batch, random_tree
from mbert_jax.interop import onnx_export as ox
from mbert_jax.models import build, build_classifier, build_span_extractor, preset

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op"),
              pytest.mark.filterwarnings("ignore:# The axis name"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

TOL = 1e-4
LARGE = 200.0  # drives the last feature map past 1e7 (checked below)
STUDENT = preset("mobilebert_micro", num_hidden_layers=2, vocab_size=97,
                 max_position_embeddings=32)
# (batch, sequence): one row; an odd length; the longest the positions allow.
SHAPES = ((1, 5), (3, 11), (2, 32))


def _model(head: str, cfg=STUDENT):
  if head in ("pretraining", "masked_lm"):  # masked_lm: the same model, exported without NSP
    return build(cfg)
  if head == "classification":
    return build_classifier(cfg, 3, 0.1)
  return build_span_extractor(cfg)


def _flax_outputs(model, head: str, params, batch) -> dict[str, np.ndarray]:
  args = [jnp.asarray(batch[k], jnp.int32) for k in ox.INPUT_NAMES]
  out = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args)
  if head == "pretraining":
    return {"mlm_logits": np.asarray(out.mlm_logits), "nsp_logits": np.asarray(out.nsp_logits),
            "hidden_states": np.stack([np.asarray(h) for h in out.hidden_states])}
  if head == "masked_lm":
    return {"mlm_logits": np.asarray(out.mlm_logits),
            "hidden_states": np.stack([np.asarray(h) for h in out.hidden_states])}
  if head == "classification":
    return {"logits": np.asarray(out)}
  return {"start_logits": np.asarray(out[0]), "end_logits": np.asarray(out[1])}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """One fp32 export per head, from large-activation random trees."""
  out = {}
  for seed, head in enumerate(ox.HEADS):
    model = _model(head)
    params = random_tree(init_tree(model, STUDENT, head), seed=seed, large=LARGE)
    d = str(tmp_path_factory.mktemp(head))
    info = ox.export(STUDENT, params, head, d)
    out[head] = (model, params, d, info)
  return out


@pytest.mark.parametrize("head", ox.HEADS)
def test_fp32_graph_matches_flax_on_padded_batches(exports, head):
  model, params, d, info = exports[head]
  sess = ox.session(os.path.join(d, ox.ONNX_FILE))
  assert [o.name for o in sess.get_outputs()] == list(ox.OUTPUT_NAMES[head])
  biggest = 0.0
  for batch_size, seq in SHAPES:
    batch = padded_batch(STUDENT.vocab_size, batch_size, seq, seed=seq)
    ref = _flax_outputs(model, head, params, batch)
    got = ox.run_session(sess, batch)
    errors = ox.max_relative_errors(got, ref)
    for name, err in errors.items():
      assert got[name].shape == ref[name].shape, name
      assert err <= TOL, f"{head} {name} at {batch_size}x{seq}: {err:.2e}"
    if head == "pretraining":
      biggest = max(biggest, float(np.abs(ref["hidden_states"]).max()))
      assert ref["hidden_states"].shape[0] == STUDENT.num_hidden_layers + 1
  if head == "pretraining":
    assert biggest >= 1e7, f"feature maps only reach {biggest:.1e}: not the large regime"
  assert all(v <= TOL for v in info["fp32_vs_pytorch_max_relative_error"].values())


@pytest.mark.parametrize("head", ox.HEADS)
def test_one_file_with_dynamic_batch_and_sequence(exports, head):
  _, _, d, info = exports[head]
  assert sorted(f for f in os.listdir(d) if not f.endswith(".json")) == [ox.ONNX_FILE]
  with open(os.path.join(d, ox.IO_FILE)) as f:
    io = json.load(f)
  assert io == info
  assert [i["name"] for i in io["inputs"]] == list(ox.INPUT_NAMES)
  for i in io["inputs"]:
    assert i["shape"] == ["batch", "sequence"] and i["dtype"] == "int64"
  assert [o["name"] for o in io["outputs"]] == list(ox.OUTPUT_NAMES[head])
  for o in io["outputs"]:
    assert "batch" in o["shape"], o
  model = onnx.load(os.path.join(d, ox.ONNX_FILE))
  onnx.checker.check_model(model)
  assert not any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize("head", ox.HEADS)
def test_int8_graph_runs_integer_matmuls(exports, head, tmp_path):
  model, params, d, _ = exports[head]
  dense = ox.float_dense_layers(os.path.join(d, ox.ONNX_FILE))
  assert len(dense) >= 30  # every projection of both layers, the FFNs, bottlenecks and head
  q = str(tmp_path / "int8.onnx")
  ops = ox.quantize_int8(os.path.join(d, ox.ONNX_FILE), q)
  assert sum(ops[k] for k in ox.INTEGER_MATMULS) >= len(dense), dict(ops)
  assert ox.float_dense_layers(q) == []
  # What stays float is the attention products (two activations), two per layer.
  assert ops["MatMul"] == 2 * STUDENT.num_hidden_layers, dict(ops)
  assert os.path.getsize(q) < 0.7 * os.path.getsize(os.path.join(d, ox.ONNX_FILE))
  got = ox.run_session(ox.session(q), padded_batch(STUDENT.vocab_size, 2, 9))
  assert all(np.isfinite(v).all() for v in got.values())


def _einsum_model(path: str) -> None:
  """y = einsum(x, W) + the same through MatMul: an exporter that emits Einsum for dense
  layers produces this pattern, which dynamic quantization leaves in float."""
  rng = np.random.default_rng(0)
  w = helper.make_tensor("w", TensorProto.FLOAT, (8, 8), rng.normal(size=64).astype(np.float32))
  w2 = helper.make_tensor("w2", TensorProto.FLOAT, (8, 8), rng.normal(size=64).astype(np.float32))
  graph = helper.make_graph(
      [helper.make_node("Einsum", ["x", "w"], ["h"], equation="bti,io->bto", name="dense_einsum"),
       helper.make_node("MatMul", ["h", "w2"], ["y"], name="dense_matmul")],
      "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 8])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", 8])], [w, w2])
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_quantization_that_skips_dense_layers_is_refused(tmp_path):
  src, dst = str(tmp_path / "einsum.onnx"), str(tmp_path / "q.onnx")
  _einsum_model(src)
  assert ox.float_dense_layers(src) == ["dense_einsum", "dense_matmul"]
  with pytest.raises(ValueError, match=r"left 1 of 2 dense layer\(s\) in float \(dense_einsum"):
    ox.quantize_int8(src, dst)
  assert not os.path.exists(dst)


def test_teacher_is_refused_with_the_reason(tmp_path):
  teacher = preset("ib_bert_large_micro", num_hidden_layers=1)
  params = init_tree(build(teacher), teacher, "pretraining")
  with pytest.raises(ValueError, match="ONNX export goes through the Hugging Face model, and "
                                       "Hugging Face MobileBERT cannot represent"):
    ox.export(teacher, params, "pretraining", str(tmp_path / "t"))
  assert not (tmp_path / "t" / ox.ONNX_FILE).exists()
  with pytest.raises(ValueError, match="--quantize='int4'"):
    ox.export(STUDENT, params, "pretraining", str(tmp_path / "s"), quantize="int4")
