"""The package's dependencies point one way: data -> models -> distill / finetune -> training's
loop knows neither; interop and sweeps sit on top; no import circle (function-level imports
included). Read from the source with `ast`, so the check needs nothing installed."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mbert_jax")


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
  """Package modules that `name` imports anywhere in its file."""
  tree = ast.parse(open(path).read())
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      found.add(base)
      found.update(f"{base}.{a.name}" for a in node.names)
  deps = set()
  for f in found:
    while f and f not in MODULES:
      f = f.rsplit(".", 1)[0] if "." in f else ""
    # A package's __init__ is not a dependency of its own modules.
    if f and f != name and not name.startswith(f + ".") and f != "mbert_jax":
      deps.add(f)
  return deps


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _reaches(start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for dep in GRAPH.get(todo.pop(), ()):
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def test_no_import_cycle():
  cycles = sorted(name for name in GRAPH if name in _reaches(name))
  assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("layer, forbidden", [
    ("mbert_jax.models", ("training", "distill", "finetune", "interop", "sweeps", "data",
                          "launch")),
    ("mbert_jax.data", ("training", "distill", "finetune", "interop", "sweeps", "models",
                        "launch")),
    ("mbert_jax.training", ("distill", "finetune", "interop", "sweeps", "launch", "data")),
    ("mbert_jax.distill.losses", ("training", "finetune", "interop", "sweeps", "launch", "data")),
    ("mbert_jax.distill", ("finetune", "interop.export", "interop.predict", "interop.onnx_export",
                           "sweeps", "launch")),
    ("mbert_jax.finetune", ("distill", "interop.export", "interop.predict", "sweeps", "launch")),
])
def test_dependencies_point_one_way(layer, forbidden):
  bad = []
  for name, deps in GRAPH.items():
    if name == layer or name.startswith(layer + "."):
      bad += [f"{name} -> {d}" for d in deps
              if any(d == f"mbert_jax.{f}" or d.startswith(f"mbert_jax.{f}.") for f in forbidden)]
  assert not bad, bad


# Imports that stay inside functions, each for a reason a test pins: `python -m mbert_jax.sweep
# --report` and `--emit` load no jax (tests/test_sweep.py), and these modules pull it in.
LAZY_ON_PURPOSE = {"mbert_jax.sweeps.report:boundaries_of", "mbert_jax.sweeps.runner:teacher_caches",
                   "mbert_jax.sweeps.runner:build_teacher_caches",
                   "mbert_jax.sweeps.runner:_check_identity", "mbert_jax.sweeps.runner:run_one"}


def test_package_imports_sit_at_module_top():
  """Package-internal imports inside functions hide the dependency graph; optional heavy
  extras (torch, transformers, onnx) may load lazily, the package's own modules may not."""
  inside = []
  for name, path in MODULES.items():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for sub in ast.walk(node):
          if f"{name}:{node.name}" in LAZY_ON_PURPOSE:
            continue
          if isinstance(sub, ast.ImportFrom) and (sub.level or (sub.module or "").startswith(
              "mbert_jax")):
            inside.append(f"{name}:{node.name} imports {sub.module}")
          elif isinstance(sub, ast.Import) and any(a.name.startswith("mbert_jax")
                                                   for a in sub.names):
            inside.append(f"{name}:{node.name}")
  assert not inside, inside
