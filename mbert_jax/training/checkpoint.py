"""Checkpoints with orbax `CheckpointManager`: train state + JSON metadata per step.

A checkpoint holds the train state (the `state` item: step, params, optimizer state, the
non-finite counters) and a small JSON `meta` item: `stage_index`, the stage whose optimizer
state it holds (the loop builds the restore target from that stage's optimizer), and `step`,
so that the meta read alone says which step it belongs to. Everything else about a position
(the stage's name, the step within it) follows from the step and the schedule, which the
workdir's identity pins. The teacher is never saved: it is reloaded from the config's path. A
latest checkpoint that fails to restore (truncated, half-written, corrupt) is skipped with a
warning in favour of the previous good one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from mbert_jax.errors import WorkdirMismatchError


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
        # Handlers named up front, so a fresh manager can read a step's metadata before any
        # restore (the layout check below).
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
    )

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    state = out["state"]
    _check_same_structure(abstract_state, state, step)
    return state, out["meta"]

  def stored_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Path -> (shape, dtype) of the `state` item as written, read from its metadata only."""
    tree = self.manager.item_metadata(step)["state"]
    if tree is None:
      raise ValueError(f"checkpoint {step} has no readable `state` metadata")
    tree = getattr(tree, "tree", tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(p): (tuple(m.shape), str(m.dtype)) for p, m in flat}

  def restore_latest_good(self, abstract_state_for_meta
                          ) -> tuple[int, Any, dict[str, Any]] | None:
    """Newest checkpoint that restores; `abstract_state_for_meta(meta)` gives its target tree.

    Returns None when there is no usable checkpoint at all. A checkpoint that cannot be read
    is moved aside (kept) and the previous one tried; one that reads fine but holds other
    shapes than the target belongs to another configuration and raises
    `WorkdirMismatchError` without moving anything.
    """
    for step in reversed(self.all_steps()):
      try:
        meta = self.read_meta(step)
        stored = self.stored_shapes(step)
      except Exception as e:  # a damaged checkpoint can fail in many layers of orbax/tensorstore
        self._skip_damaged(step, e)
        continue
      # Outside the try: a failure to build the target is ours, not the checkpoint's.
      target = abstract_state_for_meta(meta)
      _check_same_layout(target, stored, step, self.directory)
      try:
        state, meta = self.restore(step, target)
        return step, state, meta
      except Exception as e:  # see above: the data files themselves are damaged
        self._skip_damaged(step, e)
    return None

  def _skip_damaged(self, step: int, e: Exception) -> None:
    moved = self._quarantine(step)
    warnings.warn(f"checkpoint at step {step} in {self.directory} cannot be restored "
                  f"({type(e).__name__}: {str(e)[:300]}); moved it to {moved} and trying "
                  "the previous one")
    logging.warning("skipping unreadable checkpoint %d: %s", step, e)

  def _quarantine(self, step: int) -> str:
    """Moves a damaged step aside (kept for inspection) so the run can write that step again."""
    src = os.path.join(self.directory, str(step))
    dst_root = self.directory.rstrip("/") + "_damaged"
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f"{step}_{int(time.time())}")
    if os.path.exists(src):
      shutil.move(src, dst)
    self.manager.reload()
    return dst

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _path_name(path) -> str:
  # Stored metadata names NamedTuple fields as dict keys; the live tree as attributes.
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _check_same_layout(target: Any, stored: dict[str, tuple[tuple[int, ...], str]], step: int,
                       directory: str) -> None:
  flat, _ = jax.tree_util.tree_flatten_with_path(target)
  want = {_path_name(p): (tuple(a.shape), str(a.dtype)) for p, a in flat}
  diffs = [f"{k}: stored {stored.get(k, ('absent',))[0]}, expected {want.get(k, ('absent',))[0]}"
           for k in sorted(set(want) | set(stored)) if want.get(k) != stored.get(k)]
  if diffs:
    raise WorkdirMismatchError(
        f"checkpoint {step} in {directory} was written by another model or optimizer "
        f"({'; '.join(diffs[:5])}{'; ...' if len(diffs) > 5 else ''}). Nothing was moved. Use a "
        "new --workdir, or delete the workdir to start fresh.")


def _check_same_structure(expected: Any, got: Any, step: int) -> None:
  # A lenient restore once loaded partial weights silently (orbax #2972): verify it all.
  e_leaves, e_def = jax.tree.flatten(expected)
  g_leaves, g_def = jax.tree.flatten(got)
  if e_def != g_def:
    raise ValueError(f"checkpoint {step}: tree structure differs from the model's")
  for a, b in zip(e_leaves, g_leaves):
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
      raise ValueError(f"checkpoint {step}: leaf {a.shape}/{a.dtype} restored as "
                       f"{b.shape}/{b.dtype}")


def restore_params_only(directory: str, abstract_params: Any, step: int | None = None
                        ) -> tuple[Any, int]:
  """Loads just the params of an mbert-jax run (teachers, fine-tuning inits, export); the
  newest step that restores, or `step`.

  Reads the `state` item of a step directory with a plain checkpointer, not a
  `CheckpointManager`: a manager opened read-only logs a warning ("Given directory is read
  only") that a user can do nothing about, and a writable one may write its own metadata into
  a directory this run does not own.
  """
  directory = os.path.abspath(directory)
  name_format = ocp.step.standard_name_format()  # CheckpointManager's layout: <dir>/<step>/
  found = {m.step: m.path for m in name_format.find_all(directory)}  # finalized steps only
  if not found:
    raise FileNotFoundError(f"no checkpoint under {directory}")
  candidates = [step] if step is not None else sorted(found, reverse=True)
  item = {"params": abstract_params}
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
                              item)
  last_err = None
  with ocp.PyTreeCheckpointer() as checkpointer:
    for s in candidates:
      try:
        if s not in found:
          raise FileNotFoundError(f"no step {s}; steps are {sorted(found)}")
        restored = checkpointer.restore(
            found[s] / "state",
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                        partial_restore=True))
        params = restored["params"]
        _check_same_structure(abstract_params, params, s)
        return params, s
      except Exception as e:  # see restore_latest_good
        warnings.warn(f"checkpoint at step {s} in {directory} cannot be restored ({e!s:.300}); "
                      "trying the previous one")
        last_err = e
  raise ValueError(f"no restorable checkpoint under {directory}: {last_err}")
