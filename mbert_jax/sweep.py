"""Sweeps: one base config, a list of named override sets, run in turn or emitted as commands.

    python -m mbert_jax.sweep --sweep=experiments/kt_strategies.py:smoke --workdir=runs/kt
    python -m mbert_jax.sweep --sweep=experiments/kt_strategies.py --workdir=/ckpt/kt --emit
    python -m mbert_jax.sweep --report --workdir=runs/kt

A sweep file is a config file (`get_config(arg)` returns the base ConfigDict, so launch.py can
load it too) with two more functions:

  get_sweep(arg) -> list of runs. A run is a dict of dotted config overrides plus 'name' (its
      directory under the sweep dir) and optionally 'variant' (a label for the results table).
      Build the list with `sweep`, `product` and `zip_` (big_vision's get_hyper, Flax sweeps).
  get_setup(arg) -> list of set-up runs that must finish first, e.g. the teacher. Each is a dict
      with 'name', 'config' (a config file `path[:arg]`, relative to the repo root) and dotted
      overrides.

`{sweepdir}` in any string (a base-config field or an override) stands for the absolute sweep
directory, so runs can name a set-up run's output (`{sweepdir}/teacher`). Every run goes
through the one training loop (`mbert_jax.train.run_config`) and resumes: a finished run
(`final.json`) is skipped, a half-done one continues from its own checkpoints. A run directory
whose checkpoints belong to another run (the loop's identity: model, schedule, data, seeds) is
refused before anything is written; a change the checkpoints do not depend on (a longer final
stage, logging) resumes, and re-opens a finished run. The results table and plots
(mbert_jax/sweep_report.py) are rebuilt from what is on disk after each run and by `--report`.

Overrides are restricted to values a launch.py flag can carry (bool, int, float, str, tuples of
those) and `--emit` parses every command back through ml_collections' config_flags, so an
emitted command and an in-process run always train the same config.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
import traceback
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
from ml_collections.config_flags import config_path

from mbert_jax import cli
from mbert_jax import config_files
from mbert_jax import workdir as workdir_lib
from mbert_jax.config_files import REPO_ROOT, split_ref
from mbert_jax.sweep_report import (DEFAULT_VARIANT, ERROR_FILE, MANIFEST, WALL_FILE,
                                    boundaries_of, read_json_if_any, report_paths, write_report)

SWEEPDIR = "{sweepdir}"
META_KEYS = ("name", "variant")
# Names become directories next to these entries of the sweep dir.
RESERVED_NAMES = ("data_cache", "xla_cache", "teacher_cache")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+=-]*$")
_SCALARS = (bool, int, float, str)


class SweepError(ValueError):
  """A sweep file, run or sweep directory that cannot work as given."""


# ============================================================================ building sweeps

def _check_axis(axis: Any, what: str) -> list[dict]:
  if isinstance(axis, Mapping) or not isinstance(axis, Sequence) or isinstance(axis, str):
    raise SweepError(f"{what} must be a list of dicts, got {type(axis).__name__}")
  for i, item in enumerate(axis):
    if not isinstance(item, Mapping):
      raise SweepError(f"{what}[{i}] must be a dict of overrides, got {type(item).__name__}")
  return [dict(item) for item in axis]


def _merge(parts: Iterable[Mapping[str, Any]]) -> dict:
  """Merges one entry of each axis. Names join with '_' so `product` of named axes stays named;
  any other key set by two axes is ambiguous."""
  out: dict[str, Any] = {}
  for part in parts:
    for key, value in part.items():
      if key == "name" and "name" in out:
        out["name"] = f"{out['name']}_{value}"
      elif key in out:
        raise SweepError(f"two axes both set {key!r} ({out[key]!r} and {value!r})")
      else:
        out[key] = value
  return out


def sweep(key: str, values: Iterable[Any]) -> list[dict]:
  """One axis: `sweep('train.seed', [0, 1])` -> [{'train.seed': 0}, {'train.seed': 1}]."""
  if not isinstance(key, str) or not key:
    raise SweepError(f"sweep key must be a non-empty string, got {key!r}")
  values = list(values)
  if not values:
    raise SweepError(f"sweep({key!r}, ...) got no values")
  return [{key: v} for v in values]


def product(*axes: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Every combination of the axes' entries (the first axis varies slowest)."""
  checked = [_check_axis(a, f"product axis {i}") for i, a in enumerate(axes)]
  return [_merge(combo) for combo in itertools.product(*checked)]


def zip_(*axes: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Entry i of every axis together; the axes must have equal lengths."""
  checked = [_check_axis(a, f"zip_ axis {i}") for i, a in enumerate(axes)]
  lengths = [len(a) for a in checked]
  if len(set(lengths)) > 1:
    raise SweepError(f"zip_ needs axes of equal length, got lengths {lengths}")
  return [_merge(parts) for parts in zip(*checked)]


# ============================================================================ runs

@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a config file reference and the overrides applied to it."""
  name: str
  config_ref: str                       # `path[:arg]`, path absolute
  overrides: tuple[tuple[str, Any], ...]
  variant: str = DEFAULT_VARIANT
  setup: bool = False


def _value_ok(value: Any) -> bool:
  if isinstance(value, _SCALARS):
    return not (isinstance(value, float) and math.isnan(value))
  return isinstance(value, tuple) and all(_value_ok(v) for v in value)


def _auto_name(overrides: Sequence[tuple[str, Any]]) -> str:
  parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides]
  return re.sub(r"[^A-Za-z0-9_+=-]", "-", "_".join(parts)) or "base"


def _make_run(spec: Any, index: int, config_ref: str, setup: bool) -> Run:
  kind = "set-up run" if setup else "run"
  if not isinstance(spec, Mapping):
    raise SweepError(f"{kind} {index} must be a dict, got {type(spec).__name__}")
  spec = dict(spec)
  if setup:
    ref = spec.pop("config", None)
    if not isinstance(ref, str) or not ref:
      raise SweepError(f"set-up run {index} ({spec.get('name')!r}) needs 'config': a config file "
                       "`path[:arg]` relative to the repo root")
    config_ref = _absolute_ref(ref)
  name = spec.pop("name", None)
  variant = spec.pop("variant", DEFAULT_VARIANT)
  overrides = []
  for key, value in spec.items():
    if not isinstance(key, str) or not key or key.startswith(".") or key.endswith("."):
      raise SweepError(f"{kind} {index}: override key {key!r} is not a dotted config path")
    if not _value_ok(value):
      raise SweepError(
          f"{kind} {index}: override {key}={value!r} ({type(value).__name__}) cannot be passed "
          "as a launch.py flag; use a bool, int, float, str or a tuple of those")
    overrides.append((key, value))
  if name is None:
    name = _auto_name(overrides)
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise SweepError(f"{kind} {index}: name {name!r} must match {_NAME_RE.pattern} (it becomes a "
                     "directory and --only splits on commas)")
  if name in RESERVED_NAMES:
    raise SweepError(f"{kind} {index}: name {name!r} is reserved in the sweep dir")
  if not isinstance(variant, str) or not variant:
    raise SweepError(f"{kind} {index} ({name}): variant must be a non-empty string, "
                     f"got {variant!r}")
  return Run(name=name, config_ref=config_ref, overrides=tuple(overrides), variant=variant,
             setup=setup)


def _absolute_ref(ref: str, base: str = REPO_ROOT) -> str:
  path, arg = split_ref(ref)
  path = path if os.path.isabs(path) else os.path.join(base, path)
  return os.path.normpath(path) + ("" if arg is None else f":{arg}")


class SweepFile:
  """A loaded sweep file: its base config, set-up runs and runs."""

  def __init__(self, spec: str, cwd: str | None = None):
    path, _ = split_ref(spec)
    if not path.endswith(".py"):
      raise SweepError(f"--sweep must name a .py file (`path[:arg]`), got {spec!r}")
    self.ref = _absolute_ref(spec, base=cwd or os.getcwd())
    self.path, self.arg = split_ref(self.ref)
    if not os.path.isfile(self.path):
      raise SweepError(f"sweep file {self.path} does not exist")
    self.module = config_files.load_module(self.path, "sweep_")
    for fn in ("get_config", "get_sweep"):
      if not callable(getattr(self.module, fn, None)):
        raise SweepError(f"sweep file {self.path} must define {fn}(arg)")

  def _call(self, fn: str):
    f = getattr(self.module, fn)
    return f() if self.arg is None else f(self.arg)

  def setup_runs(self) -> list[Run]:
    if not callable(getattr(self.module, "get_setup", None)):
      return []
    specs = self._call("get_setup")
    if not isinstance(specs, (list, tuple)):
      raise SweepError(f"{self.path}:get_setup must return a list, got {type(specs).__name__}")
    return [_make_run(s, i, "", setup=True) for i, s in enumerate(specs)]

  def runs(self) -> list[Run]:
    specs = self._call("get_sweep")
    if not isinstance(specs, (list, tuple)) or not specs:
      raise SweepError(f"{self.path}:get_sweep must return a non-empty list of runs")
    runs = [_make_run(s, i, self.ref, setup=False) for i, s in enumerate(specs)]
    seen: set[str] = set()
    for r in self.setup_runs() + runs:
      if r.name in seen:
        raise SweepError(f"run name {r.name!r} is used twice in {self.path}")
      seen.add(r.name)
    return runs

  def all_runs(self) -> list[Run]:
    return self.setup_runs() + self.runs()


# ============================================================================ resolving configs

def _substitute(value: Any, sweepdir: str) -> Any:
  if isinstance(value, str):
    return value.replace(SWEEPDIR, sweepdir)
  if isinstance(value, tuple):
    return tuple(_substitute(v, sweepdir) for v in value)
  return value


def _contains_placeholder(value: Any) -> bool:
  if isinstance(value, str):
    return SWEEPDIR in value
  if isinstance(value, (tuple, list)):
    return any(_contains_placeholder(v) for v in value)
  return False


def flag_items(run: Run, base: ml_collections.ConfigDict, sweepdir: str) -> list[tuple[str, Any]]:
  """The (key, value) settings that turn `base` into this run's config: the overrides, then
  every base field that names `{sweepdir}` (launch.py knows no such placeholder)."""
  items = [(k, _substitute(v, sweepdir)) for k, v in run.overrides]
  overridden = {k for k, _ in run.overrides}
  for key in config_files.field_paths(base):
    value = config_path.get_value(key, base)
    if key not in overridden and _contains_placeholder(value):
      if isinstance(value, list):
        raise SweepError(f"{run.name}: base field {key} is a list naming {SWEEPDIR}; lists "
                         "cannot be passed as launch.py flags, use a tuple")
      items.append((key, _substitute(value, sweepdir)))
  return items


def _apply(config: ml_collections.ConfigDict, items: Sequence[tuple[str, Any]], run: Run) -> None:
  for key, value in items:
    if not config_files.has_field(config, key):
      # Worded as launch.py words a bad --config.* flag, naming the field most likely meant.
      where = f"run {run.name!r}: {key!r} is not a field of the base config {run.config_ref}"
      raise SweepError(config_files.unknown_field_message(config, key, where))
    try:
      # config_path.set_value is what config_flags calls, so FieldReferences propagate alike.
      config_path.set_value(key, config, value)
    except (TypeError, ValueError) as e:
      raise SweepError(f"run {run.name!r}: cannot set {key}={value!r}: {e}") from None


def resolve(run: Run, sweepdir: str) -> ml_collections.ConfigDict:
  """The run's final config: base + overrides, `{sweepdir}` filled in, references resolved."""
  sweepdir = os.path.abspath(sweepdir)
  base = config_files.load_config(run.config_ref)
  items = flag_items(run, base, sweepdir)
  _apply(base, items, run)
  return base.copy_and_resolve_references()


# ============================================================================ emitting commands

def _flag_text(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, str):
    return value
  return repr(value)  # tuples: config_flags' TupleParser reads Python literals


def _display_path(path: str) -> str:
  """Repo-relative when inside the repo (commands run from the repo root, as launch.py's own
  examples do), absolute otherwise."""
  rel = os.path.relpath(path, REPO_ROOT)
  return path if rel.startswith("..") else rel


def command_args(run: Run, sweepdir: str) -> list[str]:
  sweepdir = os.path.abspath(sweepdir)
  path, arg = split_ref(run.config_ref)
  config = _display_path(path) + ("" if arg is None else f":{arg}")
  base = config_files.load_config(run.config_ref)
  args = ["launch.py", f"--config={config}", f"--workdir={os.path.join(sweepdir, run.name)}"]
  args += [f"--config.{k}={_flag_text(v)}" for k, v in flag_items(run, base, sweepdir)]
  return args


def launch_command(run: Run, sweepdir: str, python: str = "python") -> str:
  return " ".join([python] + [shlex.quote(a) for a in command_args(run, sweepdir)])


def parse_launch_args(args: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
  """Parses launch.py arguments exactly as launch.py does (config_flags, lock_config=True).
  Paths are read relative to the repo root, where the commands run."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  argv = ["launch.py"] + [a for a in args if a != "launch.py"]
  argv = [_absolute_config_flag(a) for a in argv]
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
  fv(argv)
  return fv.config, fv.workdir


def _absolute_config_flag(arg: str) -> str:
  if arg.startswith("--config="):
    return "--config=" + _absolute_ref(arg[len("--config="):])
  return arg


def _plain(config: ml_collections.ConfigDict) -> Any:
  # JSON normalises tuples vs lists, the one difference a flag round trip may introduce.
  return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))


def _check_args(run: Run, args: Sequence[str], sweepdir: str, want_workdir: str) -> None:
  """Refuses emitted arguments that would not reproduce the in-process config and workdir."""
  parsed, workdir = parse_launch_args(args)
  expected = resolve(run, sweepdir)
  got = parsed.copy_and_resolve_references()
  if _plain(got) != _plain(expected):
    diff = _diff(_plain(expected), _plain(got))
    raise SweepError(f"run {run.name!r}: the emitted command does not reproduce its config: "
                     f"{diff[:5]}")
  if os.path.abspath(workdir) != os.path.abspath(want_workdir):
    raise SweepError(f"run {run.name!r}: emitted workdir {workdir} is not {want_workdir}")


def check_round_trip(run: Run, sweepdir: str) -> str:
  """The launch.py command for `run`, after checking it reproduces the in-process config."""
  _check_args(run, command_args(run, sweepdir), sweepdir,
              os.path.join(os.path.abspath(sweepdir), run.name))
  return launch_command(run, sweepdir)


def cache_command(run: Run, directory: str, sweepdir: str, python: str = "python") -> str:
  """The teacher-cache writer's command for the cache `run` reads (the writer takes the run's
  own config and flags; only --workdir names the cache directory), checked like a run's."""
  _, config_flag, _, *flag_args = command_args(run, sweepdir)
  args = [config_flag, f"--workdir={directory}", *flag_args]
  _check_args(run, args, sweepdir, directory)
  return " ".join([python, "-m", "mbert_jax.teacher_cache"] + [shlex.quote(a) for a in args])


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else k)
    return out
  return [] if a == b else [f"{path}: {a!r} != {b!r}"]


# ============================================================================ teacher caches

def teacher_caches(runs: Sequence[Run], sweepdir: str) -> dict[str, list[Run]]:
  """{cache directory: the runs whose pre-training distillation stage reads it}, in run order.
  Runs naming one directory share one cache: their PD stages see the same batches (the
  pipeline is step-indexed), which the cache's identity key checks for each of them."""
  from mbert_jax.teacher_cache import cache_dir_of  # numpy only: --emit needs no jax
  groups: dict[str, list[Run]] = {}
  for r in runs:
    directory = "" if r.setup else cache_dir_of(resolve(r, sweepdir))
    if directory:
      groups.setdefault(os.path.abspath(directory), []).append(r)
  return groups


def build_teacher_caches(runs: Sequence[Run], sweepdir: str, log=print) -> dict[str, list[str]]:
  """Writes each cache the runs read, once, after the set-up runs (the teacher) and before the
  runs. Every reader's config goes through the writer: the first computes the shards, the
  rest only check that the cache's key is theirs (and fill steps a longer run needs), so a
  run that names a cache built for other data is refused here, naming the field, before any
  run trains. Returns {directory: reader names}."""
  from mbert_jax import teacher_cache
  groups = teacher_caches(runs, sweepdir)
  for directory, readers in groups.items():
    log(f"[teacher cache] {directory}: read by {', '.join(r.name for r in readers)}")
    for r in readers:
      config = resolve(r, sweepdir)
      try:
        report = teacher_cache.write_cache(
            config, directory, progress=bool(config.train.get("progress_bar", True)))
      except (ValueError, FileNotFoundError) as e:
        raise SweepError(f"run {r.name!r}: {e}") from None
      if report["cells_written"]:
        workdir_lib.write_json(os.path.join(directory, teacher_cache.WRITER_REPORT), report)
      log(f"[teacher cache] {r.name}: {teacher_cache.summary(report)}")
  return {d: [r.name for r in readers] for d, readers in groups.items()}


# ============================================================================ running

def _stage_layout(config: ml_collections.ConfigDict) -> list[tuple[int, str]] | None:
  if "schedule" not in config:
    return []  # fine-tuning: one stage
  return boundaries_of(config.schedule, config.model.num_hidden_layers)


def write_manifest(sweep_file: SweepFile, runs: Sequence[Run], sweepdir: str,
                   commands: Mapping[str, str] | None = None) -> str:
  """`sweep.json`: which directories are runs, their strategy labels, stage boundaries and
  commands; --report reads it, so a sweep run by a cluster scheduler gets the same table and
  the report needs no jax to lay out the stages."""
  os.makedirs(sweepdir, exist_ok=True)
  entries = []
  for r in runs:
    cfg = resolve(r, sweepdir)
    entries.append({
        "name": r.name, "variant": r.variant, "setup": r.setup,
        "config": r.config_ref, "overrides": [[k, v] for k, v in r.overrides],
        "strategy": str(cfg.schedule.name) if "schedule" in cfg else "",
        "stage_boundaries": _stage_layout(cfg),
        "command": (commands or {}).get(r.name) or launch_command(r, sweepdir),
    })
  caches = {d: [r.name for r in readers] for d, readers in teacher_caches(runs, sweepdir).items()}
  path = os.path.join(sweepdir, MANIFEST)
  workdir_lib.write_json(path, {"sweep": sweep_file.ref, "runs": entries,
                                "teacher_caches": caches}, all_processes=True)
  return path


def _check_identity(run: Run, run_dir: str, config: ml_collections.ConfigDict) -> None:
  """A run directory only resumes checkpoints of its own identity (what the training loop's
  workdir claim checks, here without writing anything). A directory without checkpoints has
  nothing to protect."""
  if not workdir_lib.has_checkpoints(run_dir):
    return
  stored = read_json_if_any(os.path.join(run_dir, workdir_lib.IDENTITY_FILE))
  if stored is None:
    raise SweepError(
        f"run {run.name!r}: {run_dir} holds checkpoints but no {workdir_lib.IDENTITY_FILE}, so "
        "they cannot be checked against this run; use a fresh --workdir or delete that directory")
  from mbert_jax import train  # imports jax; only resumed runs get here
  try:
    identity = train.task_for(config).identity()
  except (ValueError, FileNotFoundError) as e:
    raise SweepError(f"run {run.name!r}: {e}") from None
  diffs = workdir_lib.identity_differences(stored, identity)
  if diffs:
    raise SweepError(
        f"run {run.name!r}: {run_dir} holds a run of a different config ({'; '.join(diffs[:3])}"
        f"{f'; and {len(diffs) - 3} more' if len(diffs) > 3 else ''}); use a fresh --workdir "
        "or delete that directory")


def check_sweepdir(runs: Sequence[Run], sweepdir: str) -> None:
  """Refuses, before anything is written, a sweep dir whose runs were started with other
  configs (e.g. the same --workdir with a different sweep argument)."""
  for r in runs:
    _check_identity(r, os.path.join(os.path.abspath(sweepdir), r.name), resolve(r, sweepdir))


def changes_since_finished(run_dir: str, config: ml_collections.ConfigDict) -> list[str] | None:
  """None for a run that has not finished; else the config fields changed since it did. The
  identity being checked, those are fields the checkpoints do not depend on (a longer final
  stage, logging): the loop resumes such a run, so its report follows the config asked for."""
  if not workdir_lib.is_finished(run_dir):
    return None
  stored = read_json_if_any(os.path.join(run_dir, workdir_lib.CONFIG_FILE))
  return [] if stored is None else workdir_lib.identity_differences(stored, config.to_dict())


def _add_wall(run_dir: str, seconds: float) -> None:
  # The loop's wall_seconds covers only the session that finished; a resumed run's cost is the
  # sum over its sessions.
  path = os.path.join(run_dir, WALL_FILE)
  prev = read_json_if_any(path) or {"seconds": 0.0, "sessions": 0}
  workdir_lib.write_json(path, {"seconds": prev["seconds"] + seconds,
                                "sessions": prev["sessions"] + 1}, all_processes=True)


def run_one(run: Run, sweepdir: str, log=print) -> dict | None:
  """Runs (or resumes, or skips) one run; returns its report, None if it was already done."""
  run_dir = os.path.join(os.path.abspath(sweepdir), run.name)
  config = resolve(run, sweepdir)
  _check_identity(run, run_dir, config)  # again: another process may have started it since
  changes = changes_since_finished(run_dir, config)
  if changes == []:
    log(f"[{run.name}] finished earlier in {run_dir}; skipping")
    return None
  if changes:
    log(f"[{run.name}] finished earlier in {run_dir} with another config "
        f"({'; '.join(changes[:3])}); resuming")
  os.makedirs(run_dir, exist_ok=True)
  error_path = os.path.join(run_dir, ERROR_FILE)
  if os.path.exists(error_path):
    os.remove(error_path)
  log(f"[{run.name}] running in {run_dir}")
  from mbert_jax import train
  t0 = time.time()
  try:
    return train.run_config(config, run_dir)
  except Exception:
    with open(error_path, "w") as f:
      f.write(traceback.format_exc())
    raise
  finally:
    _add_wall(run_dir, time.time() - t0)


def run_sweep(sweep_file: SweepFile, sweepdir: str, only: Sequence[str] | None = None,
              log=print, report_every_run: bool = True) -> dict[str, str]:
  """Set-up runs, then the runs, one after another; returns {name: status}. A failed run is
  recorded and the sweep goes on (runs are independent); a failed set-up run stops it."""
  sweepdir = os.path.abspath(sweepdir)
  setup, runs = sweep_file.setup_runs(), sweep_file.runs()
  selected = _select(runs, only)
  check_sweepdir(setup + runs, sweepdir)
  write_manifest(sweep_file, setup + runs, sweepdir)
  statuses: dict[str, str] = {}
  for r in setup:
    report = run_one(r, sweepdir, log)
    status = "completed" if report is None else report["status"]
    statuses[r.name] = status
    if status == "preempted":
      log(f"[{r.name}] preempted; rerun the same command to resume")
      write_report(sweepdir)
      return statuses
  build_teacher_caches(selected, sweepdir, log)
  for i, r in enumerate(selected):
    try:
      report = run_one(r, sweepdir, log)
    except (KeyboardInterrupt, SystemExit, SweepError):
      raise
    except Exception as e:  # one broken run must not cost the rest of the comparison
      log(f"[{r.name}] failed: {type(e).__name__}: {e} (traceback in "
          f"{os.path.join(sweepdir, r.name, ERROR_FILE)})")
      statuses[r.name] = "failed"
    else:
      statuses[r.name] = "completed" if report is None else report["status"]
    if statuses[r.name] == "preempted":
      log(f"[{r.name}] preempted; rerun the same command to resume")
      break
    if report_every_run and i + 1 < len(selected):
      write_report(sweepdir)  # partial results stay readable during a long sweep
  write_report(sweepdir)
  return statuses


def _select(runs: Sequence[Run], only: Sequence[str] | None) -> list[Run]:
  if not only:
    return list(runs)
  names = [r.name for r in runs]
  unknown = [n for n in only if n not in names]
  if unknown:
    raise SweepError(f"--only names unknown run(s) {unknown}; runs are {names}")
  return [r for r in runs if r.name in set(only)]


def emit(sweep_file: SweepFile, sweepdir: str, only: Sequence[str] | None = None) -> list[str]:
  """Lines of a shell script: set-up commands first (they must finish before the rest), then
  one independent command per run. Each is checked to reproduce the in-process config."""
  sweepdir = os.path.abspath(sweepdir)
  setup, runs = sweep_file.setup_runs(), sweep_file.runs()
  selected = _select(runs, only)
  check_sweepdir(setup + runs, sweepdir)
  commands = {r.name: check_round_trip(r, sweepdir) for r in setup + selected}
  caches = teacher_caches(selected, sweepdir)
  write_manifest(sweep_file, setup + runs, sweepdir, commands)
  lines = [f"# sweep {_display_path(sweep_file.path)}"
           + ("" if sweep_file.arg is None else f":{sweep_file.arg}")
           + f" -> {sweepdir}; run from {REPO_ROOT}"]
  if setup:
    lines.append("# set-up runs: must finish before the runs below")
    lines += [commands[r.name] for r in setup]
  if caches:
    lines.append("# teacher caches: after the set-up runs, before the runs that read them")
    for directory, readers in caches.items():
      lines.append(f"# {_display_path(directory)}: read by {', '.join(r.name for r in readers)}")
      lines.append(cache_command(readers[0], directory, sweepdir))
  lines.append("# runs: independent of each other")
  lines += [commands[r.name] for r in selected]
  lines.append(f"# then: python -m mbert_jax.sweep --report --workdir={shlex.quote(sweepdir)}")
  return lines


# ============================================================================ command line

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m mbert_jax.sweep",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--sweep", help="sweep file `path[:arg]`")
  p.add_argument("--workdir", required=True, help="the sweep directory (one subdirectory per run)")
  p.add_argument("--emit", action="store_true",
                 help="print one launch.py command per run instead of running")
  p.add_argument("--only", default="", help="comma-separated run names (set-up runs always run)")
  p.add_argument("--report", action="store_true",
                 help="only rebuild the results table and plots from the sweep dir")
  a = p.parse_args(argv)
  if a.report and (a.emit or a.only):
    p.error("--report takes no --emit or --only")
  if not a.report and not a.sweep:
    p.error("--sweep is required unless --report is given")
  return a


def _paths_lines(paths: Mapping[str, str]) -> list[str]:
  return [f"{k}: {v}" for k, v in paths.items()]


def _dispatch(a: argparse.Namespace) -> int:
  if a.report:
    print("\n".join(_paths_lines(write_report(a.workdir))), flush=True)
    return 0
  sweep_file = SweepFile(a.sweep)
  only = [n.strip() for n in a.only.split(",") if n.strip()]
  if a.emit:
    print("\n".join(emit(sweep_file, a.workdir, only)), flush=True)
    return 0
  statuses = run_sweep(sweep_file, a.workdir, only)
  print("\n".join([f"  {name:<20} {status}" for name, status in statuses.items()]
                  + _paths_lines(report_paths(a.workdir))), flush=True)
  return 1 if "failed" in statuses.values() else 0


def main(argv: Sequence[str] | None = None) -> int:
  """0: done; 1: some run failed (recorded, the sweep went on); 2: a known error (bad sweep
  file, run or sweep dir), one line on stderr; 3: a set-up run stopped on non-finite losses."""
  a = parse_args(argv)
  try:
    return cli.guarded(_dispatch, a)
  except SystemExit as e:  # cli.guarded ends known errors so; callers (and tests) get the code
    return e.code if isinstance(e.code, int) else cli.USAGE_EXIT


if __name__ == "__main__":
  sys.exit(main())
