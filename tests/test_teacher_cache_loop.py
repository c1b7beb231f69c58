"""Cached teacher targets inside the one loop: at k = vocabulary size the pre-training
distillation stage trains exactly as with the teacher online, a run resumed into the cached
stage does not load the teacher, resumes bit for bit, a run begun online may switch to a cache
mid-stage, and a cache of other data is refused before anything compiles."""

from __future__ import annotations

import os

import numpy as np
import pytest

from train_util import final_params, metrics_rows, tiny_student_config, tiny_teacher_config

from mbert_jax.distill import teacher_cache
from mbert_jax import launch

LAYERS, PER_LAYER, PD = 2, 2, 4


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("kd_cache_data"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_cache):
  workdir = str(tmp_path_factory.mktemp("kd_teacher"))
  report = launch.run_config(tiny_teacher_config(data_cache, steps=6), workdir)
  assert report["status"] == "completed"
  return workdir


def _student(data_cache, teacher, cache_dir: str = "", **train_fields):
  c = tiny_student_config(data_cache, teacher, preset="pkt", steps_per_layer=PER_LAYER,
                          distill_steps=PD, layers=LAYERS)
  c.schedule.alpha = 0.5
  c.schedule.teacher_cache = cache_dir
  c.teacher_cache.k = 512           # the tiny vocabulary's size: the cache is exact
  c.teacher_cache.value_dtype = "float32"
  for k, v in train_fields.items():
    c.train[k] = v
  return c


@pytest.fixture(scope="module")
def exact_cache(tmp_path_factory, data_cache, teacher):
  cache_dir = str(tmp_path_factory.mktemp("kd_cache"))
  c = _student(data_cache, teacher)
  teacher_cache.write_cache(c, cache_dir, progress=False)
  return cache_dir


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, data_cache, teacher):
  workdir = str(tmp_path_factory.mktemp("online"))
  assert launch.run_config(_student(data_cache, teacher), workdir)["status"] == "completed"
  return workdir


def _rows(workdir: str) -> dict[int, dict]:
  return {r["step"]: r for r in metrics_rows(workdir) if "loss" in r}


def test_exact_cache_trains_like_the_online_teacher(online_run, exact_cache, data_cache, teacher,
                                                    tmp_path):
  workdir = str(tmp_path / "cached")
  report = launch.run_config(_student(data_cache, teacher, exact_cache), workdir)
  assert report["status"] == "completed" and report["teacher_cache"] == exact_cache
  online, cached = _rows(online_run), _rows(workdir)
  assert online.keys() == cached.keys()
  pd_steps = [s for s in online if s > LAYERS * PER_LAYER]
  assert len(pd_steps) == PD
  for s in sorted(online):
    for key in ("loss", "kd_loss", "mlm_loss"):
      if key in online[s]:
        np.testing.assert_allclose(cached[s][key], online[s][key], rtol=2e-5, atol=1e-6,
                                   err_msg=f"{key} at step {s}")
  a, b = final_params(online_run), final_params(workdir)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_resumed_into_the_cached_stage_the_teacher_is_not_loaded(exact_cache, data_cache, teacher,
                                                                 tmp_path):
  ref = str(tmp_path / "ref")
  launch.run_config(_student(data_cache, teacher, exact_cache), ref)
  workdir = str(tmp_path / "cut")
  stop = LAYERS * PER_LAYER + 1  # one step into the cached stage
  first = launch.run_config(_student(data_cache, teacher, exact_cache, steps=stop,
                                    checkpoint_every=1), workdir)
  assert first["step"] == stop and first["teacher_loaded"]
  second = launch.run_config(_student(data_cache, teacher, exact_cache), workdir)
  assert second["status"] == "completed" and not second["teacher_loaded"]
  a, b = final_params(ref), final_params(workdir)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_a_run_started_online_switches_to_the_cache_mid_stage(online_run, exact_cache,
                                                              data_cache, teacher, tmp_path):
  """Where the targets come from is not part of the run's identity (the cache's own key checks
  data and teacher), so a long PD stage begun online can finish from a cache built later."""
  workdir = str(tmp_path / "switched")
  stop = LAYERS * PER_LAYER + 2
  first = launch.run_config(_student(data_cache, teacher, steps=stop, checkpoint_every=1), workdir)
  assert first["step"] == stop and first["teacher_cache"] is None
  second = launch.run_config(_student(data_cache, teacher, exact_cache), workdir)
  assert second["status"] == "completed" and second["teacher_cache"] == exact_cache
  assert not second["teacher_loaded"]
  online, switched = _rows(online_run), _rows(workdir)
  for s in sorted(online):
    np.testing.assert_allclose(switched[s]["loss"], online[s]["loss"], rtol=2e-5, atol=1e-6,
                               err_msg=f"loss at step {s}")


def test_a_cache_of_other_data_is_refused_before_compiling(exact_cache, data_cache, teacher,
                                                           tmp_path):
  c = _student(data_cache, teacher, exact_cache)
  c.data.seed = c.data.seed + 1
  with pytest.raises(ValueError, match="data.seed"):
    launch.run_config(c, str(tmp_path / "other"))
  assert not os.path.exists(os.path.join(tmp_path, "other", "checkpoints"))
  c = _student(data_cache, teacher, str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    launch.run_config(c, str(tmp_path / "missing"))
