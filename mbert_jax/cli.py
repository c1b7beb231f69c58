"""One way for every command to end on a known error: one line on stderr and exit status 2.

A user who gives a wrong path, a bad override or a broken corpus gets the message the code
raised (which names the field or file to change), not a traceback. Unknown errors still raise
with their traceback: those are bugs to report.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from mbert_jax.errors import NonFiniteError

USAGE_EXIT = 2
NONFINITE_EXIT = 3
# What a user's input causes (a bad path, field or corpus); anything else is a bug to report.
KNOWN_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def fail(message: str, code: int = USAGE_EXIT) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _message(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def guarded(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """Calls `fn`; a known error becomes `error: <message>` and exit 2 (non-finite runs: 3)."""
  try:
    return fn(*args, **kwargs)
  except NonFiniteError as e:
    fail(_message(e), NONFINITE_EXIT)
  except KNOWN_ERRORS as e:
    fail(_message(e))


def _count(value: str | None) -> int:
  try:
    return int(value or 0)
  except ValueError:
    return 0


def cluster_in_environment(environ) -> str:
  """The variable that names a job of several processes, or "" when none does.

  A variable's presence alone is not enough: a one-task SLURM allocation, a one-rank mpirun or a
  single TPU VM (`TPU_WORKER_HOSTNAMES=localhost`) is one process, and `jax.distributed` would
  wait for peers that never come (or refuse with "coordinator_address should be defined")."""
  for key in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS"):
    if environ.get(key):
      return key
  for key in ("SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE"):
    if _count(environ.get(key)) > 1:
      return key
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return "TPU_WORKER_HOSTNAMES" if len(hosts) > 1 else ""


def maybe_initialize_distributed(dist_cfg) -> None:
  """`jax.distributed.initialize` when the config or the environment names a cluster."""
  # Imported here: commands that never train (sweep --emit / --report) use this module and
  # must not pay for jax.
  import jax
  mode = str(dist_cfg.get("initialize", "auto")).lower()
  explicit = bool(dist_cfg.get("coordinator_address"))
  env = cluster_in_environment(os.environ)
  if mode in ("false", "0", "off", "never") or (mode == "auto" and not (explicit or env)):
    return
  if dist_cfg.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", dist_cfg.cpu_collectives)
  kwargs = {}
  if explicit:
    kwargs["coordinator_address"] = dist_cfg.coordinator_address
  if dist_cfg.get("num_processes", -1) > 0:
    kwargs["num_processes"] = int(dist_cfg.num_processes)
  if dist_cfg.get("process_id", -1) >= 0:
    kwargs["process_id"] = int(dist_cfg.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
