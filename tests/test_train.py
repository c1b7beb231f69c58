"""The training loop end to end on tiny real runs: resume, fallback, numerical safety, KT."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_util import (ROOT, checkpoint_steps, final_params, metrics_rows, tiny_student_config,
                        tiny_teacher_config, train_losses)

from mbert_jax import launch, training

from mbert_jax.errors import NonFiniteError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, cache_dir):
  """An uninterrupted 8-step teacher run (checkpoints at 4 and 8)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  report = launch.run_config(tiny_teacher_config(cache_dir), workdir)
  assert report["status"] == "completed"
  return workdir


def _assert_same_params(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_run_writes_what_it_promises(teacher_run):
  for name in ("config.json", "model_config.json", "metrics.jsonl", training.workdir.DONE_FILE,
               "tokenizer/vocab.txt"):
    assert os.path.exists(os.path.join(teacher_run, name)), name
  assert checkpoint_steps(teacher_run) == [4, 8]
  rows = metrics_rows(teacher_run)
  logged = [r for r in rows if "loss" in r]
  assert [r["step"] for r in logged] == list(range(1, 9))
  for key in ("loss", "mlm_loss", "mlm_accuracy", "nsp_accuracy", "learning_rate", "grad_norm",
              "examples_per_second"):
    assert all(np.isfinite(r[key]) for r in logged), key
  assert any("eval/mlm_accuracy" in r for r in rows)
  assert os.path.isdir(os.path.join(teacher_run, "tensorboard"))


def test_hard_kill_after_checkpoint_resumes_bitwise(teacher_run, tmp_path, cache_dir):
  """A copy of the run cut back to its step-4 checkpoint, resumed, ends bit-identical."""
  cut = str(tmp_path / "cut")
  shutil.copytree(teacher_run, cut)
  shutil.rmtree(os.path.join(cut, "checkpoints", "8"))
  os.remove(os.path.join(cut, training.workdir.DONE_FILE))
  report = launch.run_config(tiny_teacher_config(cache_dir), cut)
  assert report["status"] == "completed" and report["step"] == 8
  _assert_same_params(final_params(teacher_run), final_params(cut))
  assert train_losses(cut) == train_losses(teacher_run)


def test_truncated_latest_checkpoint_falls_back(teacher_run, tmp_path, cache_dir):
  broken = str(tmp_path / "broken")
  shutil.copytree(teacher_run, broken)
  os.remove(os.path.join(broken, training.workdir.DONE_FILE))
  files = [f for f in glob.glob(os.path.join(broken, "checkpoints", "8", "**", "*"), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 0]
  for f in files:  # half-written: every file of the latest checkpoint cut to half its size
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  with pytest.warns(UserWarning, match="step 8"):
    report = launch.run_config(tiny_teacher_config(cache_dir), broken)
  assert report["status"] == "completed"
  _assert_same_params(final_params(teacher_run), final_params(broken))


def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path, cache_dir):
  c = tiny_teacher_config(cache_dir, steps=8)
  c.train.learning_rate = 1e38  # the first update overflows every weight
  c.train.max_nonfinite_steps = 3
  c.train.checkpoint_every = 1
  workdir = str(tmp_path / "nan")
  with pytest.raises(NonFiniteError, match="3 consecutive steps"):
    launch.run_config(c, workdir)
  assert checkpoint_steps(workdir)
  for step in checkpoint_steps(workdir):
    assert all(np.all(np.isfinite(v)) for v in final_params(workdir, step).values())
  skipped = [r["skipped_steps"] for r in metrics_rows(workdir) if "skipped_steps" in r]
  assert skipped == sorted(skipped) and skipped[-1] >= 2


def test_smoke_teacher_mlm_loss_falls(tmp_path, cache_dir):
  c = tiny_teacher_config(cache_dir, steps=60)
  c.train.optimizer = "adamw"
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 6
  c.train.dropout = False
  c.train.checkpoint_every = 60
  launch.run_config(c, str(tmp_path / "falls"))
  mlm = [r["mlm_loss"] for r in metrics_rows(str(tmp_path / "falls")) if "mlm_loss" in r]
  assert np.mean(mlm[-10:]) < np.mean(mlm[:5]) - 0.5, mlm


def test_bf16_compute_keeps_fp32_params_state_and_losses(tmp_path, cache_dir):
  c = tiny_teacher_config(cache_dir, steps=2)
  c.train.compute_dtype = "bfloat16"
  c.train.checkpoint_every = 2
  workdir = str(tmp_path / "bf16")
  report = launch.run_config(c, workdir)
  assert report["status"] == "completed"
  params = final_params(workdir)
  assert all(v.dtype == np.float32 for v in params.values())
  rows = [r for r in metrics_rows(workdir) if "loss" in r]
  assert all(np.isfinite(r["loss"]) for r in rows)
  # The optimizer state as saved: every floating leaf float32.
  from mbert_jax.training.checkpoint import Checkpointer
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  meta = ckpt.read_meta(2)
  _, state, _ = ckpt.restore_latest_good(lambda m: _abstract_state_for(c, workdir, m))
  ckpt.close()
  assert meta["step"] == 2
  floats = [x for x in jax.tree.leaves(state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)


def _abstract_state_for(c, workdir, meta):
  from mbert_jax.training import sharding
  from mbert_jax.distill.task import PretrainTask
  mesh = sharding.make_mesh(c.mesh)
  setup = PretrainTask(c).setup(workdir, mesh, sharding.rules_from_config(c.mesh))
  abs_params, p_sh = setup.abstract_params, setup.param_shardings
  tx = setup.stages[meta["stage_index"]].tx
  return training.state.abstract_state(
      training.state.state_shardings(p_sh, tx, abs_params, mesh), abs_params, tx).as_dict()


def test_bad_config_fails_before_compiling(tmp_path, cache_dir):
  c = tiny_teacher_config(cache_dir)
  c.model.num_attention_heads = 5
  with pytest.raises(ValueError, match="num_attention_heads"):
    launch.task_for(c)
  c = tiny_teacher_config(cache_dir)
  c.data.max_seq_length = 64  # longer than the position table (32)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    launch.task_for(c)
  c = tiny_student_config(cache_dir, str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="teacher.checkpoint"):
    launch.task_for(c)
  c.teacher.checkpoint = ""
  with pytest.raises(ValueError, match="needs a teacher"):
    launch.task_for(c)


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path, cache_dir):
  """Preemption through launch.py: SIGTERM mid-run, rerun, equal to an uninterrupted run."""
  steps = 30
  base = [sys.executable, os.path.join(ROOT, "launch.py"),
          f"--config={ROOT}/configs/ib_bert_large.py:smoke",
          f"--config.train.steps={steps}", "--config.train.warmup_steps=2",
          "--config.train.log_every=1", f"--config.train.eval_every={steps}",
          "--config.train.eval_steps=1", "--config.train.checkpoint_every=1000",
          "--config.train.progress_bar=False", "--config.model.num_hidden_layers=2",
          "--config.model.max_position_embeddings=32", "--config.data.source=builtin:json*",
          "--config.data.vocab=train:512", "--config.data.max_seq_length=32",
          "--config.data.max_predictions_per_seq=5", "--config.data.batch_size=8",
          f"--config.data.cache_dir={cache_dir}", "--config.data.num_proc=1"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
  subprocess.run(base + [f"--workdir={ref}"], check=True, env=env, cwd=ROOT,
                 capture_output=True, timeout=600)
  proc = subprocess.Popen(base + [f"--workdir={cut}"], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(cut, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 5:
      break
    if proc.poll() is not None:
      pytest.fail("run ended before it could be preempted:\n" + proc.stdout.read())
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "preempted" in out
  stopped_at = checkpoint_steps(cut)[-1]
  assert 5 <= stopped_at < steps
  assert not os.path.exists(os.path.join(cut, training.workdir.DONE_FILE))
  subprocess.run(base + [f"--workdir={cut}"], check=True, env=env, cwd=ROOT,
                 capture_output=True, timeout=600)
  _assert_same_params(final_params(ref), final_params(cut))
  assert train_losses(cut) == train_losses(ref)


# ------------------------------------------------------------------ knowledge transfer

@pytest.fixture(scope="module")
def pkt_run(tmp_path_factory, cache_dir, teacher_run):
  workdir = str(tmp_path_factory.mktemp("pkt"))
  report = launch.run_config(tiny_student_config(cache_dir, teacher_run), workdir)
  assert report["status"] == "completed" and report["step"] == 4 * 2 + 4
  return workdir


def test_pkt_stages_freeze_and_gate_as_configured(pkt_run, teacher_run):
  teacher = final_params(teacher_run)
  after_phase1 = final_params(pkt_run, 4)   # end of layer 1's phase
  after_phase2 = final_params(pkt_run, 8)   # end of layer 2's phase
  # Embeddings and heads: copied from the teacher, then frozen for all of PKT (the embedding
  # norm stays at identity: NoNorm student, LayerNorm teacher).
  for k, v in after_phase2.items():
    if k.startswith(("embeddings/word", "embeddings/position", "embeddings/token_type",
                     "embeddings/embedding_transformation", "cls/")):
      np.testing.assert_array_equal(v, teacher[k], err_msg=k)
  np.testing.assert_array_equal(after_phase2["embeddings/norm/scale"], 1.0)
  # Phase 1 trains layer 1 only; layer 2 has not moved yet.
  init = final_params(pkt_run, 2)
  k = "encoder/layers/ffn_0/intermediate/kernel"
  assert not np.array_equal(init[k][0], after_phase1[k][0])
  np.testing.assert_array_equal(init[k][1], after_phase1[k][1])
  # Phase 2: layer 2 moves, layer 1 keeps training at 0.1 of layer 2's rate.
  assert not np.array_equal(after_phase1[k][1], after_phase2[k][1])
  assert not np.array_equal(after_phase1[k][0], after_phase2[k][0])
  # The teacher run is never written to, and the student's checkpoints hold only the student.
  assert checkpoint_steps(teacher_run) == [4, 8]
  newest = max(os.path.getmtime(f) for f in glob.glob(os.path.join(teacher_run, "checkpoints", "**"),
                                                        recursive=True))
  oldest_student = min(os.path.getmtime(f) for f in glob.glob(os.path.join(pkt_run, "checkpoints", "*")))
  assert newest < oldest_student
  assert set(after_phase2) == set(init)
  assert after_phase2["encoder/layers/intermediate/kernel"].shape[1:] != \
      teacher["encoder/layers/intermediate/kernel"].shape[1:]


def test_pkt_logs_per_layer_transfer_losses_and_stage_banners(pkt_run):
  rows = [r for r in metrics_rows(pkt_run) if "loss" in r]
  phase1 = [r for r in rows if r["step"] <= 4]
  assert all("fmt_loss/layer_01" in r and "at_loss/layer_01" in r for r in phase1)
  pd = [r for r in rows if r["step"] > 8]
  assert all("kd_loss" in r and "mlm_loss" in r for r in pd)
  assert {r["stage"] for r in rows} == {0.0, 1.0, 2.0}
  # param_norm, taken by the loop at log steps: the norm of the parameters at that step.
  last = final_params(pkt_run)
  want = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in last.values()))
  np.testing.assert_allclose(rows[-1]["param_norm"], want, rtol=1e-5)
  assert all(r["param_norm"] > 0 for r in rows)


def test_resume_mid_stage_is_bitwise(pkt_run, tmp_path, cache_dir, teacher_run):
  cut = str(tmp_path / "cut")
  shutil.copytree(pkt_run, cut)
  for step in checkpoint_steps(cut):
    if step > 6:  # keep the mid-phase-2 checkpoint (step 6), drop everything after
      shutil.rmtree(os.path.join(cut, "checkpoints", str(step)))
  os.remove(os.path.join(cut, training.workdir.DONE_FILE))
  launch.run_config(tiny_student_config(cache_dir, teacher_run), cut)
  _assert_same_params(final_params(pkt_run), final_params(cut))
  assert train_losses(cut) == train_losses(pkt_run)


@pytest.mark.slow
def test_a_truncated_phase_updates_only_its_layers_and_equals_the_full_update():
  """`StagePlan.trained` (the first l layers, for truncated phases that reset the optimizer) narrows
  clipping, LAMB, the non-finite guard and the write-back to the first l layer slices. Against
  the same step updating every slice: the same parameters and moments, layers above l
  untouched and their moments zero."""
  import flax.linen as nn
  import optax

  from mbert_jax.training import optim
  from mbert_jax.distill import objective
  from mbert_jax.distill import schedule
  from mbert_jax.models import build, layers, preset

  cfg = preset("mobilebert_micro")  # 4 layers
  model = build(cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(5, cfg.vocab_size, (2, 16)), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
  sc = schedule.default_schedule_config()
  sc.name, sc.steps_per_layer = "pkt", 10
  stage = schedule.build_schedule(sc, cfg.num_hidden_layers)[1]  # phase 2: layers 1-2 run
  assert stage.num_layers == 2 and objective.trained_depth(stage, 4) == 2
  o = optim.default_optimizer_config()
  o.name, o.schedule, o.warmup_steps, o.clip_norm = "lamb", "constant", 0, 1.0
  tx = optim.build_optimizer(o, params, schedule.lr_multiplier_tree(stage, params),
                             lr_schedule=lambda s: jnp.full((), 1e-2, jnp.float32))

  def loss(p, aux, batch, rng):
    out = model.apply({"params": p}, batch["ids"], num_layers=2, heads=False)
    value = jnp.mean(out.hidden_states[-1] ** 2)
    return value, {"loss": value}

  def state0():
    zero = jnp.zeros((), jnp.int32)
    return training.TrainState(step=zero, params=params, opt_state=tx.init(params),
                            nonfinite=zero, skipped=zero)

  finals, write_backs = [], []
  for active in (2, None):
    plan = training.StagePlan(name=stage.name, steps=10, tx=tx, loss=loss,
                           learning_rate=lambda s: 1e-2,
                              trained=objective.first_layers_subset(active))
    raw = training.make_train_step(plan, 0, 1)
    program = jax.make_jaxpr(raw)(state0(), None, {"ids": ids}).jaxpr
    # The narrowed step writes the updated slices (params, mu, nu) back in place.
    write_backs.append(sum(e.primitive.name == "dynamic_update_slice" for e in program.eqns))
    if active:
      # In place means in place: no copy of a whole stacked kernel in the compiled step (a
      # read of the old stacks after the write-back, such as their norm, made XLA copy each).
      # Checked on the program a run executes: XLA's optimisations on (the suite turns most of
      # them off for compile speed, tests/conftest.py).
      before = jax.config.read("jax_disable_most_optimizations")
      jax.config.update("jax_disable_most_optimizations", False)
      try:
        hlo = jax.jit(raw, donate_argnums=0).lower(state0(), None, {"ids": ids}).compile()
      finally:
        jax.config.update("jax_disable_most_optimizations", before)
      copies = re.findall(r"= f32\[4,\d+,\d+\]\S* copy\(", hlo.as_text())
      assert not copies, copies
    step = jax.jit(raw)
    state = state0()
    for _ in range(3):
      state, out = step(state, None, {"ids": ids})
    finals.append(state)
    # A non-finite loss skips the narrowed update too: nothing written back.
    nan_ids = {"ids": ids, "nan": jnp.float32(jnp.nan)}
    bad_plan = dataclasses.replace(plan, loss=lambda p, aux, b, r: jax.tree.map(
        lambda x: x * b["nan"], loss(p, aux, b, r)))
    skipped, bad = jax.jit(training.make_train_step(bad_plan, 0, 1))(state, None, nan_ids)
    assert float(bad["finite"]) == 0.0 and int(skipped.skipped) == 1
    for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(state.params)):
      np.testing.assert_array_equal(a, b)
  narrow, full = finals
  stacked = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(params)
                if "encoder/layers/" in layers.param_path(path))
  assert write_backs == [3 * stacked, 0], write_backs
  for a, b in zip(jax.tree.leaves(narrow.params), jax.tree.leaves(full.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(narrow.opt_state), jax.tree.leaves(full.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  before = params["encoder"]["layers"]["attention"]["query"]["kernel"]
  after = narrow.params["encoder"]["layers"]["attention"]["query"]["kernel"]
  np.testing.assert_array_equal(after[2:], before[2:])
  assert not np.allclose(after[:2], before[:2])
  mu = [x for x in jax.tree.leaves(narrow.opt_state) if np.ndim(x) == 3 and x.shape[0] == 4]
  assert mu and all(not np.any(m[2:]) for m in mu)
  assert optax.tree.norm(narrow.params) > 0
