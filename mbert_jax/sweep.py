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
directory, so runs can name a set-up run's output (`{sweepdir}/teacher`). Every run resumes: a
finished run (`final.json`) is skipped, a half-done one continues from its own checkpoints. The
results table and plots are rebuilt from what is on disk after each run and by `--report`.

Overrides are restricted to values a launch.py flag can carry (bool, int, float, str, tuples of
those) and `--emit` parses every command back through ml_collections' config_flags, so an
emitted command and an in-process run always train the same config.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPDIR = "{sweepdir}"
META_KEYS = ("name", "variant")
DEFAULT_VARIANT = "default"
MANIFEST = "sweep.json"
WALL_FILE = "sweep_wall.json"
ERROR_FILE = "sweep_error.txt"
DONE_FILE = "final.json"  # train.DONE_FILE; repeated so --report does not import jax
# Names become directories next to these entries of the sweep dir.
RESERVED_NAMES = ("data_cache", "xla_cache")
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


def _split_ref(ref: str) -> tuple[str, str | None]:
  path, sep, arg = ref.partition(":")
  return path, (arg if sep else None)


def _absolute_ref(ref: str, base: str = REPO_ROOT) -> str:
  path, arg = _split_ref(ref)
  path = path if os.path.isabs(path) else os.path.join(base, path)
  return os.path.normpath(path) + ("" if arg is None else f":{arg}")


def _module_from(path: str, name: str):
  if not os.path.isfile(path):
    raise SweepError(f"config file {path} does not exist")
  # Config and sweep files import `configs.*` / `experiments.*` as launch.py sees them.
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(ref: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file `path[:arg]`, called as launch.py's flag calls it."""
  path, arg = _split_ref(ref)
  module = _module_from(path, "sweep_config_" + re.sub(r"\W", "_", os.path.basename(path)))
  if not hasattr(module, "get_config"):
    raise SweepError(f"{path} has no get_config(arg)")
  config = module.get_config() if arg is None else module.get_config(arg)
  if not isinstance(config, ml_collections.ConfigDict):
    raise SweepError(f"{path}:get_config returned {type(config).__name__}, not a ConfigDict")
  return config


class SweepFile:
  """A loaded sweep file: its base config, set-up runs and runs."""

  def __init__(self, spec: str, cwd: str | None = None):
    path, arg = _split_ref(spec)
    if not path.endswith(".py"):
      raise SweepError(f"--sweep must name a .py file (`path[:arg]`), got {spec!r}")
    self.ref = _absolute_ref(spec, base=cwd or os.getcwd())
    self.path, self.arg = _split_ref(self.ref)
    self.module = _module_from(self.path, "sweep_" + re.sub(r"\W", "_", os.path.basename(path)))
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


def _leaves(cfg: ml_collections.ConfigDict, prefix: str = "") -> Iterable[tuple[str, Any]]:
  for key in cfg.keys():
    value = cfg[key]
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, path + ".")
    else:
      yield path, value


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
  for key, value in _leaves(base):
    if key not in overridden and _contains_placeholder(value):
      if isinstance(value, list):
        raise SweepError(f"{run.name}: base field {key} is a list naming {SWEEPDIR}; lists "
                         "cannot be passed as launch.py flags, use a tuple")
      items.append((key, _substitute(value, sweepdir)))
  return items


def _apply(config: ml_collections.ConfigDict, items: Sequence[tuple[str, Any]], run: Run) -> None:
  for key, value in items:
    try:
      config_path.get_value(key, config)
    except (KeyError, AttributeError, IndexError, ValueError):
      holder = key.rpartition(".")[0]
      try:
        parent = config_path.get_value(holder, config) if holder else config
        known = sorted(parent.keys())
      except Exception:  # the parent is missing too; say so instead of listing
        known = f"(no section {holder!r})"
      raise SweepError(f"run {run.name!r}: {key!r} is not a field of the base config "
                       f"{run.config_ref}; fields there: {known}") from None
    try:
      # config_path.set_value is what config_flags calls, so FieldReferences propagate alike.
      config_path.set_value(key, config, value)
    except (TypeError, ValueError) as e:
      raise SweepError(f"run {run.name!r}: cannot set {key}={value!r}: {e}") from None


def resolve(run: Run, sweepdir: str) -> ml_collections.ConfigDict:
  """The run's final config: base + overrides, `{sweepdir}` filled in, references resolved."""
  sweepdir = os.path.abspath(sweepdir)
  base = load_config(run.config_ref)
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
  path, arg = _split_ref(run.config_ref)
  config = _display_path(path) + ("" if arg is None else f":{arg}")
  base = load_config(run.config_ref)
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


def check_round_trip(run: Run, sweepdir: str) -> str:
  """The launch.py command for `run`, after checking it reproduces the in-process config."""
  args = command_args(run, sweepdir)
  parsed, workdir = parse_launch_args(args)
  expected = resolve(run, sweepdir)
  got = parsed.copy_and_resolve_references()
  if _plain(got) != _plain(expected):
    diff = _diff(_plain(expected), _plain(got))
    raise SweepError(f"run {run.name!r}: the emitted command does not reproduce its config: "
                     f"{diff[:5]}")
  if os.path.abspath(workdir) != os.path.join(os.path.abspath(sweepdir), run.name):
    raise SweepError(f"run {run.name!r}: emitted workdir {workdir} is not its run directory")
  return launch_command(run, sweepdir)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else k)
    return out
  return [] if a == b else [f"{path}: {a!r} != {b!r}"]


# ============================================================================ running

def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def write_manifest(sweep_file: SweepFile, runs: Sequence[Run], sweepdir: str,
                   commands: Mapping[str, str] | None = None) -> str:
  """`sweep.json`: which directories are runs, their strategy labels and commands; --report
  reads it so a sweep run by a cluster scheduler gets the same table."""
  os.makedirs(sweepdir, exist_ok=True)
  entries = []
  for r in runs:
    cfg = resolve(r, sweepdir)
    entries.append({
        "name": r.name, "variant": r.variant, "setup": r.setup,
        "config": r.config_ref, "overrides": [[k, v] for k, v in r.overrides],
        "strategy": str(cfg.schedule.name) if "schedule" in cfg else "",
        "command": (commands or {}).get(r.name) or launch_command(r, sweepdir),
    })
  path = os.path.join(sweepdir, MANIFEST)
  _write_json(path, {"sweep": sweep_file.ref, "runs": entries})
  return path


def _check_same_config(run: Run, run_dir: str, config: ml_collections.ConfigDict) -> None:
  """A run directory only resumes the config that started it."""
  stored = _read_json(os.path.join(run_dir, "config.json"))
  if stored is None:
    return
  want = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
  if stored != want:
    diff = _diff(stored, want)
    raise SweepError(
        f"run {run.name!r}: {run_dir} holds a run of a different config ({'; '.join(diff[:3])}); "
        "use a fresh --workdir or delete that directory")


def check_sweepdir(runs: Sequence[Run], sweepdir: str) -> None:
  """Refuses, before anything is written, a sweep dir whose runs were started with other
  configs (e.g. the same --workdir with a different sweep argument)."""
  for r in runs:
    _check_same_config(r, os.path.join(os.path.abspath(sweepdir), r.name), resolve(r, sweepdir))


def _add_wall(run_dir: str, seconds: float) -> None:
  # train.py's wall_seconds covers only the session that finished; a resumed run's cost is the
  # sum over its sessions.
  path = os.path.join(run_dir, WALL_FILE)
  prev = _read_json(path) or {"seconds": 0.0, "sessions": 0}
  _write_json(path, {"seconds": prev["seconds"] + seconds, "sessions": prev["sessions"] + 1})


def _trainer_for(config):
  """As launch.py dispatches: a `finetune` section fine-tunes, anything else pretrains/distills."""
  if "finetune" in config:
    from mbert_jax.finetune import trainer
    return trainer.finetune_and_evaluate
  from mbert_jax import train
  return train.train_and_evaluate


def run_one(run: Run, sweepdir: str, log=print) -> dict | None:
  """Runs (or resumes, or skips) one run; returns its report, None if it was already done."""
  run_dir = os.path.join(os.path.abspath(sweepdir), run.name)
  config = resolve(run, sweepdir)
  _check_same_config(run, run_dir, config)  # again: a set-up run may have just written it
  if os.path.exists(os.path.join(run_dir, DONE_FILE)):
    log(f"[{run.name}] finished earlier in {run_dir}; skipping")
    return None
  os.makedirs(run_dir, exist_ok=True)
  error_path = os.path.join(run_dir, ERROR_FILE)
  if os.path.exists(error_path):
    os.remove(error_path)
  log(f"[{run.name}] running in {run_dir}")
  t0 = time.time()
  try:
    return _trainer_for(config)(config, run_dir)
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
  write_manifest(sweep_file, setup + runs, sweepdir, commands)
  lines = [f"# sweep {_display_path(sweep_file.path)}"
           + ("" if sweep_file.arg is None else f":{sweep_file.arg}")
           + f" -> {sweepdir}; run from {REPO_ROOT}"]
  if setup:
    lines.append("# set-up runs: must finish before the runs below")
    lines += [commands[r.name] for r in setup]
  lines.append("# runs: independent of each other")
  lines += [commands[r.name] for r in selected]
  lines.append(f"# then: python -m mbert_jax.sweep --report --workdir={shlex.quote(sweepdir)}")
  return lines


# ============================================================================ results

COLUMNS = ("name", "strategy", "variant", "status", "steps", "mlm_accuracy", "mlm_loss",
           "teacher_agreement", "train_loss", "wall_seconds")
_HEADERS = {"name": "run", "strategy": "strategy", "variant": "variant", "status": "status",
            "steps": "steps", "mlm_accuracy": "held-out MLM acc", "mlm_loss": "eval MLM loss",
            "teacher_agreement": "teacher agreement", "train_loss": "final train loss",
            "wall_seconds": "wall (s)"}


def _number(value: Any) -> float | None:
  try:
    f = float(value)  # metrics.jsonl stores non-finite values as strings ("nan", "inf")
  except (TypeError, ValueError):
    return None
  return f


def read_metrics(run_dir: str) -> list[dict]:
  """Rows of metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
  rows = []
  try:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(row, dict) and "step" in row:
          rows.append(row)
  except FileNotFoundError:
    pass
  return rows


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`; a resumed run logs some steps twice, the later row wins."""
  by_step: dict[int, float] = {}
  for row in rows:
    if key in row:
      v = _number(row[key])
      if v is not None:
        by_step[int(row["step"])] = v
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _last_eval(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  best_step, out = -1, {}
  for row in rows:
    if "eval/mlm_accuracy" in row and int(row["step"]) >= best_step:
      best_step = int(row["step"])
      out = {k: _number(v) for k, v in row.items() if k.startswith("eval/")}
  return out


def stage_boundaries(run_dir: str) -> list[tuple[int, str]]:
  """(start step, stage name) of each stage after the first, from the run's saved config."""
  config = _read_json(os.path.join(run_dir, "config.json"))
  if not config or "schedule" not in config:
    return []
  layers = (_read_json(os.path.join(run_dir, "model_config.json")) or {}).get(
      "num_hidden_layers", config.get("model", {}).get("num_hidden_layers"))
  from mbert_jax import schedule as schedule_lib
  try:
    stages = schedule_lib.build_schedule(config["schedule"], int(layers))
  except (ValueError, TypeError, KeyError):
    return []
  out, start = [], 0
  for s in stages[:-1]:
    start += s.steps
    out.append((start, stages[len(out) + 1].name))
  return out


def collect(sweepdir: str) -> tuple[list[dict], list[dict]]:
  """(rows of the runs, rows of the set-up runs) from the sweep dir: the manifest's runs in
  order, else every subdirectory holding a run."""
  sweepdir = os.path.abspath(sweepdir)
  manifest = _read_json(os.path.join(sweepdir, MANIFEST))
  if manifest:
    entries = manifest["runs"]
  elif os.path.isdir(sweepdir):
    entries = [{"name": d, "variant": DEFAULT_VARIANT, "setup": False}
               for d in sorted(os.listdir(sweepdir))
               if any(os.path.exists(os.path.join(sweepdir, d, f))
                      for f in (DONE_FILE, "metrics.jsonl", "config.json"))]
  else:
    raise SweepError(f"sweep dir {sweepdir} does not exist")
  if not entries:
    raise SweepError(f"{sweepdir} holds no sweep manifest ({MANIFEST}) and no run directories")
  runs, setup = [], []
  for e in entries:
    run_dir = os.path.join(sweepdir, e["name"])
    final = _read_json(os.path.join(run_dir, DONE_FILE))
    rows = read_metrics(run_dir)
    config = _read_json(os.path.join(run_dir, "config.json")) or {}
    # A run resumed at its last step writes final.json without evaluating again; its last
    # evaluation is then in metrics.jsonl.
    ev = (final or {}).get("eval") or _last_eval(rows)
    steps, losses = series(rows, "loss")
    wall = (_read_json(os.path.join(run_dir, WALL_FILE)) or {}).get("seconds")
    if wall is None and final:
      wall = final.get("wall_seconds")
    if final:
      status = final.get("status", "completed")
    elif os.path.exists(os.path.join(run_dir, ERROR_FILE)):
      status = "failed"
    elif rows or config:
      status = "incomplete"
    else:
      status = "pending"
    row = {
        "name": e["name"],
        "strategy": e.get("strategy") or config.get("schedule", {}).get("name", ""),
        "variant": e.get("variant", DEFAULT_VARIANT),
        "status": status,
        "steps": (final or {}).get("step", steps[-1] if steps else None),
        "mlm_accuracy": ev.get("eval/mlm_accuracy"),
        "mlm_loss": ev.get("eval/mlm_loss"),
        "teacher_agreement": ev.get("eval/teacher_agreement"),
        "teacher_mlm_accuracy": ev.get("eval/teacher_mlm_accuracy"),
        "train_loss": losses[-1] if losses else None,
        "wall_seconds": wall,
    }
    (setup if e.get("setup") else runs).append(row)
  return runs, setup


def _fmt(value: Any, key: str) -> str:
  if value is None:
    return ""
  if key == "wall_seconds":
    return f"{value:.0f}"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def write_table(sweepdir: str, runs: Sequence[dict], setup: Sequence[dict]) -> None:
  csv_path = os.path.join(sweepdir, "results.csv")
  with open(csv_path + ".tmp", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    for r in runs:
      w.writerow(["" if r[c] is None else r[c] for c in COLUMNS])
  os.replace(csv_path + ".tmp", csv_path)

  lines = [f"# Sweep results: {os.path.basename(os.path.normpath(sweepdir))}", ""]
  teacher_acc = next((r["teacher_mlm_accuracy"] for r in runs
                      if r.get("teacher_mlm_accuracy") is not None), None)
  if teacher_acc is not None:
    lines.append(f"Teacher held-out MLM accuracy on the same eval batches: {teacher_acc:.4f}")
  for s in setup:
    lines.append(f"Set-up run `{s['name']}`: {s['status']}, {s['steps']} steps, held-out MLM "
                 f"accuracy {_fmt(s['mlm_accuracy'], 'mlm_accuracy') or 'n/a'}")
  if len(lines) > 2:
    lines.append("")
  lines.append("| " + " | ".join(_HEADERS[c] for c in COLUMNS) + " |")
  lines.append("|" + "|".join("---" if c in ("name", "strategy", "variant", "status") else "---:"
                              for c in COLUMNS) + "|")
  for r in runs:
    lines.append("| " + " | ".join(_fmt(r[c], c) for c in COLUMNS) + " |")
  lines += ["", "Held-out MLM accuracy and loss: the last evaluation on the held-out split. "
            "Teacher agreement: fraction of masked positions where student and teacher predict "
            "the same token (empty without a teacher). Final train loss: the run's total "
            "objective at its last logged step, so it differs in composition between strategies. "
            "Wall: summed over every session of the run.", ""]
  md_path = os.path.join(sweepdir, "results.md")
  with open(md_path + ".tmp", "w") as f:
    f.write("\n".join(lines))
  os.replace(md_path + ".tmp", md_path)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_loss_curves(sweepdir: str, runs: Sequence[dict], path: str) -> str:
  """One panel per run (stage layouts differ): train loss vs step on a log axis, dashed lines
  where a stage begins, the PD/final stage shaded."""
  plt = _pyplot()
  n = max(len(runs), 1)
  cols = min(4, n)
  rows_n = math.ceil(n / cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  for ax, r in zip(axes.flat, runs):
    run_dir = os.path.join(sweepdir, r["name"])
    steps, values = series(read_metrics(run_dir), "loss")
    finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if finite:
      ax.plot([s for s, _ in finite], [v for _, v in finite], lw=1.2, color="C0")
      low, high = min(v for _, v in finite), max(v for _, v in finite)
      # KT stages and PD differ by orders of magnitude; a log axis keeps both readable.
      if low > 0 and high / low > 20:
        ax.set_yscale("log")
    else:
      ax.text(0.5, 0.5, f"no logged loss ({r['status']})", ha="center", va="center",
              transform=ax.transAxes)
    bounds = stage_boundaries(run_dir)
    for start, _ in bounds:
      ax.axvline(start, color="0.45", ls="--", lw=0.8)
    if bounds:
      end = max(steps[-1] if steps else 0, bounds[-1][0])
      ax.axvspan(bounds[-1][0], end, color="C1", alpha=0.08, lw=0)
      if len(bounds) <= 3:
        for start, name in bounds:
          ax.annotate(name, (start, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                      textcoords="offset points", fontsize=7, color="0.3")
    title = r["name"] if r["variant"] in ("", DEFAULT_VARIANT) else f"{r['name']} ({r['variant']})"
    stages = f"{len(bounds) + 1} stages" if bounds else "1 stage" if finite else r["status"]
    ax.set_title(f"{title}\n{r['strategy']}, {stages}", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("train loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, which="both")
  fig.suptitle("Train loss per run (dashed: stage boundaries; shaded: last stage)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_final_accuracy(runs: Sequence[dict], path: str) -> str:
  plt = _pyplot()
  strategies = list(dict.fromkeys(r["strategy"] for r in runs))
  colors = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
  fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(runs) + 3), 4))
  xs = range(len(runs))
  accs = [r["mlm_accuracy"] if r["mlm_accuracy"] is not None else 0.0 for r in runs]
  bars = ax.bar(xs, accs, color=[colors[r["strategy"]] for r in runs])
  for bar, r in zip(bars, runs):
    label = "n/a" if r["mlm_accuracy"] is None else f"{r['mlm_accuracy']:.3f}"
    ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
  teacher = next((r["teacher_mlm_accuracy"] for r in runs
                  if r.get("teacher_mlm_accuracy") is not None), None)
  if teacher is not None:
    ax.axhline(teacher, color="k", ls=":", lw=1, label=f"teacher {teacher:.3f}")
  ax.set_xticks(list(xs))
  ax.set_xticklabels([r["name"] for r in runs], rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("held-out MLM accuracy")
  ax.set_title("Final held-out MLM accuracy by strategy (equal total steps)", fontsize=10)
  handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in strategies]
  labels = list(strategies)
  if teacher is not None:
    handles.append(ax.get_lines()[0])
    labels.append(f"teacher {teacher:.3f}")
  ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax.grid(axis="y", alpha=0.3)
  top = max(accs + ([teacher] if teacher is not None else []) + [1e-3])
  ax.set_ylim(0, top * 1.15)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def report_paths(sweepdir: str) -> dict[str, str]:
  sweepdir = os.path.abspath(sweepdir)
  return {k: os.path.join(sweepdir, f) for k, f in (
      ("csv", "results.csv"), ("md", "results.md"), ("loss_curves", "loss_curves.png"),
      ("final_accuracy", "final_accuracy.png"))}


def write_report(sweepdir: str) -> dict[str, str]:
  """(Re)builds results.csv, results.md, loss_curves.png and final_accuracy.png."""
  sweepdir = os.path.abspath(sweepdir)
  paths = report_paths(sweepdir)
  runs, setup = collect(sweepdir)
  write_table(sweepdir, runs, setup)
  plot_loss_curves(sweepdir, runs, paths["loss_curves"])
  plot_final_accuracy(runs, paths["final_accuracy"])
  return paths


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


def main(argv: Sequence[str] | None = None) -> int:
  a = parse_args(argv)
  only = [n.strip() for n in a.only.split(",") if n.strip()]
  try:
    if a.report:
      paths = write_report(a.workdir)
      print("\n".join(f"{k}: {v}" for k, v in paths.items()))
      return 0
    sweep_file = SweepFile(a.sweep)
    if a.emit:
      print("\n".join(emit(sweep_file, a.workdir, only)), flush=True)
      return 0
    statuses = run_sweep(sweep_file, a.workdir, only)
    paths = report_paths(a.workdir)
  except (ValueError, FileNotFoundError) as e:  # SweepError, bad sweep args, bad set-up config
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  print("\n".join([f"  {name:<20} {status}" for name, status in statuses.items()]
                  + [f"{k}: {v}" for k, v in paths.items()]), flush=True)
  return 1 if "failed" in statuses.values() else 0


if __name__ == "__main__":
  sys.exit(main())
