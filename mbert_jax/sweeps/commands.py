"""The launch.py command of a sweep run, checked to train exactly the in-process config.

`--emit` prints these commands for a cluster scheduler; each is parsed back through
ml_collections' config_flags (as launch.py parses it) and refused unless it reproduces the
config and workdir the in-process run would use.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import Any, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from mbert_jax import config_files
from mbert_jax.config_files import REPO_ROOT, split_ref
from mbert_jax.sweeps.sweep import Run, SweepError, absolute_ref, flag_items, resolve


def _flag_text(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, str):
    return value
  return repr(value)  # tuples: config_flags' TupleParser reads Python literals


def display_path(path: str) -> str:
  """Repo-relative when inside the repo (commands run from the repo root, as launch.py's own
  examples do), absolute otherwise."""
  rel = os.path.relpath(path, REPO_ROOT)
  return path if rel.startswith("..") else rel


def command_args(run: Run, sweepdir: str) -> list[str]:
  sweepdir = os.path.abspath(sweepdir)
  path, arg = split_ref(run.config_ref)
  config = display_path(path) + ("" if arg is None else f":{arg}")
  base = config_files.load_config(run.config_ref)
  args = ["launch.py", f"--config={config}", f"--workdir={os.path.join(sweepdir, run.name)}"]
  args += [f"--config.{k}={_flag_text(v)}" for k, v in flag_items(run, base, sweepdir)]
  return args


def launch_command(run: Run, sweepdir: str, python: str = "python") -> str:
  return " ".join([python] + [shlex.quote(a) for a in command_args(run, sweepdir)])


def parse_launch_args(args: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
  """Parses launch.py arguments exactly as launch.py does (config_flags, lock_config=True).
  Paths are read relative to the repo root, where the commands run."""
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
    return "--config=" + absolute_ref(arg[len("--config="):])
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
