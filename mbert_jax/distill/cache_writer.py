"""Writing a teacher cache: run the teacher once over every batch of a run's pre-training
distillation (PD) stage and store its top-k logits (`cache_format` describes the files).

The pipeline is step-indexed (the batch of global step s, dynamic masks included, is a pure
function of the config), so the writer knows every batch the PD stage will see and stores, for
every prediction slot, the teacher's top-k logits and the log-normaliser that keeps them a
distribution (see `losses.sparse_kd_loss`). Rerunning the writer completes a cache: it keeps
whole shards and rewrites missing, partial or corrupt ones.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mbert_jax.data import build_pipeline
from mbert_jax.distill.cache_config import (cache_settings, cached_steps, digest, identity_key,
                                            refuse_other_key, resolve_teacher_step)
from mbert_jax.distill.cache_format import (FORMAT_VERSION, HEADER_FILE, META_MEMBER, SHARD_DIR,
                                            ShardError, ShardInfo, cells_of, complete_set,
                                            header_record_dtype, index_dtype, inspect_shard,
                                            list_shards, member_name, read_header, record_dtype,
                                            row_digests, shard_name, slice_rows)
from mbert_jax.distill.teacher import load_teacher
from mbert_jax.models import build
from mbert_jax.training import sharding
from mbert_jax.training.metrics import Progress
from mbert_jax.training.workdir import write_json

WRITER_REPORT = "writer_report.json"
# Shard size when teacher_cache.steps_per_shard = 0: big enough that a 500k-step stage is a
# few thousand files, small enough that an interrupted write loses little.
AUTO_SHARD_BYTES = 256 << 20
MAX_AUTO_STEPS_PER_SHARD = 1000
ZIP_LEVEL = 1  # deflate level: level 6+ buys ~1% on these arrays at 3x the time
# Fixed member timestamps make a rewritten shard byte-identical to the one it replaces.
ZIP_DATE = (2020, 1, 1, 0, 0, 0)
# float16's largest finite magnitude: logits further below the top-1 carry no probability.
FLOAT16_FLOOR = -65504.0

log = logging.getLogger(__name__)


def steps_per_shard_for(settings, batch_size: int, process_count: int, rec: np.dtype) -> int:
  if settings.steps_per_shard:
    return int(settings.steps_per_shard)
  per_step = max(1, batch_size // process_count * rec.itemsize)
  return int(min(MAX_AUTO_STEPS_PER_SHARD, max(1, AUTO_SHARD_BYTES // per_step)))


def make_header(key: dict, settings, pipeline, process_count: int) -> dict:
  rec = record_dtype(pipeline.max_predictions_per_seq, int(settings.k), settings.value_dtype,
                     pipeline.vocab_size)
  return {
      "format": FORMAT_VERSION, "key": key, "key_digest": digest(key),
      "k": int(settings.k), "value_dtype": settings.value_dtype,
      "index_dtype": str(index_dtype(pipeline.vocab_size)),
      "batch_size": int(pipeline.batch_size),
      "max_predictions_per_seq": int(pipeline.max_predictions_per_seq),
      "vocab_size": int(pipeline.vocab_size),
      "steps_per_shard": steps_per_shard_for(settings, pipeline.batch_size, process_count, rec),
      "process_count": int(process_count),
  }


def make_targets_fn(teacher_model, k: int, temperature: float, value_dtype: str, idx_dtype):
  """f(params, batch) -> (values, indices, log_normalizer) of one global batch, on device.

  The normaliser is computed from the rounded values that will be stored plus the exact
  float32 tail, so the stored entries and the rest mass add up to 1 as stored.
  """

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


def jit_targets_fn(teacher_model, k: int, temperature: float, value_dtype: str, idx_dtype,
                   mesh, rules):
  """`make_targets_fn` compiled over `mesh`, as the writer runs it and the planner plans it.
  Outputs keep the batch's row sharding, so each process can take exactly its own rows."""
  rows_3d, rows_2d = sharding.batch_sharding(mesh, 3), sharding.batch_sharding(mesh, 2)
  return jax.jit(sharding.under_rules(make_targets_fn(teacher_model, k, temperature,
                                                      value_dtype, idx_dtype), mesh, rules),
                 out_shardings=(rows_3d, rows_3d, rows_2d))


def records_from(values: np.ndarray, indices: np.ndarray, normalizer: np.ndarray,
                  digests: np.ndarray, rec: np.dtype) -> np.ndarray:
  records = np.empty(len(digests), rec)
  records["values"], records["indices"] = values, indices
  records["log_normalizer"], records["digest"] = normalizer, digests
  return records


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


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
    self._write(member_name(step), _npy_bytes(records))

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
  found = list_shards(shard_dir)
  todo = []
  for cell, a, b in cells_of(first, end, int(header["steps_per_shard"])):
    if cell in found and complete_set(shard_dir, cell, list(found[cell]), header, a, b,
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
  if jax.process_count() == 1:
    return todo
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


def _header_for(workdir: str, key: dict, settings, pipeline, process_count: int) -> dict:
  """The header of the cache in `workdir`: the existing one, if it was built for `key`, else a
  new one written there."""
  header_path = os.path.join(workdir, HEADER_FILE)
  if os.path.exists(header_path):
    header = read_header(workdir)
    refuse_other_key(workdir, header["key"], key)
  else:
    header = make_header(key, settings, pipeline, process_count)
    write_json(header_path, header)
  if settings.steps_per_shard and settings.steps_per_shard != header["steps_per_shard"]:
    log.warning("teacher_cache.steps_per_shard = %d ignored: the cache in %s uses %d",
                settings.steps_per_shard, workdir, header["steps_per_shard"])
  return header


def _teacher_targets_fn(config, header: dict, temperature: float, teacher_step: int, pipe):
  """(jitted targets function, teacher params, mesh) for the teacher the key names."""
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
    raise ValueError(f"teacher_cache.k = {header['k']} exceeds the vocabulary "
                     f"({pipe.vocab_size})")
  fn = jit_targets_fn(build(t_cfg), header["k"], temperature, header["value_dtype"],
                      np.dtype(header["index_dtype"]), mesh, rules)
  return fn, t_params, mesh


def _write_cells(fn, t_params, mesh, pipe, header: dict, todo: list[tuple[int, int, int]],
                 shard_dir: str, progress: bool) -> tuple[int, int]:
  """Runs the teacher on the steps of every (cell, first, end) in `todo` and writes this
  process's rows, one shard per cell; returns (steps computed, bytes written)."""
  pi, pc = jax.process_index(), jax.process_count()
  rec = header_record_dtype(header)
  batch_spec = sharding.batch_sharding(mesh, 2).spec

  def local(x):
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
          writer.add(s, records_from(local(values), local(indices), local(normalizer),
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
  return total, written_bytes


def write_cache(config, workdir: str, *, verify: bool = False, progress: bool = True) -> dict:
  """Builds (or completes) the cache of `config`'s PD stage in `workdir`; returns a report."""
  t_start = time.time()
  settings = cache_settings(config)
  first, end = cached_steps(config)
  teacher_step = resolve_teacher_step(config.teacher)
  os.makedirs(workdir, exist_ok=True)
  pipe = build_pipeline(config.data, workdir, split="train")
  key = identity_key(config, teacher_step, pipe)
  pi, pc = jax.process_index(), jax.process_count()
  header = _header_for(workdir, key, settings, pipe, pc)
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

  fn, t_params, mesh = _teacher_targets_fn(config, header, key["targets"]["temperature"],
                                           teacher_step, pipe)
  shard_dir = os.path.join(workdir, SHARD_DIR)
  os.makedirs(shard_dir, exist_ok=True)
  total, written_bytes = _write_cells(fn, t_params, mesh, pipe, header, todo, shard_dir,
                                      progress)
  if pc > 1:
    multihost_utils.sync_global_devices("teacher_cache_written")
  seconds = time.time() - t_start
  sequences = total * (pipe.batch_size // pc)
  report.update(seconds=seconds, steps_computed=total,
                bytes_per_sequence=written_bytes / max(sequences, 1))
  return report


def summary(report: dict) -> str:
  first, end = report["steps"]
  text = (f"teacher cache {report['directory']}: steps {first}..{end}, k = {report['k']}, "
          f"{report['cells_written']} shard(s) written, {report['cells_kept']} kept, "
          f"{report['seconds']:.1f} s")
  if "bytes_per_sequence" in report:
    text += f", {report['bytes_per_sequence']:.0f} bytes per sequence"
  return text
