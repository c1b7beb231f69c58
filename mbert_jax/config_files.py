"""Config files as launch.py reads them, and overrides checked against them.

`--config=configs/x.py:arg` names a file whose `get_config(arg)` returns a ConfigDict;
`--config.a.b=v` overrides one field. An override naming no field is an error that names the
closest existing field, before anything runs.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from typing import Any, Iterable, Sequence

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def split_ref(ref: str) -> tuple[str, str | None]:
  path, sep, arg = ref.partition(":")
  return path, (arg if sep else None)


def load_module(path: str, prefix: str):
  """The Python file at `path` as a module named `prefix` + its file name."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  # Config and sweep files import `configs.*` / `experiments.*` as launch.py sees them.
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  spec = importlib.util.spec_from_file_location(
      prefix + re.sub(r"\W", "_", os.path.basename(path)), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(ref: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file `path[:arg]`, called as launch.py's flag calls it."""
  path, arg = split_ref(ref)
  module = load_module(path, "mbert_config_")
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} has no get_config(arg)")
  config = module.get_config() if arg is None else module.get_config(arg)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"{path}:get_config returned {type(config).__name__}, not a ConfigDict")
  return config


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> Iterable[str]:
  """Every leaf field as a dotted path (sections are walked, not listed)."""
  for key in config.keys():
    value = config[key]
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from field_paths(value, path + ".")
    else:
      yield path


def has_field(config: ml_collections.ConfigDict, path: str) -> bool:
  node: Any = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def closest_field(config: ml_collections.ConfigDict, path: str) -> str | None:
  """The existing field a mistyped or misplaced path most likely meant."""
  known = list(field_paths(config))
  close = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
  if close:
    return close[0]
  # The right name in another section (train.learning_rate -> schedule.learning_rate).
  last = path.rsplit(".", 1)[-1]
  by_last = {k.rsplit(".", 1)[-1]: k for k in known}
  names = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75)
  return by_last[names[0]] if names else None


def unknown_field_message(config: ml_collections.ConfigDict, path: str, where: str) -> str:
  close = closest_field(config, path)
  hint = f"; did you mean {close}?" if close else ""
  return f"{where}: the config has no field {path}{hint}"


def override_paths(argv: Sequence[str], flag: str = "config") -> list[str]:
  """Dotted paths of `--config.a.b=v` / `--config.a.b v` arguments."""
  out = []
  for arg in argv:
    m = re.match(rf"^--?{flag}\.([^=\s]+)", arg)
    if m:
      out.append(m.group(1))
  return out


def config_ref(argv: Sequence[str], flag: str = "config") -> str | None:
  for i, arg in enumerate(argv):
    m = re.match(rf"^--?{flag}=(.+)$", arg)
    if m:
      return m.group(1)
    if arg in (f"--{flag}", f"-{flag}") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_overrides(argv: Sequence[str], flag: str = "config") -> None:
  """Raises ValueError for an override that names no field (with the closest one)."""
  paths = override_paths(argv, flag)
  ref = config_ref(argv, flag)
  if not paths or ref is None:
    return
  config = load_config(ref)
  for path in paths:
    if not has_field(config, path):
      raise ValueError(unknown_field_message(config, path, f"--{flag}.{path}"))


def substitute_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Replaces `{workdir}` in every string field (recursively): a `runs` pipeline's sub-configs
  name each other's directories through it (configs/demo.py)."""
  for key in list(cfg.keys()):
    value = cfg[key]
    if isinstance(value, ml_collections.ConfigDict):
      substitute_workdir(value, workdir)
    elif isinstance(value, str) and "{workdir}" in value:
      cfg[key] = value.replace("{workdir}", workdir)
  return cfg
