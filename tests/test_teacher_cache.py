"""The teacher cache: writer, resume, identity checks, damaged shards, reader, command line.

The teacher is a random micro IB-BERT saved as an mbert-jax run (checkpoints at steps 3 and 5),
the data the tiny built-in slice of tests/train_util.py. The `pkt` schedule used here has two
2-step layer phases, so its PD stage is global steps 4..9: with 2 steps per shard that is
cells 2 (4..6), 3 (6..8) and 4 (8..9, a partial cell).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile

import jax
import ml_collections
import numpy as np
import pytest

from train_util import ROOT, tiny_student_config

from mbert_jax.training import sharding
from mbert_jax.distill import cache_format, teacher_cache as tc
from mbert_jax.training.checkpoint import Checkpointer
from mbert_jax.data import build_pipeline
from mbert_jax.models import build, example_inputs, preset
from mbert_jax.training.workdir import write_json

K = 8
PD_STEPS = (4, 9)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data_cache):
  """A micro teacher run with random parameters saved at steps 3 and 5, and its tokenizer."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  c = tiny_student_config(data_cache, workdir)
  c.data.vocab = "train:512"
  pipe = build_pipeline(c.data, workdir)
  pipe.save_vocab(os.path.join(workdir, "tokenizer"))
  cfg = preset("ib_bert_large_micro", num_hidden_layers=2, max_position_embeddings=32,
               vocab_size=pipe.vocab_size)
  write_json(os.path.join(workdir, "model_config.json"), cfg.to_dict())
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=5, async_save=False)
  for step in (3, 5):
    params, _ = sharding.init_params(build(cfg), example_inputs(cfg), step, mesh,
                                     sharding.DEFAULT_RULES)
    ckpt.save(step, {"params": params}, {"step": step})
  ckpt.close()
  return workdir


def run_config(data_cache: str, teacher_dir: str, preset_name: str = "pkt", **data):
  c = tiny_student_config(data_cache, teacher_dir, preset=preset_name, steps_per_layer=2,
                          distill_steps=5)
  if preset_name == "pd_only":
    c.schedule.distill_steps = PD_STEPS[1]
  for name, value in data.items():
    c.data[name] = value
  c.teacher_cache = ml_collections.ConfigDict({"k": K, "value_dtype": "float16",
                                               "steps_per_shard": 2})
  return c


def run_key(c, step: int | None = None):
  pipe = build_pipeline(c.data, None)
  return tc.identity_key(c, tc.resolve_teacher_step(c.teacher) if step is None else step, pipe)


@pytest.fixture(scope="module")
def written(tmp_path_factory, data_cache, teacher_dir):
  """The PD-stage cache of the pkt config, and the writer's report."""
  workdir = str(tmp_path_factory.mktemp("cache"))
  report = tc.write_cache(run_config(data_cache, teacher_dir), workdir, progress=False)
  return workdir, report


def copy_of(written, tmp_path) -> str:
  target = str(tmp_path / "cache")
  shutil.copytree(written[0], target)
  return target


def shard(cache_dir: str, cell: int) -> str:
  return os.path.join(cache_dir, cache_format.SHARD_DIR, cache_format.shard_name(cell, 0, 1))


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def teacher_logits(c, step: int, teacher_step: int) -> tuple[np.ndarray, dict]:
  """The teacher's MLM logits on the pipeline's batch of `step`, computed directly."""
  from mbert_jax.interop.model_source import load_run
  cfg, params, at = load_run(c.teacher.checkpoint, teacher_step)
  assert at == teacher_step
  batch = build_pipeline(c.data, None).batch_at(step)
  out = build(cfg).apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                         batch["attention_mask"], masked_positions=batch["masked_lm_positions"],
                         deterministic=True)
  return np.asarray(out.mlm_logits, np.float64), batch


def log_softmax(x: np.ndarray) -> np.ndarray:
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# writer and reader
# ----------------------------------------------------------------------------------------------

def test_targets_equal_a_direct_teacher_forward(written, data_cache, teacher_dir):
  cache_dir, report = written
  assert report["steps"] == list(PD_STEPS) and report["cells_written"] == 3
  assert report["steps_computed"] == PD_STEPS[1] - PD_STEPS[0]
  c = run_config(data_cache, teacher_dir)
  key = run_key(c)
  assert key["teacher"]["step"] == 5  # teacher.step = -1: the newest checkpoint
  with tc.open_cache(cache_dir, key, steps=PD_STEPS) as cache:
    for step in range(*PD_STEPS):
      logits, batch = teacher_logits(c, step, 5)
      got = cache.targets_at(step, batch=batch)
      assert got["teacher_topk_values"].dtype == np.float16
      assert got["teacher_topk_indices"].dtype == np.uint16  # 512 tokens do not fit in uint8
      order = np.argsort(-logits, axis=-1, kind="stable")[..., :K]
      np.testing.assert_array_equal(got["teacher_topk_indices"], order)
      top = np.take_along_axis(logits, order, -1)
      np.testing.assert_allclose(got["teacher_topk_values"], top - top[..., :1], atol=2e-3)
      # The stored entries are the teacher's log-probabilities, up to float16 rounding.
      stored = (got["teacher_topk_values"].astype(np.float64)
                - got["teacher_log_normalizer"][..., None])
      np.testing.assert_allclose(stored, np.take_along_axis(log_softmax(logits), order, -1),
                                 atol=2e-3)
      # Any split into process slices gives the same rows.
      halves = [cache.targets_at(step, i, 2) for i in range(2)]
      for name in cache_format.TARGET_KEYS:
        np.testing.assert_array_equal(np.concatenate([h[name] for h in halves]), got[name])


def test_a_changed_input_row_is_caught(written, data_cache, teacher_dir):
  c = run_config(data_cache, teacher_dir)
  batch = build_pipeline(c.data, None).batch_at(6)
  batch["input_ids"][3, 1] += 1
  with tc.open_cache(written[0], run_key(c), steps=PD_STEPS) as cache:
    with pytest.raises(ValueError, match="step 6, row 3: the data pipeline now gives another"):
      cache.targets_at(6, batch=batch)
    with pytest.raises(ValueError, match="no targets for step 9"):
      cache.targets_at(9)


def test_rerun_writes_only_the_missing_shard(written, data_cache, teacher_dir, tmp_path):
  """An interrupted write: cell 3 never reached its final name, a partial .tmp is left."""
  cache_dir = copy_of(written, tmp_path)
  original = read_bytes(shard(cache_dir, 3))
  os.remove(shard(cache_dir, 3))
  with open(shard(cache_dir, 3) + ".tmp", "wb") as f:
    f.write(original[:100])
  kept = {cell: os.stat(shard(cache_dir, cell)).st_mtime_ns for cell in (2, 4)}
  with pytest.raises(tc.ShardError, match=r"missing shard .*c0000003\.p0of1\.zip \(steps 6\.\.8\)"):
    tc.open_cache(cache_dir, run_key(run_config(data_cache, teacher_dir)), steps=PD_STEPS)

  report = tc.write_cache(run_config(data_cache, teacher_dir), cache_dir, progress=False)
  assert (report["cells_written"], report["cells_kept"], report["steps_computed"]) == (1, 2, 2)
  assert read_bytes(shard(cache_dir, 3)) == original  # deterministic, byte for byte
  assert not os.path.exists(shard(cache_dir, 3) + ".tmp")
  assert {cell: os.stat(shard(cache_dir, cell)).st_mtime_ns for cell in (2, 4)} == kept
  again = tc.write_cache(run_config(data_cache, teacher_dir), cache_dir, progress=False)
  assert again["cells_written"] == 0 and again["steps_computed"] == 0


def test_truncated_shard_is_named_then_rewritten(written, data_cache, teacher_dir, tmp_path):
  cache_dir = copy_of(written, tmp_path)
  path = shard(cache_dir, 2)
  original = read_bytes(path)
  with open(path, "r+b") as f:
    f.truncate(len(original) // 2)
  key = run_key(run_config(data_cache, teacher_dir))
  with pytest.raises(tc.ShardError, match=r"truncated or corrupt shard .*c0000002\.p0of1\.zip"):
    tc.open_cache(cache_dir, key, steps=PD_STEPS)
  report = tc.write_cache(run_config(data_cache, teacher_dir), cache_dir, progress=False)
  assert report["cells_written"] == 1
  assert read_bytes(path) == original
  tc.open_cache(cache_dir, key, steps=PD_STEPS).close()


def test_corrupt_shard_is_named_at_read_and_verify_rewrites_it(written, data_cache, teacher_dir,
                                                               tmp_path):
  cache_dir = copy_of(written, tmp_path)
  path = shard(cache_dir, 3)
  original = read_bytes(path)
  with zipfile.ZipFile(path) as zf:
    member = zf.getinfo("000000007.npy")
  start = member.header_offset + 30 + len(member.filename) + len(member.extra)
  damaged = bytearray(original)
  damaged[start + member.compress_size // 2] ^= 0xFF
  with open(path, "wb") as f:
    f.write(damaged)
  key = run_key(run_config(data_cache, teacher_dir))
  with tc.open_cache(cache_dir, key, steps=PD_STEPS) as cache:
    cache.targets_at(6)  # the other member of the shard is intact
    with pytest.raises(tc.ShardError, match=r"corrupt shard .*c0000003\.p0of1\.zip at step 7"):
      cache.targets_at(7)
  with pytest.raises(tc.ShardError, match="fails its CRC check"):
    tc.open_cache(cache_dir, key, steps=PD_STEPS, verify=True)
  assert tc.write_cache(run_config(data_cache, teacher_dir), cache_dir,
                        progress=False)["cells_written"] == 0  # a quick check cannot see it
  report = tc.write_cache(run_config(data_cache, teacher_dir), cache_dir, verify=True,
                          progress=False)
  assert report["cells_written"] == 1 and read_bytes(path) == original


def test_open_for_run_is_what_the_loop_calls(written, data_cache, teacher_dir):
  c = run_config(data_cache, teacher_dir)
  pipe = build_pipeline(c.data, None)
  assert tc.open_for_run(c, pipe) is None  # schedule.teacher_cache unset: teacher online
  c.schedule.teacher_cache = written[0]
  with tc.open_for_run(c, pipe) as cache:
    got = cache.targets_at(4, batch=pipe.batch_at(4))
    assert {name: v.shape for name, v in got.items()} == {
        "teacher_topk_values": (8, 5, K), "teacher_topk_indices": (8, 5, K),
        "teacher_log_normalizer": (8, 5)}
  c.train.steps = PD_STEPS[0]  # stops where the PD stage would start: nothing to read
  assert tc.open_for_run(c, pipe) is None
  c.train.steps = -1
  c.data.seed = 7
  with pytest.raises(ValueError, match="data.seed: cache 12345, this run 7"):
    tc.open_for_run(c, build_pipeline(c.data, None))


# ----------------------------------------------------------------------------------------------
# identity
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,field", [
    ({"seed": 7}, "data.seed"),
    ({"batch_size": 4}, "data.batch_size"),
    ({"masked_lm_prob": 0.2}, "data.masked_lm_prob"),
])
def test_other_data_settings_are_refused_naming_the_field(written, data_cache, teacher_dir,
                                                          change, field):
  key = run_key(run_config(data_cache, teacher_dir, **change))
  with pytest.raises(ValueError, match=rf"built for other data or another teacher: {field}: "):
    tc.open_cache(written[0], key, steps=PD_STEPS)


def test_other_teacher_step_k_or_temperature_are_refused(written, data_cache, teacher_dir):
  c = run_config(data_cache, teacher_dir)
  with pytest.raises(ValueError, match=r"teacher\.step: cache 5, this run 3"):
    tc.open_cache(written[0], run_key(c, step=3))
  c.teacher_cache.k = 4
  with pytest.raises(ValueError, match=r"targets\.k: cache 8, this run 4"):
    tc.open_cache(written[0], run_key(c))
  c = run_config(data_cache, teacher_dir)
  c.schedule.temperature = 2.0
  with pytest.raises(ValueError, match=r"targets\.temperature: cache 1\.0, this run 2\.0"):
    tc.open_cache(written[0], run_key(c))


def test_strategies_with_the_same_pd_data_share_one_cache(written, data_cache, teacher_dir,
                                                         tmp_path):
  """jkt's PD stage is pkt's (same steps, same data); pd_only's covers more steps and only
  those are added; the schedule name is not part of the key."""
  cache_dir = copy_of(written, tmp_path)
  jkt = run_config(data_cache, teacher_dir, "jkt")
  assert tc.cached_steps(jkt) == PD_STEPS
  assert tc.write_cache(jkt, cache_dir, progress=False)["cells_written"] == 0
  pd_only = run_config(data_cache, teacher_dir, "pd_only")
  report = tc.write_cache(pd_only, cache_dir, progress=False)
  assert (report["cells_written"], report["steps_computed"]) == (2, 4)
  tc.open_cache(cache_dir, run_key(pd_only), steps=tc.cached_steps(pd_only)).close()


def test_missing_or_foreign_directories(tmp_path, written, data_cache, teacher_dir):
  key = run_key(run_config(data_cache, teacher_dir))
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
    tc.open_cache(missing, key)
  with pytest.raises(ValueError, match="is not a teacher cache"):
    tc.open_cache(str(tmp_path), key)
  with pytest.raises(tc.ShardError,
                     match=r"missing shard .*c0000005\.p0of1\.zip \(steps 10\.\.11\)"):
    tc.open_cache(written[0], key, steps=(4, 11))


def test_schedule_without_a_pd_stage_is_refused(data_cache, teacher_dir):
  with pytest.raises(ValueError, match="no pre-training distillation stage"):
    tc.cached_steps(run_config(data_cache, teacher_dir, "scratch"))
  with pytest.raises(ValueError, match="no pre-training distillation stage"):
    tc.cached_steps(run_config(data_cache, teacher_dir, "akt"))  # its PD stage needs features


# ----------------------------------------------------------------------------------------------
# two processes
# ----------------------------------------------------------------------------------------------

WORKER = r"""
import json, os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address={addr!r}, num_processes=2, process_id={pid})
from test_teacher_cache import run_config
from mbert_jax.distill import teacher_cache as tc
assert jax.process_count() == 2 and jax.device_count() == 4
report = tc.write_cache(run_config({data!r}, {teacher!r}), {workdir!r}, progress=False)
print("REPORT" + json.dumps(report))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_write_their_own_slices(written, data_cache, teacher_dir, tmp_path):
  """Each process writes the rows it holds; a one-process reader reads the same targets."""
  cache_dir = str(tmp_path / "two")
  addr = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
      [sys.executable, "-c", WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                           addr=addr, pid=i, data=data_cache,
                                           teacher=teacher_dir, workdir=cache_dir)],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert sorted(os.listdir(os.path.join(cache_dir, cache_format.SHARD_DIR))) == [
      cache_format.shard_name(cell, i, 2) for cell in (2, 3, 4) for i in range(2)]
  key = run_key(run_config(data_cache, teacher_dir))
  with tc.open_cache(cache_dir, key, steps=PD_STEPS) as two, \
       tc.open_cache(written[0], key, steps=PD_STEPS) as one:
    for step in range(*PD_STEPS):
      a, b = two.targets_at(step), one.targets_at(step)
      np.testing.assert_array_equal(a["teacher_topk_indices"], b["teacher_topk_indices"])
      np.testing.assert_allclose(a["teacher_topk_values"].astype(np.float32),
                                 b["teacher_topk_values"].astype(np.float32), atol=2e-3)
      np.testing.assert_allclose(a["teacher_log_normalizer"], b["teacher_log_normalizer"],
                                 rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

CONFIG_FILE = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from test_teacher_cache import run_config

def get_config(arg=None):
  preset, _, seed = (arg or "pkt").partition(",")
  c = run_config({data!r}, {teacher!r}, preset)
  if seed:
    c.data.seed = int(seed)
  return c
"""


def run_cli(config_file: str, arg: str, workdir: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "mbert_jax.teacher_cache", f"--config={config_file}:{arg}",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=ROOT))


def test_cli_completes_a_cache_and_errors_in_one_line(written, data_cache, teacher_dir, tmp_path):
  config_file = str(tmp_path / "tiny_config.py")
  with open(config_file, "w") as f:
    f.write(CONFIG_FILE.format(root=ROOT, tests=os.path.join(ROOT, "tests"), data=data_cache,
                               teacher=teacher_dir))
  cache_dir = copy_of(written, tmp_path)
  done = run_cli(config_file, "pkt", cache_dir)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "steps 4..9, k = 8, 0 shard(s) written, 3 kept" in done.stdout
  with open(os.path.join(cache_dir, "writer_report.json")) as f:
    assert json.load(f)["cells_kept"] == 3

  failed = run_cli(config_file, "pkt,7", cache_dir)
  assert failed.returncode == 2, failed.stderr[-2000:]
  last = failed.stderr.strip().splitlines()[-1]
  assert last.startswith("error: teacher cache") and "data.seed: cache 12345, this run 7" in last
  assert "Traceback" not in failed.stderr
