"""A teacher of another width, head count and depth through the one loop: the learned feature
projection lives in the train state, trains in the layer-wise stages only, resumes bit for bit,
and never leaves in an exported student."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import common
from train_util import final_params, metrics_rows, tiny_student_config, tiny_teacher_config

from mbert_jax.interop import export
from mbert_jax import launch
from mbert_jax.distill.teacher import PROJECTION_KEY


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("mismatch_data"))


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory, data_cache):
  """A 3-layer BERT 96 wide with 6 heads (the student: 2 layers, 64 wide, 4 heads)."""
  c = tiny_teacher_config(data_cache, steps=4)
  c.model = common.model_section("bert_base_micro", num_hidden_layers=3, hidden_size=96,
                                 num_attention_heads=6, max_position_embeddings=32)
  c.model.vocab_size = -1
  workdir = str(tmp_path_factory.mktemp("wide_teacher"))
  assert launch.run_config(c, workdir)["status"] == "completed"
  return workdir


def _student(data_cache, teacher, **train_fields):
  c = tiny_student_config(data_cache, teacher, preset="pkt_tf2", steps_per_layer=3,
                          distill_steps=2, layers=2)
  c.kt.layer_map = (1, 3)
  for k, v in train_fields.items():
    c.train[k] = v
  return c


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, data_cache, wide_teacher):
  workdir = str(tmp_path_factory.mktemp("mismatch_student"))
  report = launch.run_config(_student(data_cache, wide_teacher), workdir)
  assert report["status"] == "completed"
  assert "relation" in report["transfer"] and "shared" in report["transfer"]
  return workdir


def _state_params(workdir: str, step: int | None = None) -> dict[str, np.ndarray]:
  from test_finetune_train import flat, restore_state
  return flat(restore_state(workdir, step)["params"])


def test_projection_trains_in_layer_wise_stages_and_resumes_bitwise(student_run, data_cache,
                                                                    wide_teacher, tmp_path):
  rows = [r for r in metrics_rows(student_run) if "fmt_loss" in r]
  assert rows and all(np.isfinite(r["fmt_loss"]) and np.isfinite(r["at_loss"]) for r in rows)
  cut = str(tmp_path / "cut")  # stopped where the layer-wise phases end (2 x 3 steps)
  launch.run_config(_student(data_cache, wide_teacher, steps=6, checkpoint_every=1), cut)
  mid, at_pd = _state_params(cut, 4), _state_params(cut, 6)
  final = _state_params(student_run)
  proj = [k for k in final if k.startswith(PROJECTION_KEY + "/")]
  assert proj, sorted(final)[:5]
  assert any(not np.array_equal(mid[k], at_pd[k]) for k in proj)  # trained in phase 2
  for k in proj:  # frozen through PD
    np.testing.assert_array_equal(at_pd[k], final[k], err_msg=k)
  launch.run_config(_student(data_cache, wide_teacher), cut)  # resume into PD
  resumed = _state_params(cut)
  assert resumed.keys() == final.keys()
  for k in final:
    np.testing.assert_array_equal(resumed[k], final[k], err_msg=k)


def test_exports_hold_the_student_only(student_run, tmp_path):
  flax_dir, hf_dir = str(tmp_path / "flax"), str(tmp_path / "hf")
  export.export(student_run, "flax", flax_dir)
  export.export(student_run, "hf", hf_dir)
  flax_keys = set(load_file(os.path.join(flax_dir, "params.safetensors")))
  hf_keys = set(load_file(os.path.join(hf_dir, "model.safetensors")))
  assert flax_keys and hf_keys
  assert not any("kt_projection" in k or "projection" in k.split("/")[0] for k in flax_keys)
  assert not any("kt_projection" in k for k in hf_keys)
  assert set(final_params(student_run)) == flax_keys
