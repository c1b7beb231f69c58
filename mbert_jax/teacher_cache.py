"""Cached teacher targets for pre-training distillation: run the teacher once, read it back.

    python -m mbert_jax.teacher_cache --config=configs/distill_mobilebert.py --workdir=<cache>

The pipeline is step-indexed (the batch of global step s, dynamic masks included, is a pure
function of the config), so the writer knows every batch the pre-training distillation (PD)
stage will see and stores, for every prediction slot, the teacher's top-k logits and the
log-normaliser that keeps them a distribution (see `losses.sparse_kd_loss`). A run then reads

    cache = open_cache(cache_dir, identity_key(config, teacher_step, pipe), steps=(first, end))
    batch.update(cache.targets_at(step, process_index, process_count, batch=batch))

and the PD stage runs without the teacher. Refusals happen in `open_cache`, before anything
compiles: another identity key (naming each differing field), a missing, truncated or corrupt
shard (naming the file), or steps the cache does not hold.

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
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import time
import zipfile
import zlib
from typing import Any, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

FORMAT_VERSION = 1
HEADER_FILE = "cache.json"
SHARD_DIR = "shards"
WRITER_REPORT = "writer_report.json"
META_MEMBER = "meta.json"
TARGET_KEYS = ("teacher_topk_values", "teacher_topk_indices", "teacher_log_normalizer")
VALUE_DTYPES = ("float16", "float32")
# Shard size when teacher_cache.steps_per_shard = 0: big enough that a 500k-step stage is a
# few thousand files, small enough that an interrupted write loses little.
AUTO_SHARD_BYTES = 256 << 20
MAX_AUTO_STEPS_PER_SHARD = 1000
ZIP_LEVEL = 1  # deflate level: level 6+ buys ~1% on these arrays at 3x the time
# Fixed member timestamps make a rewritten shard byte-identical to the one it replaces.
ZIP_DATE = (2020, 1, 1, 0, 0, 0)
# float16's largest finite magnitude: logits further below the top-1 carry no probability.
FLOAT16_FLOOR = -65504.0
# Data settings that decide which batch a step gets; the tokenizer and corpus enter as digests.
DATA_FIELDS = ("source", "text_field", "max_seq_length", "max_predictions_per_seq",
               "masked_lm_prob", "short_seq_prob", "whole_word_mask", "batch_size", "seed",
               "dynamic_masking", "dupe_factor", "pairing_rounds", "sentence_splitter",
               "document_grouping", "min_document_sentences", "max_line_chars",
               "max_document_chars")
SHARD_NAME = re.compile(r"^c(\d{7})\.p(\d+)of(\d+)\.zip$")

log = logging.getLogger(__name__)


# ============================================================================ config

def default_cache_config() -> ml_collections.ConfigDict:
  """The `teacher_cache` section (writer settings). The reader's switch is
  `schedule.teacher_cache` (a cache directory; empty = the teacher runs online)."""
  c = ml_collections.ConfigDict()
  c.k = 64                    # teacher logits kept per prediction (20 x 64 x 4 B = 5.1 KB/seq)
  c.value_dtype = "float16"   # float16 | float32 (exactness checks)
  c.steps_per_shard = 0       # 0 = auto, about 256 MiB per shard file
  return c


def cache_settings(config) -> ml_collections.ConfigDict:
  """`config.teacher_cache` over the defaults (configs may predate the section), validated."""
  out = default_cache_config()
  given = config.get("teacher_cache") if hasattr(config, "get") else None
  given = {} if given is None else (given.to_dict() if hasattr(given, "to_dict") else dict(given))
  unknown = sorted(set(given) - set(out.keys()))
  if unknown:
    raise ValueError(f"unknown teacher_cache field(s) {unknown}; known: {sorted(out.keys())}")
  for key, value in given.items():
    out[key] = value
  if not isinstance(out.k, int) or out.k < 1:
    raise ValueError(f"teacher_cache.k = {out.k!r}: a positive number of logits per prediction")
  if out.value_dtype not in VALUE_DTYPES:
    raise ValueError(f"teacher_cache.value_dtype = {out.value_dtype!r}: one of {VALUE_DTYPES}")
  if not isinstance(out.steps_per_shard, int) or out.steps_per_shard < 0:
    raise ValueError(f"teacher_cache.steps_per_shard = {out.steps_per_shard!r}: >= 0 (0 = auto)")
  return out


def cache_dir_of(config) -> str:
  """`schedule.teacher_cache`: where a run reads its PD targets; '' = teacher online."""
  return str(config.schedule.get("teacher_cache", "") or "").strip()


def schedule_stages(config) -> list:
  """The run's stages. `teacher_cache` is a reading switch, not a stage setting, so it is
  dropped before the schedule builder (which refuses keys it does not know) sees it."""
  from mbert_jax import schedule as schedule_lib
  sched = config.schedule
  sched = sched.to_dict() if hasattr(sched, "to_dict") else dict(sched)
  sched.pop("teacher_cache", None)
  return schedule_lib.build_schedule(sched, int(config.model.num_hidden_layers))


def is_cacheable(stage) -> bool:
  """A stage whose only use of the teacher is its MLM distribution (the 'kd' term)."""
  return (stage.weight("kd") > 0 and not stage.transfer_layers and stage.num_layers is None)


def distillation_stage(stages: Sequence) -> tuple[int, int]:
  """(index, first global step) of the pre-training distillation stage: the last cacheable one."""
  start, found = 0, None
  for index, stage in enumerate(stages):
    if is_cacheable(stage):
      found = (index, start)
    start += stage.steps
  if found is None:
    raise ValueError("the schedule has no pre-training distillation stage to cache (a stage "
                     "with a 'kd' weight and no layer-wise terms); stages: "
                     + ", ".join(s.name for s in stages))
  return found


def _pd_steps(config, stages: Sequence) -> tuple[int, int, int]:
  """(stage index, first, end): global steps of the PD stage that this run executes
  (train.steps may stop it early, or before it starts: end <= first)."""
  index, first = distillation_stage(stages)
  end = first + stages[index].steps
  limit = int(config.train.get("steps", -1)) if "train" in config else -1
  return index, first, end if limit == -1 else min(end, limit)


def cached_steps(config, stages: Sequence | None = None) -> tuple[int, int]:
  """Global steps [first, end) of the PD stage that this run executes (train.steps may stop it
  early); refused when the run stops before the stage starts."""
  stages = schedule_stages(config) if stages is None else stages
  index, first, end = _pd_steps(config, stages)
  limit = config.train.get("steps", -1)
  if end <= first:
    raise ValueError(f"train.steps = {limit} stops the run before its distillation stage "
                     f"`{stages[index].name}` (global steps {first}.."
                     f"{first + stages[index].steps})")
  return first, end


# ============================================================================ identity

def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _digest(obj: Any) -> str:
  return _sha256(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


def _checkpoint_steps(run_dir: str) -> list[int]:
  from mbert_jax.workdir import CHECKPOINT_DIR
  root = os.path.join(run_dir, CHECKPOINT_DIR)
  if not os.path.isdir(root):
    return []
  # orbax renames a step directory into place when it is complete; temporaries carry suffixes.
  return sorted(int(n) for n in os.listdir(root)
                if n.isdigit() and os.path.isdir(os.path.join(root, n)))


def resolve_teacher_step(teacher_cfg) -> int:
  """The checkpoint step a teacher config names, found without loading any parameter:
  `teacher.step`, else the newest step of an mbert-jax run; -1 for a Hugging Face directory."""
  from mbert_jax.workdir import is_mbert_workdir
  path = str(teacher_cfg.checkpoint or "")
  if not path:
    raise ValueError("teacher.checkpoint is empty: the cache needs the teacher that made it")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"teacher.checkpoint = {path!r} is not a directory")
  if not is_mbert_workdir(path):
    return -1
  if int(teacher_cfg.step) >= 0:
    return int(teacher_cfg.step)
  steps = _checkpoint_steps(path)
  if not steps:
    raise FileNotFoundError(f"teacher.checkpoint = {path!r} holds no checkpoint")
  return steps[-1]


def _teacher_fingerprint(path: str) -> str:
  """The teacher's architecture file, plus names and sizes of a Hugging Face directory's weight
  files (an mbert-jax run is pinned by path and step instead)."""
  from mbert_jax.workdir import MODEL_CONFIG_FILE, is_mbert_workdir
  name = MODEL_CONFIG_FILE if is_mbert_workdir(path) else "config.json"
  material = {}
  config_path = os.path.join(path, name)
  if os.path.isfile(config_path):
    with open(config_path) as f:
      model = json.load(f)
    model.pop("compute_dtype", None)  # a key field of its own
    material["config"] = model
  if name == "config.json":
    material["weights"] = sorted((n, os.path.getsize(os.path.join(path, n)))
                                 for n in os.listdir(path)
                                 if n.endswith((".safetensors", ".bin", ".msgpack")))
  return _digest(material)


def identity_key(config, teacher_step: int, pipeline) -> dict[str, Any]:
  """What the cached targets depend on: data, tokenizer, corpus, teacher, k, temperature.

  Writer and reader both call this; `pipeline` is the run's train pipeline (its corpus and
  tokenizer digests catch changed files behind an unchanged config string).
  """
  from mbert_jax.data.pipeline import CACHE_VERSION, complete_data_config
  data = complete_data_config(config.data)
  stages = schedule_stages(config)
  index, _ = distillation_stage(stages)
  settings = cache_settings(config)
  teacher_path = os.path.realpath(str(config.teacher.checkpoint))
  data_key = {field: data[field] for field in DATA_FIELDS}
  # Only a hold-out carved from `source` changes the training documents.
  data_key["eval_fraction"] = None if str(data.eval_source).strip() else float(data.eval_fraction)
  data_key.update(
      pipeline_version=CACHE_VERSION,
      corpus=os.path.basename(os.path.normpath(pipeline.corpus.directory)),
      tokenizer=_sha256(pipeline.tokenizer.to_str().encode())[:16],
      vocab_size=int(pipeline.vocab_size))
  return {
      "format": FORMAT_VERSION,
      "data": data_key,
      "teacher": {"checkpoint": teacher_path, "step": int(teacher_step),
                  "compute_dtype": str(config.teacher.compute_dtype),
                  "model": _teacher_fingerprint(teacher_path)},
      "targets": {"k": int(settings.k), "value_dtype": str(settings.value_dtype),
                  "temperature": float(stages[index].temperature)},
  }


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def key_differences(cached: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  """One line per differing field: `data.seed: cache 12345, this run 7`."""
  a, b = _flatten(cached), _flatten(expected)
  missing = "(absent)"
  return [f"{name}: cache {a.get(name, missing)!r}, this run {b.get(name, missing)!r}"
          for name in sorted(set(a) | set(b))
          if json.dumps(a.get(name, missing)) != json.dumps(b.get(name, missing))]


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
  from mbert_jax.data import BATCH_KEYS
  rows = len(batch[BATCH_KEYS[0]])
  columns = [np.ascontiguousarray(np.asarray(batch[name]).reshape(rows, -1)) for name in BATCH_KEYS]
  out = np.empty(rows, np.uint64)
  for r in range(rows):
    h = hashlib.blake2b(digest_size=8)
    for column in columns:
      h.update(column[r].tobytes())
    out[r] = int.from_bytes(h.digest(), "little")
  return out


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def _member(step: int) -> str:
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
  missing = [s for s in range(first, end) if _member(s) not in names]
  if missing:
    raise ShardError(f"truncated or corrupt shard {path} (no step {missing[0]})")
  return ShardInfo(path, cell, index, count, first, end, rows)


def _list_shards(shard_dir: str) -> dict[int, dict[int, list[str]]]:
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


def _complete_set(shard_dir: str, cell: int, counts: Sequence[int], header: dict,
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


# ============================================================================ reader

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
      raw = self._zip(info.path).read(_member(step))  # checks the member's CRC
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


def _refuse_other_key(cache_dir: str, cached: Mapping[str, Any],
                      expected: Mapping[str, Any]) -> None:
  differences = key_differences(cached, expected)
  if differences:
    raise ValueError(f"teacher cache {cache_dir!r} was built for other data or another teacher: "
                     + "; ".join(differences)
                     + ". Build a cache for this run in another directory, or set "
                     "schedule.teacher_cache='' to run the teacher online.")


def open_cache(cache_dir: str, expected_key: Mapping[str, Any],
               steps: tuple[int, int] | None = None, verify: bool = False) -> TeacherCache:
  """Opens a cache for reading after checking, before any compile, that it was built for
  `expected_key` (else ValueError naming every differing field) and that every shard holding
  global steps [first, end) is present and whole (else ShardError naming the files).
  `steps=None` checks the shards that are there. `verify` also checks every CRC (slow)."""
  header = read_header(cache_dir)
  _refuse_other_key(cache_dir, header["key"], expected_key)
  shard_dir = os.path.join(cache_dir, SHARD_DIR)
  found = _list_shards(shard_dir)
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
    infos, why = _complete_set(shard_dir, cell, list(found[cell]), header, first_step, end_step,
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
  _, first, end = _pd_steps(config, schedule_stages(config))
  if end <= first:  # this run stops before its PD stage: nothing to read
    return None
  step = resolve_teacher_step(config.teacher) if teacher_step is None else int(teacher_step)
  return open_cache(directory, identity_key(config, step, pipeline), steps=(first, end))


# ============================================================================ writer

def steps_per_shard_for(settings, batch_size: int, process_count: int, rec: np.dtype) -> int:
  if settings.steps_per_shard:
    return int(settings.steps_per_shard)
  per_step = max(1, batch_size // process_count * rec.itemsize)
  return int(min(MAX_AUTO_STEPS_PER_SHARD, max(1, AUTO_SHARD_BYTES // per_step)))


def make_header(key: dict, settings, pipeline, process_count: int) -> dict:
  rec = record_dtype(pipeline.max_predictions_per_seq, int(settings.k), settings.value_dtype,
                     pipeline.vocab_size)
  return {
      "format": FORMAT_VERSION, "key": key, "key_digest": _digest(key),
      "k": int(settings.k), "value_dtype": settings.value_dtype,
      "index_dtype": str(index_dtype(pipeline.vocab_size)),
      "batch_size": int(pipeline.batch_size),
      "max_predictions_per_seq": int(pipeline.max_predictions_per_seq),
      "vocab_size": int(pipeline.vocab_size),
      "steps_per_shard": steps_per_shard_for(settings, pipeline.batch_size, process_count, rec),
      "process_count": int(process_count),
  }


def header_record_dtype(header: Mapping[str, Any]) -> np.dtype:
  return record_dtype(int(header["max_predictions_per_seq"]), int(header["k"]),
                      str(header["value_dtype"]), int(header["vocab_size"]))


def make_targets_fn(teacher_model, k: int, temperature: float, value_dtype: str, idx_dtype):
  """f(params, batch) -> (values, indices, log_normalizer) of one global batch, on device.

  The normaliser is computed from the rounded values that will be stored plus the exact
  float32 tail, so the stored entries and the rest mass add up to 1 as stored.
  """
  import jax
  import jax.numpy as jnp

  def targets(params, batch):
    out = teacher_model.apply(
        {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
        masked_positions=batch["masked_lm_positions"], deterministic=True, heads=True,
        layer_outputs=False)
    logits = out.mlm_logits.astype(jnp.float32)
    top, indices = jax.lax.top_k(logits, k)
    shift = top[..., :1]
    values = jnp.maximum(top - shift, FLOAT16_FLOOR).astype(value_dtype)
    listed = jnp.put_along_axis(jnp.zeros(logits.shape, jnp.bool_), indices, True, axis=-1,
                                inplace=False)
    tail = jax.nn.logsumexp(jnp.where(listed, -jnp.inf, (logits - shift) / temperature), axis=-1)
    head = jax.nn.logsumexp(values.astype(jnp.float32) / temperature, axis=-1)
    return values, indices.astype(idx_dtype), jnp.logaddexp(head, tail)

  return targets


def _records_from(values: np.ndarray, indices: np.ndarray, normalizer: np.ndarray,
                  digests: np.ndarray, rec: np.dtype) -> np.ndarray:
  records = np.empty(len(digests), rec)
  records["values"], records["indices"] = values, indices
  records["log_normalizer"], records["digest"] = normalizer, digests
  return records


class ShardWriter:
  """Writes one shard to `<path>.tmp`, step by step, and renames it into place on `close`."""

  def __init__(self, path: str, meta: dict):
    self.path, self.meta = path, meta
    self._tmp = f"{path}.tmp"
    self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL)

  def _write(self, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    self._zip.writestr(info, data, compresslevel=ZIP_LEVEL)

  def add(self, step: int, records: np.ndarray) -> None:
    self._write(_member(step), _npy_bytes(records))

  def close(self) -> None:
    self._write(META_MEMBER, json.dumps(self.meta, sort_keys=True).encode())
    self._zip.close()
    with open(self._tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    self._zip.close()
    os.remove(self._tmp)


def _own_slice_covers(shard_dir: str, cell: int, first: int, end: int, header: dict,
                      index: int, count: int, verify: bool) -> tuple[bool, ShardInfo | None]:
  try:
    info = inspect_shard(os.path.join(shard_dir, shard_name(cell, index, count)),
                         header["key_digest"], header["steps_per_shard"], header["batch_size"],
                         verify)
  except ShardError as e:
    if not str(e).startswith("missing shard"):
      log.warning("%s: rewriting it", e)
    return False, None
  return info.covers(first, end), info


def plan_cells(cache_dir: str, header: dict, first: int, end: int, process_index: int,
               process_count: int, verify: bool = False) -> list[tuple[int, int, int]]:
  """(cell, first, end) this process must (re)write: cells where no complete, whole set of
  slices holds the needed steps. A partial cell is rewritten to the union of what its own
  slice held and what is needed, so caches for overlapping stages grow into each other."""
  shard_dir = os.path.join(cache_dir, SHARD_DIR)
  found = _list_shards(shard_dir)
  todo = []
  for cell, a, b in cells_of(first, end, int(header["steps_per_shard"])):
    if cell in found and _complete_set(shard_dir, cell, list(found[cell]), header, a, b,
                                       verify)[0] is not None:
      continue
    ok, own = _own_slice_covers(shard_dir, cell, a, b, header, process_index, process_count, verify)
    if own is not None:
      a, b = min(a, own.first_step), max(b, own.end_step)
    todo.append((cell, a, b))
  return todo


def _agree_on_cells(todo: list[tuple[int, int, int]], first: int, end: int, S: int
                    ) -> list[tuple[int, int, int]]:
  """Every process runs the teacher on the same steps (its forward is one global computation):
  the union over processes of the cells and ranges any of them must write."""
  import jax
  if jax.process_count() == 1:
    return todo
  from jax.experimental import multihost_utils
  cells = list(cells_of(first, end, S))
  table = np.full((len(cells), 2), -1, np.int64)
  position = {cell: i for i, (cell, _, _) in enumerate(cells)}
  for cell, a, b in todo:
    table[position[cell]] = (a, b)
  gathered = np.asarray(multihost_utils.process_allgather(table))  # [processes, cells, 2]
  out = []
  for i, (cell, _, _) in enumerate(cells):
    rows = gathered[:, i][gathered[:, i, 0] >= 0]
    if len(rows):
      out.append((cell, int(rows[:, 0].min()), int(rows[:, 1].max())))
  return out


def write_cache(config, workdir: str, *, verify: bool = False, progress: bool = True) -> dict:
  """Builds (or completes) the cache of `config`'s PD stage in `workdir`; returns a report."""
  import jax
  from mbert_jax import sharding
  from mbert_jax.data import build_pipeline
  from mbert_jax.metrics import Progress
  from mbert_jax.models import build
  from mbert_jax.teacher import load_teacher
  from mbert_jax.workdir import write_json

  t_start = time.time()
  settings = cache_settings(config)
  first, end = cached_steps(config)
  teacher_step = resolve_teacher_step(config.teacher)
  os.makedirs(workdir, exist_ok=True)
  pipe = build_pipeline(config.data, workdir, split="train")
  key = identity_key(config, teacher_step, pipe)
  pi, pc = jax.process_index(), jax.process_count()
  header_path = os.path.join(workdir, HEADER_FILE)
  if os.path.exists(header_path):
    header = read_header(workdir)
    _refuse_other_key(workdir, header["key"], key)
  else:
    header = make_header(key, settings, pipe, pc)
    write_json(header_path, header)
  if settings.steps_per_shard and settings.steps_per_shard != header["steps_per_shard"]:
    log.warning("teacher_cache.steps_per_shard = %d ignored: the cache in %s uses %d",
                settings.steps_per_shard, workdir, header["steps_per_shard"])
  if pipe.batch_size % pc:
    raise ValueError(f"data.batch_size = {pipe.batch_size} must divide by the {pc} processes")

  S = int(header["steps_per_shard"])
  todo = _agree_on_cells(plan_cells(workdir, header, first, end, pi, pc, verify), first, end, S)
  report = {"directory": workdir, "steps": [first, end], "k": header["k"],
            "steps_per_shard": S, "cells_written": len(todo),
            "cells_kept": len(list(cells_of(first, end, S))) - len(todo)}
  if not todo:
    report.update(seconds=time.time() - t_start, steps_computed=0)
    return report

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh)
  sharding.check_batch_divisible(pipe.batch_size, mesh)
  pinned = ml_collections.ConfigDict(config.teacher.to_dict())
  if teacher_step >= 0:
    pinned.step = teacher_step  # exactly the step the key names, never a fallback
  t_cfg, t_params = load_teacher(pinned, mesh, rules)
  if t_cfg.vocab_size != pipe.vocab_size:
    raise ValueError(f"teacher vocab_size {t_cfg.vocab_size} != tokenizer {pipe.vocab_size}: "
                     "distill with the teacher's vocabulary")
  if header["k"] > pipe.vocab_size:
    raise ValueError(f"teacher_cache.k = {header['k']} exceeds the vocabulary ({pipe.vocab_size})")
  shard_dir = os.path.join(workdir, SHARD_DIR)
  os.makedirs(shard_dir, exist_ok=True)

  rec = header_record_dtype(header)
  # Outputs keep the batch's row sharding, so each process can take exactly its own rows.
  rows_3d, rows_2d = sharding.batch_sharding(mesh, 3), sharding.batch_sharding(mesh, 2)
  fn = jax.jit(make_targets_fn(build(t_cfg), header["k"], key["targets"]["temperature"],
                               header["value_dtype"], np.dtype(header["index_dtype"])),
               out_shardings=(rows_3d, rows_3d, rows_2d))
  batch_spec = rows_2d.spec

  def local(x):
    from jax.experimental import multihost_utils
    if pc == 1:
      return np.asarray(x)
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, batch_spec))

  total = sum(b - a for _, a, b in todo)
  bar = Progress(total, 0, enabled=progress and pi == 0)
  done, written_bytes = 0, 0
  for cell, a, b in todo:
    path = os.path.join(shard_dir, shard_name(cell, pi, pc))
    meta = {"cell": cell, "first_step": a, "end_step": b, "key_digest": header["key_digest"],
            "rows": list(slice_rows(pipe.batch_size, pi, pc))}
    writer = ShardWriter(path, meta)
    try:
      pending = None
      for step in list(range(a, b)) + [None]:
        # One step ahead: the device computes step s+1 while the host packs step s.
        nxt = None
        if step is not None:
          rows = pipe.batch_at(step, pi, pc)
          nxt = (step, rows, fn(t_params, sharding.global_batch(rows, mesh)))
        if pending is not None:
          s, rows_s, (values, indices, normalizer) = pending
          writer.add(s, _records_from(local(values), local(indices), local(normalizer),
                                      row_digests(rows_s), rec))
          done += 1
          bar.update(done, {"cell": cell})
        pending = nxt
      writer.close()
    except BaseException:
      writer.abort()
      raise
    written_bytes += os.path.getsize(path)
  bar.close()
  if pc > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("teacher_cache_written")
  seconds = time.time() - t_start
  sequences = total * (pipe.batch_size // pc)
  report.update(seconds=seconds, steps_computed=total,
                bytes_per_sequence=written_bytes / max(sequences, 1))
  return report


# ============================================================================ command line

def summary(report: dict) -> str:
  first, end = report["steps"]
  text = (f"teacher cache {report['directory']}: steps {first}..{end}, k = {report['k']}, "
          f"{report['cells_written']} shard(s) written, {report['cells_kept']} kept, "
          f"{report['seconds']:.1f} s")
  if "bytes_per_sequence" in report:
    text += f", {report['bytes_per_sequence']:.0f} bytes per sequence"
  return text


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from mbert_jax import cli
  from mbert_jax.workdir import write_json
  del argv
  FLAGS = flags.FLAGS

  def run():
    config = FLAGS.config
    from mbert_jax.cli import maybe_initialize_distributed
    maybe_initialize_distributed(config.get("distributed") or {})
    report = write_cache(config, FLAGS.workdir, verify=FLAGS.verify,
                         progress=bool(config.train.get("progress_bar", True)))
    write_json(os.path.join(FLAGS.workdir, WRITER_REPORT), report)
    print(summary(report), flush=True)

  cli.guarded(run)


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "the distillation run's config file "
                                  "(configs/<name>.py[:args]); its PD stage is cached",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "the cache directory (schedule.teacher_cache of the run)")
  flags.DEFINE_bool("verify", False, "also check the CRC of every existing shard (reads them "
                    "all) and rewrite the corrupt ones")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
