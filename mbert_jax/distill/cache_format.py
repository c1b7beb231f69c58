"""The on-disk format of a teacher cache: the sparse-KD targets of every step, sharded.

Layout of a cache directory:
  cache.json                      format, identity key, k, dtypes, steps per shard, geometry
  shards/c<cell>.p<i>of<n>.zip    global steps [cell*S, (cell+1)*S) (clipped to what a writer
                                  needed) for the rows of process slice i of n, as a zip of
      meta.json                   cell, steps, rows, key digest
      <step:09d>.npy              structured array [rows]: values (P, k) float16 = teacher logit
                                  minus the top-1 logit, sorted descending; indices (P, k) in
                                  the smallest unsigned type that holds the vocabulary;
                                  log_normalizer (P,) float32; digest uint64 of the input row
A shard is written to `<name>.tmp` and renamed, so a file under its final name is complete; an
interrupted writer leaves at most one partial `.tmp` per process, which the rerun overwrites.

This module names, lists and checks those files for both sides (`cache_writer`, `cache_reader`):
a shard that is missing, truncated, corrupt or from another cache is a `ShardError` naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import zipfile
import zlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mbert_jax.data import BATCH_KEYS

FORMAT_VERSION = 1
HEADER_FILE = "cache.json"
SHARD_DIR = "shards"
META_MEMBER = "meta.json"
# The batch keys a reader adds: what `losses.sparse_kd_loss` takes besides the student's logits.
TARGET_KEYS = ("teacher_topk_values", "teacher_topk_indices", "teacher_log_normalizer")
SHARD_NAME = re.compile(r"^c(\d{7})\.p(\d+)of(\d+)\.zip$")


# ============================================================================ records

def index_dtype(vocab_size: int) -> np.dtype:
  """Smallest unsigned integer type holding ids 0..vocab_size-1."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if vocab_size - 1 <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise ValueError(f"vocabulary of {vocab_size} tokens is too large for the cache")


def record_dtype(predictions: int, k: int, value_dtype: str, vocab_size: int) -> np.dtype:
  """One input row's stored targets (little-endian, so shards read the same everywhere)."""
  return np.dtype([("values", np.dtype(value_dtype).newbyteorder("<"), (predictions, k)),
                   ("indices", index_dtype(vocab_size).newbyteorder("<"), (predictions, k)),
                   ("log_normalizer", "<f4", (predictions,)),
                   ("digest", "<u8")])


def row_digests(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """uint64 per row of everything the data pipeline put in it (8 bytes of BLAKE2b)."""
  rows = len(batch[BATCH_KEYS[0]])
  columns = [np.ascontiguousarray(np.asarray(batch[name]).reshape(rows, -1)) for name in BATCH_KEYS]
  out = np.empty(rows, np.uint64)
  for r in range(rows):
    h = hashlib.blake2b(digest_size=8)
    for column in columns:
      h.update(column[r].tobytes())
    out[r] = int.from_bytes(h.digest(), "little")
  return out


def header_record_dtype(header: Mapping[str, Any]) -> np.dtype:
  return record_dtype(int(header["max_predictions_per_seq"]), int(header["k"]),
                      str(header["value_dtype"]), int(header["vocab_size"]))


def member_name(step: int) -> str:
  """The member of a shard's zip that holds global step `step`'s records."""
  return f"{step:09d}.npy"


def shard_name(cell: int, process_index: int, process_count: int) -> str:
  return f"c{cell:07d}.p{process_index}of{process_count}.zip"


def slice_rows(batch_size: int, index: int, count: int) -> tuple[int, int]:
  """Rows [r0, r1) of the global batch that process `index` of `count` holds (as batch_at)."""
  rows = batch_size // count
  return index * rows, (index + 1) * rows


# ============================================================================ shards on disk

class ShardError(ValueError):
  """A shard file that is missing, truncated, corrupt or from another cache; names the file."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
  path: str
  cell: int
  process_index: int
  process_count: int
  first_step: int
  end_step: int
  rows: tuple[int, int]

  def covers(self, first: int, end: int) -> bool:
    return self.first_step <= first and end <= self.end_step


def inspect_shard(path: str, key_digest: str, steps_per_shard: int, batch_size: int,
                  verify: bool = False) -> ShardInfo:
  """Reads a shard's directory and meta; raises ShardError saying what is wrong with it.

  The zip's central directory sits at the end of the file, so a truncated shard fails here;
  `verify` also checks every member's CRC (reads the whole file).
  """
  match = SHARD_NAME.match(os.path.basename(path))
  if match is None:
    raise ShardError(f"{path}: not a shard file name")
  cell, index, count = (int(g) for g in match.groups())
  try:
    with zipfile.ZipFile(path) as zf:
      meta = json.loads(zf.read(META_MEMBER))
      names = set(zf.namelist())
      bad = zf.testzip() if verify else None
  except FileNotFoundError:
    raise ShardError(f"missing shard {path}") from None
  except (zipfile.BadZipFile, zlib.error, KeyError, ValueError, OSError, EOFError) as e:
    raise ShardError(f"truncated or corrupt shard {path} ({type(e).__name__}: {e})") from None
  if bad is not None:
    raise ShardError(f"corrupt shard {path} (member {bad} fails its CRC check)")
  if meta.get("key_digest") != key_digest:
    raise ShardError(f"shard {path} belongs to another cache (key digest "
                     f"{meta.get('key_digest')} != {key_digest})")
  first, end = int(meta["first_step"]), int(meta["end_step"])
  rows = tuple(meta["rows"])
  in_cell = cell * steps_per_shard <= first < end <= (cell + 1) * steps_per_shard
  if int(meta["cell"]) != cell or not in_cell or rows != slice_rows(batch_size, index, count):
    raise ShardError(f"shard {path}: its meta ({meta}) does not match its name and the cache")
  missing = [s for s in range(first, end) if member_name(s) not in names]
  if missing:
    raise ShardError(f"truncated or corrupt shard {path} (no step {missing[0]})")
  return ShardInfo(path, cell, index, count, first, end, rows)


def list_shards(shard_dir: str) -> dict[int, dict[int, list[str]]]:
  """cell -> process count -> shard paths found (any validity)."""
  out: dict[int, dict[int, list[str]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  if os.path.isdir(shard_dir):
    for name in sorted(os.listdir(shard_dir)):
      match = SHARD_NAME.match(name)
      if match:
        cell, _, count = (int(g) for g in match.groups())
        out[cell][count].append(os.path.join(shard_dir, name))
  return out


def cells_of(first: int, end: int, steps_per_shard: int) -> Iterator[tuple[int, int, int]]:
  """(cell, first, end) of each cell's part of the global steps [first, end)."""
  for cell in range(first // steps_per_shard, (end - 1) // steps_per_shard + 1):
    yield (cell, max(first, cell * steps_per_shard), min(end, (cell + 1) * steps_per_shard))


def complete_set(shard_dir: str, cell: int, counts: Sequence[int], header: dict,
                  first: int | None, end: int | None, verify: bool = False
                  ) -> tuple[list[ShardInfo] | None, list[str]]:
  """A full set of process slices of one cell (any process count) whose shards are whole and
  all hold steps [first, end) (None: whatever they hold in common), or None and what is wrong
  with each candidate set."""
  problems = []
  for count in sorted(counts):
    infos = []
    for index in range(count):
      try:
        infos.append(inspect_shard(os.path.join(shard_dir, shard_name(cell, index, count)),
                                   header["key_digest"], header["steps_per_shard"],
                                   header["batch_size"], verify))
      except ShardError as e:
        problems.append(str(e))
    if len(infos) < count:
      continue
    lo = max(i.first_step for i in infos) if first is None else first
    hi = min(i.end_step for i in infos) if end is None else end
    short = [i for i in infos if not i.covers(lo, hi)] if lo < hi else infos
    if not short:
      return infos, []
    problems.extend(f"shard {i.path} holds steps {i.first_step}..{i.end_step}, steps "
                    f"{lo}..{hi} are needed" for i in short)
  return None, problems


def read_header(cache_dir: str) -> dict:
  if not os.path.exists(cache_dir):
    raise FileNotFoundError(f"teacher cache directory {cache_dir!r} does not exist: build it "
                            f"with python -m mbert_jax.teacher_cache --config=<the run's config> "
                            f"--workdir={cache_dir}")
  if not os.path.isdir(cache_dir):
    raise NotADirectoryError(f"teacher cache {cache_dir!r} is not a directory")
  path = os.path.join(cache_dir, HEADER_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{cache_dir!r} is not a teacher cache (no {HEADER_FILE}): build one with "
                     f"python -m mbert_jax.teacher_cache --workdir={cache_dir}")
  try:
    with open(path) as f:
      header = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"teacher cache header {path} is unreadable ({e})") from None
  if header.get("format") != FORMAT_VERSION:
    raise ValueError(f"teacher cache {cache_dir!r} has format {header.get('format')!r}, this "
                     f"code reads format {FORMAT_VERSION}: rebuild it")
  return header
