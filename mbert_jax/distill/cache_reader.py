"""Reading a teacher cache: a run opens it before anything compiles and then takes each step's
targets from it instead of running the teacher.

    cache = open_cache(cache_dir, identity_key(config, teacher_step, pipe), steps=(first, end))
    batch.update(cache.targets_at(step, process_index, process_count, batch=batch))

Refusals happen in `open_cache`: another identity key (naming each differing field), a missing,
truncated or corrupt shard (naming the file), or steps the cache does not hold. `open_for_run`
does all of that from a run's config.
"""

from __future__ import annotations

import collections
import io
import os
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

from mbert_jax.distill.cache_config import (cache_dir_of, identity_key, pd_stage_steps,
                                            refuse_other_key, resolve_teacher_step,
                                            schedule_stages)
from mbert_jax.distill.cache_format import (SHARD_DIR, ShardError, ShardInfo, cells_of,
                                            complete_set, header_record_dtype, list_shards,
                                            member_name, read_header, row_digests, shard_name,
                                            slice_rows)


class TeacherCache:
  """Read side of a cache directory; see `open_cache`. One object per process (it keeps a few
  shard files open)."""

  def __init__(self, directory: str, header: dict, sets: dict[int, list[ShardInfo]]):
    self.directory = directory
    self.header = header
    self.k = int(header["k"])
    self.batch_size = int(header["batch_size"])
    self.steps_per_shard = int(header["steps_per_shard"])
    self.record_dtype = header_record_dtype(header)
    self._sets = sets
    self._open: collections.OrderedDict[str, zipfile.ZipFile] = collections.OrderedDict()

  def __enter__(self) -> "TeacherCache":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    while self._open:
      self._open.popitem()[1].close()

  @property
  def bytes_per_sequence(self) -> float:
    """Shard bytes on disk per input sequence, over the shards this reader checked."""
    infos = [i for s in self._sets.values() for i in s]
    sequences = sum((i.end_step - i.first_step) * (i.rows[1] - i.rows[0]) for i in infos)
    return sum(os.path.getsize(i.path) for i in infos) / max(sequences, 1)

  def _zip(self, path: str) -> zipfile.ZipFile:
    if path not in self._open:
      self._open[path] = zipfile.ZipFile(path)
      while len(self._open) > 8:
        self._open.popitem(last=False)[1].close()
    self._open.move_to_end(path)
    return self._open[path]

  def _records(self, info: ShardInfo, step: int) -> np.ndarray:
    try:
      raw = self._zip(info.path).read(member_name(step))  # checks the member's CRC
      records = np.load(io.BytesIO(raw), allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, KeyError, ValueError, OSError, EOFError) as e:
      raise ShardError(f"corrupt shard {info.path} at step {step} ({type(e).__name__}: {e}); "
                       f"rerun the writer with --verify on {self.directory} to rewrite it"
                       ) from None
    if records.dtype != self.record_dtype or records.shape != (info.rows[1] - info.rows[0],):
      raise ShardError(f"corrupt shard {info.path} at step {step}: records {records.dtype} "
                       f"{records.shape}, expected {self.record_dtype}")
    return records

  def _shards_for(self, step: int) -> list[ShardInfo]:
    infos = self._sets.get(step // self.steps_per_shard)
    if not infos or not all(i.first_step <= step < i.end_step for i in infos):
      raise ValueError(f"teacher cache {self.directory} has no targets for step {step} "
                       "(open it with the steps the run needs, so that this is checked up front)")
    return infos

  def targets_at(self, step: int, process_index: int = 0, process_count: int = 1,
                 batch: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """This process's rows of step `step`'s targets, shaped like the batch's rows:
    teacher_topk_values [b, P, k] (float16), teacher_topk_indices [b, P, k] (uint8/16/32),
    teacher_log_normalizer [b, P] (float32). With `batch` (the pipeline's rows for this
    step), checks that it is the input the targets were computed from."""
    step, process_index, process_count = int(step), int(process_index), int(process_count)
    if self.batch_size % process_count or not 0 <= process_index < process_count:
      raise ValueError(f"process {process_index} of {process_count}: the cache's batch of "
                       f"{self.batch_size} rows does not split that way")
    r0, r1 = slice_rows(self.batch_size, process_index, process_count)
    parts = []
    for info in self._shards_for(step):
      lo, hi = max(r0, info.rows[0]), min(r1, info.rows[1])
      if lo < hi:
        parts.append(self._records(info, step)[lo - info.rows[0]:hi - info.rows[0]])
    records = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if batch is not None:
      _check_rows(records["digest"], row_digests(batch), step, r0, self.directory)
    return {"teacher_topk_values": np.ascontiguousarray(records["values"]),
            "teacher_topk_indices": np.ascontiguousarray(records["indices"]),
            "teacher_log_normalizer": np.ascontiguousarray(records["log_normalizer"])}


def _check_rows(stored: np.ndarray, actual: np.ndarray, step: int, first_row: int,
                directory: str) -> None:
  if stored.shape != actual.shape:
    raise ValueError(f"teacher cache {directory}, step {step}: {stored.shape[0]} cached rows for "
                     f"a batch of {actual.shape[0]}")
  bad = np.flatnonzero(stored != actual)
  if bad.size:
    raise ValueError(
        f"teacher cache {directory}, step {step}, row {first_row + int(bad[0])}: the data "
        f"pipeline now gives another input than the one the targets were computed for "
        f"({bad.size} of {actual.size} rows differ; the data code or corpus changed). "
        "Rebuild the cache.")


def open_cache(cache_dir: str, expected_key: Mapping[str, Any],
               steps: tuple[int, int] | None = None, verify: bool = False) -> TeacherCache:
  """Opens a cache for reading after checking, before any compile, that it was built for
  `expected_key` (else ValueError naming every differing field) and that every shard holding
  global steps [first, end) is present and whole (else ShardError naming the files).
  `steps=None` checks the shards that are there. `verify` also checks every CRC (slow)."""
  header = read_header(cache_dir)
  refuse_other_key(cache_dir, header["key"], expected_key)
  shard_dir = os.path.join(cache_dir, SHARD_DIR)
  found = list_shards(shard_dir)
  if steps is None:
    wanted = [(cell, None, None) for cell in sorted(found)]
  else:
    first, end = (int(s) for s in steps)
    if not 0 <= first < end:
      raise ValueError(f"steps {steps}: need 0 <= first < end")
    wanted = list(cells_of(first, end, int(header["steps_per_shard"])))
  sets, problems = {}, []
  for cell, first_step, end_step in wanted:
    if cell not in found:
      name = shard_name(cell, 0, int(header["process_count"]))
      problems.append(f"missing shard {os.path.join(shard_dir, name)} (steps "
                      f"{first_step}..{end_step})")
      continue
    infos, why = complete_set(shard_dir, cell, list(found[cell]), header, first_step, end_step,
                               verify)
    if infos is None:
      problems.extend(why)
    else:
      sets[cell] = infos
  if problems:
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    shown = "; ".join(problems[:3]) + more
    raise ShardError(f"teacher cache {cache_dir!r} cannot serve this run: {shown}. Rerun the "
                     f"writer (python -m mbert_jax.teacher_cache --config=<the run's config> "
                     f"--workdir={cache_dir}) to write what is missing.")
  return TeacherCache(cache_dir, header, sets)


def open_for_run(config, pipeline, teacher_step: int | None = None) -> TeacherCache | None:
  """What the training loop calls before compiling: None when `schedule.teacher_cache` is
  empty, else the opened cache, checked against this run's key and its PD stage's steps."""
  directory = cache_dir_of(config)
  if not directory:
    return None
  _, first, end = pd_stage_steps(config, schedule_stages(config))
  if end <= first:  # this run stops before its PD stage: nothing to read
    return None
  step = resolve_teacher_step(config.teacher) if teacher_step is None else int(teacher_step)
  return open_cache(directory, identity_key(config, step, pipeline), steps=(first, end))
