"""Sweeps: axis helpers, sweep files, emitted launch.py commands, and a tiny real sweep that
runs, reports (also without jax), resumes without redoing finished runs, refuses a changed
config and extends a finished run whose final stage grew."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

from mbert_jax.distill import schedule as schedule_lib
from mbert_jax.sweeps import report as rep
from mbert_jax.sweeps import runner
from mbert_jax.sweeps import sweep as sw

# config_flags loads config files with a loader method Python deprecates; not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KT = os.path.join(ROOT, "experiments", "kt_strategies.py")
KT_RUNS = ("pkt", "pkt_freeze", "jkt", "akt", "pd_only", "scratch", "pkt_no_at", "pkt_no_mean_var")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The runs whose pre-training distillation stage covers the same steps: one cache between them.
SHARED_CACHE_RUNS = ("pkt", "pkt_freeze", "jkt", "pkt_no_at", "pkt_no_mean_var")
TINY_RUNS = ("pkt_freeze", "jkt", "akt", "scratch")  # what the tiny sweep below trains


def _plain(config) -> dict:
  return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))


# ============================================================================ axes

def test_axes_compose_like_flax_sweeps():
  seeds = sw.sweep("train.seed", [0, 1])
  assert seeds == [{"train.seed": 0}, {"train.seed": 1}]
  strategies = sw.zip_(sw.sweep("name", ["a", "b"]), sw.sweep("schedule.name", ["pkt", "jkt"]))
  grid = sw.product(strategies, sw.zip_(sw.sweep("name", ["s0", "s1"]), seeds))
  assert [r["name"] for r in grid] == ["a_s0", "a_s1", "b_s0", "b_s1"]
  assert grid[3] == {"name": "b_s1", "schedule.name": "jkt", "train.seed": 1}


@pytest.mark.parametrize("build, message", [
    (lambda: sw.zip_(sw.sweep("a.b", [1, 2]), sw.sweep("a.c", [1])), "equal length"),
    (lambda: sw.product(sw.sweep("a.b", [1]), sw.sweep("a.b", [2])), "both set 'a.b'"),
    (lambda: sw.product({"a.b": 1}), "list of dicts"),
    (lambda: sw.sweep("a.b", []), "no values"),
])
def test_axes_reject_ambiguous_input(build, message):
  with pytest.raises(sw.SweepError, match=message):
    build()


# ============================================================================ sweep files

def _write_sweep(tmp_path, body: str) -> str:
  path = tmp_path / "my_sweep.py"
  path.write_text(textwrap.dedent("""
      from configs import distill_mobilebert
      from mbert_jax.sweeps import sweep as sw

      def get_config(arg=None):
        c = distill_mobilebert.get_config("smoke")
        c.teacher.checkpoint = "{sweepdir}/no_teacher_here"
        c.data.cache_dir = "{sweepdir}/data_cache"
        return c
      """) + textwrap.dedent(body))
  return str(path)


def test_kt_strategies_spend_equal_total_steps(tmp_path):
  for arg in ("tiny", "smoke", None, "smoke,steps_per_layer=3,distill_steps=7"):
    spec = KT if arg is None else f"{KT}:{arg}"
    sweep_file = sw.SweepFile(spec)
    runs = sweep_file.runs()
    assert tuple(r.name for r in runs) == KT_RUNS
    totals, strategies = set(), {}
    for r in runs:
      c = sw.resolve(r, str(tmp_path))
      stages = schedule_lib.build_schedule(c.schedule, c.model.num_hidden_layers)
      totals.add(schedule_lib.total_steps(stages))
      strategies[r.name] = (c.schedule.name, r.variant, c)
      assert c.teacher.checkpoint == os.path.join(str(tmp_path), "teacher")
      assert c.data.cache_dir == os.path.join(str(tmp_path), "data_cache")
    assert len(totals) == 1, (arg, totals)
    base = strategies["pkt"][2]
    assert totals == {base.model.num_hidden_layers * base.schedule.steps_per_layer
                      + base.schedule.distill_steps}
    assert strategies["pkt_no_at"][:2] == ("pkt", "no_at")
    assert strategies["pkt_no_at"][2].schedule.attention_distill_factor == 0
    no_mv = strategies["pkt_no_mean_var"][2].schedule
    assert (no_mv.beta_distill_factor, no_mv.gamma_distill_factor) == (0, 0)
    assert no_mv.hidden_distill_factor == base.schedule.hidden_distill_factor
    assert strategies["scratch"][2].train.dropout and not base.train.dropout
    assert [s.name for s in sweep_file.setup_runs()] == ["teacher"]
    if arg is None:  # the paper's budget: 24 x 10k PKT + 500k PD
      assert totals == {740_000}


def test_emitted_commands_reproduce_configs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(ROOT)  # emitted commands run from the repo root
  sweepdir = str(tmp_path / "kt")
  assert runner.main([f"--sweep={KT}:smoke", f"--workdir={sweepdir}", "--emit"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  commands = [line for line in lines if not line.startswith("#")]
  # The teacher, the one shared teacher cache, then every run.
  assert len(commands) == 2 + len(KT_RUNS)
  sweep_file = sw.SweepFile(f"{KT}:smoke")
  expected = {r.name: r for r in sweep_file.all_runs()}
  cache_dir = os.path.join(sweepdir, "teacher_cache")

  def parse(argv):  # exactly as launch.py does: a fresh flag registry with config_flags
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(argv)
    return fv.config.copy_and_resolve_references(), fv.workdir

  writer = shlex.split(commands[1])
  assert writer[:3] == ["python", "-m", "mbert_jax.teacher_cache"]
  config, workdir = parse(writer[2:])
  assert workdir == cache_dir and config.schedule.teacher_cache == cache_dir
  assert _plain(config) == _plain(sw.resolve(expected["pkt"], sweepdir))  # the first reader's
  for command in commands[:1] + commands[2:]:
    argv = shlex.split(command)
    assert argv[:2] == ["python", "launch.py"]
    config, workdir = parse(argv[1:])
    name = os.path.basename(workdir)
    assert os.path.dirname(workdir) == sweepdir
    want = sw.resolve(expected.pop(name), sweepdir)
    assert _plain(config) == _plain(want), name
    reads = config.schedule.get("teacher_cache", "")
    assert reads == (cache_dir if name in SHARED_CACHE_RUNS else ""), name
  assert not expected  # every run got a command
  manifest = json.load(open(os.path.join(sweepdir, rep.MANIFEST)))
  assert [e["name"] for e in manifest["runs"]] == ["teacher", *KT_RUNS]
  assert manifest["runs"][0]["setup"] and manifest["runs"][1]["strategy"] == "pkt"
  assert manifest["teacher_caches"] == {cache_dir: list(SHARED_CACHE_RUNS)}


def test_kt_strategies_without_a_cache_run_every_teacher_online(tmp_path):
  runs = sw.SweepFile(f"{KT}:smoke,cache_k=0").runs()
  assert runner.teacher_caches(runs, str(tmp_path)) == {}
  for r in runs:
    assert not sw.resolve(r, str(tmp_path)).schedule.teacher_cache, r.name
  with pytest.raises(ValueError, match="cache_k=-1 must be >= 0"):
    sw.SweepFile(f"{KT}:smoke,cache_k=-1").runs()


def test_sweep_file_with_auto_names_and_tuples_round_trips(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a relative --sweep path is read from the current directory
  _write_sweep(tmp_path, """
      def get_sweep(arg=None):
        return sw.product(sw.sweep("schedule.name", ["pkt", "jkt"]),
                          sw.sweep("mesh.logical_axis_rules", [(), (("batch", "data"),)]))
      """)
  sweep_file = sw.SweepFile("my_sweep.py")
  names = [r.name for r in sweep_file.runs()]
  assert len(set(names)) == 4 and names[0].startswith("name=pkt_logical_axis_rules=")
  lines = runner.emit(sweep_file, str(tmp_path / "out"))
  assert sum(not line.startswith("#") for line in lines) == 4
  assert "--config.mesh.logical_axis_rules=" in "\n".join(lines)


@pytest.mark.parametrize("body, message", [
    ("def get_sweep(arg=None): return [{'name': 'a', 'schedule.nmae': 'pkt'}]",
     "'schedule.nmae' is not a field of the base config"),
    ("def get_sweep(arg=None): return [{'name': 'a', 'schedule.nmae': 'pkt'}]",
     "did you mean schedule.name?"),
    # Distillation stages take their learning rate from schedule.*, not train.*.
    ("def get_sweep(arg=None): return [{'name': 'a', 'train.learning_rate': 1e-3}]",
     "did you mean schedule.learning_rate?"),
    ("def get_sweep(arg=None): return [{'name': 'a', 'train.steps': 'many'}]",
     "cannot set train.steps='many'"),
    ("def get_sweep(arg=None): return [{'name': 'a', 'train.steps': None}]",
     "cannot be passed as a launch.py flag"),
    ("def get_sweep(arg=None): return [{'name': 'a/b', 'train.steps': 3}]", "must match"),
    ("def get_sweep(arg=None): return [{'name': 'a'}, {'name': 'a'}]", "used twice"),
    ("def get_sweep(arg=None): return []", "non-empty list"),
    ("def get_sweep(arg=None): return [{'name': 'a'}]\n"
     "def get_setup(arg=None): return [{'name': 't'}]", "needs 'config'"),
])
def test_bad_sweep_files_fail_clearly(tmp_path, capsys, body, message):
  path = _write_sweep(tmp_path, body)
  assert runner.main([f"--sweep={path}", f"--workdir={tmp_path / 'out'}", "--emit"]) == 2
  assert message in capsys.readouterr().err


def test_only_names_unknown_runs(tmp_path, capsys):
  assert runner.main([f"--sweep={KT}:tiny", f"--workdir={tmp_path}", "--emit", "--only=pkt,pkk"]) == 2
  assert "unknown run(s) ['pkk']" in capsys.readouterr().err


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path):
  path = _write_sweep(tmp_path, """
      def get_sweep(arg=None):
        return [{"name": "bad_dtype", "train.compute_dtype": "float64"},
                {"name": "no_teacher", "schedule.name": "jkt"}]
      """)
  sweepdir = tmp_path / "out"
  assert runner.main([f"--sweep={path}", f"--workdir={sweepdir}"]) == 1
  for name, error in (("bad_dtype", "compute_dtype"), ("no_teacher", "no_teacher_here")):
    assert error in (sweepdir / name / rep.ERROR_FILE).read_text()
  rows = list(csv.DictReader(open(sweepdir / "results.csv")))
  assert [(r["name"], r["status"]) for r in rows] == [("bad_dtype", "failed"),
                                                      ("no_teacher", "failed")]


def test_stage_boundaries_follow_the_saved_schedule(tmp_path):
  """Read back from a run's config.json, as the training loop saves it."""
  sweepdir = str(tmp_path)
  runs = {r.name: r for r in sw.SweepFile(f"{KT}:tiny").runs()}
  for name, want in (("pkt", [(2, "pkt_layer_2"), (4, "pd")]), ("jkt", [(4, "pd")]),
                     ("akt", [])):
    os.makedirs(os.path.join(sweepdir, name))
    with open(os.path.join(sweepdir, name, "config.json"), "w") as f:
      json.dump(sw.resolve(runs[name], sweepdir).to_dict(), f, default=str)
    assert rep.stage_boundaries(os.path.join(sweepdir, name)) == want, name


# ============================================================================ a real tiny sweep

class _Spy:
  """Records which run directories reach the real training loop, and what each call of the
  real teacher-cache writer did."""

  def __init__(self, monkeypatch):
    from mbert_jax.distill import teacher_cache
    from mbert_jax import launch
    self.calls: list[str] = []
    self.cache_reports: list[dict] = []
    real_run, real_write = launch.run_config, teacher_cache.write_cache

    def run_spy(config, workdir):
      self.calls.append(os.path.basename(workdir))
      return real_run(config, workdir)

    def write_spy(config, workdir, **kw):
      self.cache_reports.append(real_write(config, workdir, **kw))
      return self.cache_reports[-1]
    monkeypatch.setattr(launch, "run_config", run_spy)
    monkeypatch.setattr(teacher_cache, "write_cache", write_spy)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  sweepdir = str(tmp_path_factory.mktemp("kt_tiny"))
  with pytest.MonkeyPatch.context() as mp:
    spy = _Spy(mp)
    rc = runner.main([f"--sweep={KT}:tiny", f"--workdir={sweepdir}", f"--only={','.join(TINY_RUNS)}"])
  return sweepdir, rc, spy


def _rows(sweepdir):
  with open(os.path.join(sweepdir, "results.csv")) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_sweep_runs_setup_then_selected_runs(tiny_sweep):
  sweepdir, rc, spy = tiny_sweep
  calls = spy.calls
  assert rc == 0
  assert calls == ["teacher", *TINY_RUNS]
  for name in calls:
    final = json.load(open(os.path.join(sweepdir, name, "final.json")))
    assert final["status"] == "completed" and final["step"] == 6, name
  # One data cache for the whole sweep, not one per run.
  assert os.listdir(os.path.join(sweepdir, "data_cache"))
  assert not any(os.path.exists(os.path.join(sweepdir, n, "data_cache")) for n in calls)


@pytest.mark.slow
def test_the_shared_teacher_cache_is_written_once_and_read_by_each_run(tiny_sweep):
  sweepdir, _, spy = tiny_sweep
  cache_dir = os.path.join(sweepdir, "teacher_cache")
  # pkt_freeze's config computes every shard; jkt's finds them all and only checks its key.
  first, second = spy.cache_reports
  assert first["directory"] == second["directory"] == cache_dir
  assert first["cells_written"] >= 1 and first["steps_computed"] == 2
  assert second["cells_written"] == 0 and second["steps_computed"] == 0
  assert first["steps"] == second["steps"] == [4, 6]  # the PD stage of both: 2 x 2 PKT steps
  written = json.load(open(os.path.join(cache_dir, "writer_report.json")))
  assert written["cells_written"] == first["cells_written"]
  for name in ("pkt_freeze", "jkt"):
    final = json.load(open(os.path.join(sweepdir, name, "final.json")))
    assert final["teacher_cache"] == cache_dir, name
  for name in ("akt", "scratch"):  # layer-wise terms to the end / no teacher: online
    final = json.load(open(os.path.join(sweepdir, name, "final.json")))
    assert not final.get("teacher_cache"), name


@pytest.mark.slow
def test_results_table_and_plots(tiny_sweep):
  sweepdir = tiny_sweep[0]
  rows = _rows(sweepdir)
  assert tuple(rows[0].keys()) == rep.COLUMNS
  assert [r["name"] for r in rows] == list(KT_RUNS)
  by_name = {r["name"]: r for r in rows}
  for name in TINY_RUNS:
    r = by_name[name]
    final = json.load(open(os.path.join(sweepdir, name, "final.json")))
    assert r["status"] == "completed" and int(r["steps"]) == 6
    assert float(r["mlm_accuracy"]) == pytest.approx(final["eval"]["eval/mlm_accuracy"])
    assert float(r["mlm_loss"]) == pytest.approx(final["eval"]["eval/mlm_loss"])
    assert 0.0 <= float(r["mlm_accuracy"]) <= 1.0 and float(r["train_loss"]) > 0
    assert float(r["wall_seconds"]) > 0
  assert by_name["akt"]["strategy"] == "akt"
  assert 0 <= float(by_name["akt"]["teacher_agreement"]) <= 1
  assert by_name["scratch"]["teacher_agreement"] == ""  # no teacher, no agreement
  assert by_name["pkt_no_at"]["variant"] == "no_at" and by_name["pkt_no_at"]["status"] == "pending"
  md = open(os.path.join(sweepdir, "results.md")).read()
  table = [line for line in md.splitlines() if line.startswith("|")]
  assert len(table) == 2 + len(KT_RUNS)
  assert "Set-up run `teacher`: completed, 6 steps" in md
  for png in ("loss_curves.png", "final_accuracy.png"):
    with open(os.path.join(sweepdir, png), "rb") as f:
      data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, png


@pytest.mark.slow
def test_report_mode_rebuilds_from_disk(tiny_sweep, capsys):
  sweepdir = tiny_sweep[0]
  before = open(os.path.join(sweepdir, "results.csv")).read()
  for f in ("results.csv", "results.md", "loss_curves.png", "final_accuracy.png"):
    os.remove(os.path.join(sweepdir, f))
  assert runner.main(["--report", f"--workdir={sweepdir}"]) == 0
  assert open(os.path.join(sweepdir, "results.csv")).read() == before
  assert os.path.exists(os.path.join(sweepdir, "loss_curves.png"))


@pytest.mark.slow
def test_report_needs_no_jax(tiny_sweep):
  """`--report` runs where no accelerator stack is installed: the CLI, run as a module in a
  fresh interpreter, rebuilds the table without importing jax."""
  sweepdir = tiny_sweep[0]
  before = open(os.path.join(sweepdir, "results.csv")).read()
  os.remove(os.path.join(sweepdir, "results.csv"))
  script = textwrap.dedent("""
      import runpy, sys
      sys.argv = ["mbert_jax.sweep", "--report", "--workdir=" + sys.argv[1]]
      try:
        runpy.run_module("mbert_jax.sweep", run_name="__main__", alter_sys=True)
      except SystemExit as e:
        code = e.code
      heavy = sorted(m for m in sys.modules
                     if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax"))
      print("heavy:", heavy)
      sys.exit(code)
      """)
  out = subprocess.run([sys.executable, "-c", script, sweepdir], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "heavy: []" in out.stdout, out.stdout
  assert open(os.path.join(sweepdir, "results.csv")).read() == before


@pytest.mark.slow
def test_rerun_resumes_only_the_unfinished_run(tiny_sweep, monkeypatch):
  sweepdir = tiny_sweep[0]
  finished = {n: os.path.getmtime(os.path.join(sweepdir, n, "final.json"))
              for n in ("teacher", "akt")}
  # Interrupt `scratch` after its step-4 checkpoint: no final.json, no step-6 checkpoint.
  os.remove(os.path.join(sweepdir, "scratch", "final.json"))
  shutil.rmtree(os.path.join(sweepdir, "scratch", "checkpoints", "6"))
  spy = _Spy(monkeypatch)
  assert runner.main([f"--sweep={KT}:tiny", f"--workdir={sweepdir}", "--only=akt,scratch"]) == 0
  assert spy.calls == ["scratch"]
  for n, mtime in finished.items():
    assert os.path.getmtime(os.path.join(sweepdir, n, "final.json")) == mtime, n
  final = json.load(open(os.path.join(sweepdir, "scratch", "final.json")))
  assert final["status"] == "completed" and final["step"] == 6
  logged = [r["step"] for r in rep.read_metrics(os.path.join(sweepdir, "scratch")) if "loss" in r]
  assert logged.count(4) == 1 and logged.count(5) == 2  # steps 5-6 trained again from step 4
  wall = json.load(open(os.path.join(sweepdir, "scratch", rep.WALL_FILE)))
  assert wall["sessions"] == 2
  assert {r["name"]: r["status"] for r in _rows(sweepdir)}["scratch"] == "completed"


@pytest.mark.slow
def test_changed_config_is_refused_before_anything_is_written(tiny_sweep, capsys):
  sweepdir = tiny_sweep[0]
  manifest = open(os.path.join(sweepdir, rep.MANIFEST)).read()
  # steps_per_layer is part of every student's identity (a longer final stage is not: see
  # the next test).
  assert runner.main([f"--sweep={KT}:tiny,steps_per_layer=3", f"--workdir={sweepdir}",
                  "--only=akt"]) == 2
  err = capsys.readouterr().err
  assert "holds a run of a different config" in err
  assert "schedule.steps_per_layer: 2 in the workdir, 3 now" in err
  # The first run in the sweep's order whose directory holds checkpoints is named.
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: run 'pkt_freeze'")
  assert open(os.path.join(sweepdir, rep.MANIFEST)).read() == manifest


@pytest.mark.slow
def test_a_longer_final_stage_extends_a_finished_run(tiny_sweep, monkeypatch):
  """The loop resumes a checkpoint under a longer final stage, so the sweep re-opens a finished
  run whose config asks for one instead of reporting its old result."""
  sweepdir = tiny_sweep[0]
  spy = _Spy(monkeypatch)
  assert runner.main([f"--sweep={KT}:tiny,distill_steps=3", f"--workdir={sweepdir}",
                  "--only=akt"]) == 0
  assert spy.calls == ["akt"]  # the teacher's config did not change: still skipped
  final = json.load(open(os.path.join(sweepdir, "akt", "final.json")))
  assert final["status"] == "completed" and final["step"] == 7
  logged = [r["step"] for r in rep.read_metrics(os.path.join(sweepdir, "akt")) if "loss" in r]
  assert logged[-1] == 7 and logged.count(6) == 1  # resumed at step 6, not trained again
  assert {r["name"]: r["steps"] for r in _rows(sweepdir)}["akt"] == "7"
