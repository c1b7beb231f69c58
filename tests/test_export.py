"""`python -m mbert_jax.export` on real (tiny) runs: Hugging Face and Flax formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from train_util import ROOT, tiny_data, tiny_teacher_config

from configs import common, distill_mobilebert
from mbert_jax.interop import export
from mbert_jax.interop.model_source import load_run
from mbert_jax import launch
from mbert_jax.models import build


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("export_cache"))
  student = str(tmp_path_factory.mktemp("student"))
  c = distill_mobilebert.get_config("smoke,preset=scratch")
  c.model = common.model_section("mobilebert_micro", num_hidden_layers=2, max_position_embeddings=32)
  tiny_data(c, cache)
  c.schedule.distill_steps = 3
  c.schedule.warmup_steps = 1
  c.train.eval_every = c.train.checkpoint_every = 3
  c.train.eval_steps = 1
  c.train.progress_bar = False
  launch.run_config(c, student)
  teacher = str(tmp_path_factory.mktemp("teacher"))
  launch.run_config(tiny_teacher_config(cache, steps=2), teacher)
  return {"student": student, "teacher": teacher}


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 500, (3, 12)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  ids[1, 8:] = 0
  types = np.zeros_like(ids)
  types[:, 6:] = 1
  return ids, types, mask


def _run(args):
  return subprocess.run([sys.executable, "-m", "mbert_jax.interop.export", *args], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                        timeout=600)


def test_hf_export_loads_in_transformers_with_the_same_logits(runs, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = str(tmp_path / "hf")
  proc = _run([f"--workdir={runs['student']}", "--format=hf", f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ("config.json", "model.safetensors", "vocab.txt"):
    assert os.path.exists(os.path.join(out, name)), name
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["classifier_activation"] is False

  model, info = transformers.MobileBertForPreTraining.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  model.eval()
  auto = transformers.AutoModel.from_pretrained(out).eval()

  cfg, params, _ = load_run(runs["student"])
  ids, types, mask = _inputs()
  ours = build(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32),
                          jnp.asarray(types, jnp.int32), jnp.asarray(mask, jnp.int32))
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                attention_mask=torch.tensor(mask))
    hidden = auto(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                  attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  for name, a, b in (("mlm", ours.mlm_logits, ref.prediction_logits.numpy()),
                     ("nsp", ours.nsp_logits, ref.seq_relationship_logits.numpy()),
                     ("hidden", ours.hidden_states[-1], hidden)):
    a = np.asarray(a)
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), name


def test_flax_export_round_trips(runs, tmp_path):
  out = str(tmp_path / "flax")
  proc = _run([f"--workdir={runs['student']}", "--format=flax", f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg, params = export.load_flax(out)
  ref_cfg, ref_params, _ = load_run(runs["student"])
  assert cfg == ref_cfg
  from flax import traverse_util
  a = traverse_util.flatten_dict(params, sep="/")
  b = traverse_util.flatten_dict(ref_params, sep="/")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_teacher_hf_export_is_refused_flax_works(runs, tmp_path):
  proc = _run([f"--workdir={runs['teacher']}", "--format=hf", f"--out={tmp_path / 'hf'}"])
  assert proc.returncode == 2
  assert "cannot represent" in proc.stderr and "--format=flax" in proc.stderr
  assert not os.path.exists(tmp_path / "hf" / "model.safetensors")
  proc = _run([f"--workdir={runs['teacher']}", "--format=flax", f"--out={tmp_path / 'flax'}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg, _ = export.load_flax(str(tmp_path / "flax"))
  assert not cfg.hf_representable


def test_export_names_a_missing_run(tmp_path):
  proc = _run([f"--workdir={tmp_path}", "--format=flax", f"--out={tmp_path / 'o'}"])
  assert proc.returncode == 2 and "model_config.json" in proc.stderr


@pytest.mark.slow
def test_pretraining_onnx_export_matches_flax(runs, tmp_path):
  """MLM and NSP logits and every hidden state of the ONNX graph, on a padded batch of
  another shape than the traced one, within 1e-4 of the Flax model's largest magnitude."""
  from mbert_jax.interop import onnx_export as ox  # the onnx extra: CI installs it, no skip
  out = str(tmp_path / "onnx")
  proc = _run([f"--workdir={runs['student']}", "--format=onnx", f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in (ox.ONNX_FILE, ox.IO_FILE, "vocab.txt", "README.md"):
    assert os.path.exists(os.path.join(out, name)), name
  cfg, params, _ = load_run(runs["student"])
  ids, types, mask = _inputs()
  ref = build(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32),
                         jnp.asarray(types, jnp.int32), jnp.asarray(mask, jnp.int32))
  got = ox.run_session(ox.session(os.path.join(out, ox.ONNX_FILE)),
                       {"input_ids": ids, "token_type_ids": types, "attention_mask": mask})
  want = {"mlm_logits": np.asarray(ref.mlm_logits), "nsp_logits": np.asarray(ref.nsp_logits),
          "hidden_states": np.stack([np.asarray(h) for h in ref.hidden_states])}
  for name, err in ox.max_relative_errors(got, want).items():
    assert err <= 1e-4, (name, err)


def test_pretraining_model_card(runs, tmp_path):
  out = str(tmp_path / "flax")
  export.export(runs["student"], "flax", out)
  card = open(os.path.join(out, "README.md")).read()
  for text in ("MobileBERT student", "2 layers", "masked-language-model and next-sentence",
               "- schedule `scratch`", "- teacher: none", "- steps: 3", runs["student"]):
    assert text in card, text
  assert not os.path.exists(os.path.join(out, "task.json"))


def test_teacher_onnx_export_is_refused_with_the_reason(runs, tmp_path):
  proc = _run([f"--workdir={runs['teacher']}", "--format=onnx", f"--out={tmp_path / 'o'}"])
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("error: ONNX export goes through the Hugging Face model, and Hugging "
                         "Face MobileBERT cannot represent this model"), line
  assert "--format=flax" in line and not (tmp_path / "o").exists()
