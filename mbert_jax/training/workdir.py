"""What a run directory holds and how it is written: one place for the file names, the JSON
writer and the run-finished marker, so the trainers, the sweep runner and `launch.py` agree.

Imports no jax at module level: `python -m mbert_jax.sweep --report` reads workdirs without it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mbert_jax.errors import WorkdirMismatchError

DONE_FILE = "final.json"          # written once, when a run has reached its last step
CONFIG_FILE = "config.json"       # the resolved config of the run
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
TASK_FILE = "task.json"           # fine-tuning runs: task kind, labels, sequence length, init


def _is_main_process() -> bool:
  import jax
  return jax.process_index() == 0


def write_json(path: str, obj: Any, *, all_processes: bool = False) -> None:
  """Atomic JSON write (tmp file + rename); only process 0 writes unless `all_processes`."""
  if not all_processes and not _is_main_process():
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def is_finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, DONE_FILE))


def read_report(workdir: str) -> dict | None:
  path = os.path.join(workdir, DONE_FILE)
  return read_json(path) if os.path.exists(path) else None


def is_mbert_workdir(path: str) -> bool:
  """An mbert-jax run directory (as opposed to a Hugging Face model directory)."""
  return os.path.exists(os.path.join(path, MODEL_CONFIG_FILE))


# ---------------------------------------------------------------------------- the claim

IDENTITY_FILE = "run_identity.json"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out: dict[str, Any] = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def _normalise(value: Any) -> Any:
  # JSON turns tuples into lists and ints may come back as floats; compare what JSON keeps.
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def identity_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
  a, b = _flat(_normalise(stored)), _flat(_normalise(current))
  rows = []
  for key in sorted(set(a) | set(b)):
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      rows.append(f"{key}: {a.get(key, '<absent>')!r} in the workdir, {b.get(key, '<absent>')!r} now")
  return rows


def has_checkpoints(workdir: str) -> bool:
  ckpt = os.path.join(workdir, CHECKPOINT_DIR)
  return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def latest_checkpoint_step(workdir: str) -> int | None:
  """The newest checkpoint step directory (written or not yet verified), None if none."""
  ckpt = os.path.join(workdir, CHECKPOINT_DIR)
  steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
  return max(steps) if steps else None


def claim(workdir: str, identity: dict[str, Any]) -> None:
  """Makes `workdir` this run's, or refuses before anything is written.

  `identity` holds what the checkpoints depend on (model shape, schedule, data, task, seeds);
  the task leaves out fields that don't (logging and eval cadence, where to stop, the mesh), so
  changing those resumes. A workdir whose checkpoints come from another identity is refused
  with the differing fields; nothing in it is moved or overwritten. A workdir without
  checkpoints has nothing to protect and is (re)claimed.
  """
  path = os.path.join(workdir, IDENTITY_FILE)
  if has_checkpoints(workdir):
    if not os.path.exists(path):
      raise WorkdirMismatchError(
          f"{workdir} holds checkpoints but no {IDENTITY_FILE}, so they cannot be checked "
          "against this configuration. Nothing was changed. Use a new --workdir, or delete "
          f"{workdir} to start fresh.")
    diffs = identity_differences(read_json(path), identity)
    if diffs:
      shown = "; ".join(diffs[:12]) + (f"; and {len(diffs) - 12} more" if len(diffs) > 12 else "")
      raise WorkdirMismatchError(
          f"{workdir} holds checkpoints of another configuration ({shown}). Nothing was "
          "changed. Rerun with the workdir's settings to resume, use a new --workdir, or "
          f"delete {workdir} to start fresh.")
    return
  os.makedirs(workdir, exist_ok=True)
  write_json(path, identity)
