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
directory, so runs can name a set-up run's output (`{sweepdir}/teacher`). Overrides are
restricted to values a launch.py flag can carry (bool, int, float, str, tuples of those).

This module is what a sweep file imports (`from mbert_jax.sweeps import sweep as sw`) and what
a sweep is: its axes, its runs and the config each run trains (`resolve`). Running a sweep,
resuming it and emitting it as commands is runner.py; the launch.py command of a run is
commands.py; the results table and plots are report.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
from ml_collections.config_flags import config_path

from mbert_jax import config_files
from mbert_jax.config_files import REPO_ROOT, split_ref
from mbert_jax.sweeps.report import DEFAULT_VARIANT

SWEEPDIR = "{sweepdir}"
# The keys of a run that label it rather than override a config field.
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
    config_ref = absolute_ref(ref)
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


def absolute_ref(ref: str, base: str = REPO_ROOT) -> str:
  path, arg = split_ref(ref)
  path = path if os.path.isabs(path) else os.path.join(base, path)
  return os.path.normpath(path) + ("" if arg is None else f":{arg}")


class SweepFile:
  """A loaded sweep file: its base config, set-up runs and runs."""

  def __init__(self, spec: str, cwd: str | None = None):
    path, _ = split_ref(spec)
    if not path.endswith(".py"):
      raise SweepError(f"--sweep must name a .py file (`path[:arg]`), got {spec!r}")
    self.ref = absolute_ref(spec, base=cwd or os.getcwd())
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
