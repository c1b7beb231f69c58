"""What a run directory holds and how it is written: one place for the file names, the JSON
writer and the run-finished marker, so the trainers, the sweep runner and `launch.py` agree.

Imports no jax at module level: `python -m mbert_jax.sweep --report` reads workdirs without it.
"""

from __future__ import annotations

import json
import os
from typing import Any

DONE_FILE = "final.json"          # written once, when a run has reached its last step
CONFIG_FILE = "config.json"       # the resolved config of the run
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"


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
