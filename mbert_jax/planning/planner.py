"""Compile every program of a run for a target, and read what the compiled programs say.

Per program: the per-device memory plan of the compiled program (`memory_analysis()`), its
collectives and memory traffic (`hlo.analyse`), the analytic FLOPs of `models.summary`, and a
projected step time, the largest of

    compute     FLOPs per step / (devices x dense bf16 peak per device)
    memory      bytes moved through device memory per step / HBM bandwidth per device
    collectives bytes each device sends per step / interconnect bandwidth per device

with the per-device figures of `hardware`'s tables. Then the schedule (steps x step time per
stage, in hours and chip-hours), and with `fit` the largest batch that fits, found by
compiling.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mbert_jax.planning import hlo
from mbert_jax.planning.hardware import Target
from mbert_jax.planning.programs import Program, RunPrograms, ScheduleEntry
from mbert_jax.training import sharding

BYTE_FIELDS = ("arguments", "outputs", "temporaries", "donated", "total")
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# The mesh `suggestion` tries for a program that does not fit: every device an fsdp shard
# (parameters, gradients and optimizer state split across all of them).
_FSDP = {"data": 1, "fsdp": -1, "tensor": 1}


@dataclasses.dataclass
class Compiled:
  """One program compiled at one batch on one mesh (or refused for memory by the compiler)."""
  batch: int
  bytes: dict[str, float | None]
  fits: bool
  traffic: hlo.ProgramTraffic | None
  seconds: float
  error: str = ""
  executable: Any = None
  args: tuple = ()


@dataclasses.dataclass
class Row:
  """A program's line in the plan."""
  program: Program
  compiled: Compiled
  flops_per_step: float
  compute_seconds: float | None
  memory_seconds: float | None
  collective_seconds: float | None
  max_fitting_batch: int | None = None
  fit_evidence: str = ""
  fit_compiled: Compiled | None = None  # the program at `max_fitting_batch`
  suggestion: str = ""
  measured: dict | None = None

  @property
  def projected_step_seconds(self) -> float | None:
    parts = [self.compute_seconds, self.memory_seconds, self.collective_seconds]
    if self.compiled.traffic is None or any(p is None for p in parts):
      return None
    return max(parts)

  @property
  def bound(self) -> str:
    parts = {"compute": self.compute_seconds, "memory": self.memory_seconds,
             "collectives": self.collective_seconds}
    if any(v is None for v in parts.values()):
      return ""
    return max(parts, key=parts.get)


def _parse_size(number: str, unit: str) -> float:
  return float(number) * _UNITS.get(unit.upper()[:1], 1)


def _shard_bytes(structs) -> float:
  """Per-device bytes of ShapeDtypeStructs carrying their shardings (the largest shard)."""
  total = 0.0
  for s in jax.tree.leaves(structs):
    shape = s.sharding.shard_shape(s.shape) if getattr(s, "sharding", None) else s.shape
    total += math.prod(shape) * jnp.dtype(s.dtype).itemsize
  return total


def out_of_memory(message: str) -> dict[str, float] | None:
  """What XLA's out-of-memory refusal says a program needs, or None for another error."""
  if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
    return None
  out: dict[str, float] = {}
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)i?B?\)", message)
  if m:
    out["temporaries"] = _parse_size(*m.groups())
  m = re.search(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm", message)
  if m:
    out["total"] = _parse_size(m.group(1), m.group(2))
  m = re.search(r"available HBM \(([\d.]+)([KMGT]?)i?B?\)", message)
  if m:
    out["available"] = _parse_size(*m.groups())
  return out


def compile_program(program: Program, target: Target, batch: int, *, remat: bool | None = None,
                    mesh_cfg=None, headroom: float = 0.0) -> Compiled:
  """`program` at `batch` on `mesh_cfg` (the program's own by default), compiled for `target`.
  A program the compiler refuses for memory comes back as not fitting, its sizes from the
  refusal (arguments and outputs from the shapes); any other error raises."""
  mesh = sharding.make_mesh(program.mesh_cfg if mesh_cfg is None else mesh_cfg, target.devices)
  sharding.check_batch_divisible(batch, mesh, program.grad_accum)
  t0 = time.perf_counter()
  fn, args = program.build(mesh, batch, program.remat if remat is None else remat)
  lowered = fn.lower(*args)
  limit = None if target.memory_bytes is None else target.memory_bytes * (1.0 - headroom)
  try:
    with warnings.catch_warnings():
      # jax's persistent cache (JAX_COMPILATION_CACHE_DIR) stores a compile-only executable but
      # cannot load one back; it warns and compiles, which is what happens here anyway.
      warnings.filterwarnings("ignore", message="Error reading persistent compilation cache")
      executable = lowered.compile()
  except Exception as e:  # jax raises the runtime's error types, which vary by backend
    oom = out_of_memory(str(e))
    if oom is None:
      raise
    # A train step (state, aux, batch) donates its state; the cache writer donates nothing.
    donated = _shard_bytes(args[0]) if len(args) == 3 else 0.0
    arguments = _shard_bytes(args)
    outputs = _shard_bytes(jax.eval_shape(fn, *args))
    temps = oom.get("temporaries")
    total = oom.get("total")
    if total is None and temps is not None:
      total = arguments + outputs + temps - donated
    sizes = {"arguments": arguments, "outputs": outputs, "temporaries": temps,
             "donated": donated, "total": total}
    return Compiled(batch, sizes, False, None, time.perf_counter() - t0,
                    error=" ".join(str(e).split())[:300])
  m = executable.memory_analysis()
  sizes = {"arguments": float(m.argument_size_in_bytes), "outputs": float(m.output_size_in_bytes),
           "temporaries": float(m.temp_size_in_bytes), "donated": float(m.alias_size_in_bytes)}
  sizes["total"] = (sizes["arguments"] + sizes["outputs"] + sizes["temporaries"]
                    - sizes["donated"])
  traffic = hlo.analyse(executable.as_text(), target.num_devices)
  fits = True if limit is None else sizes["total"] <= limit
  return Compiled(batch, sizes, fits, traffic, time.perf_counter() - t0, executable=executable,
                  args=args)


def project(program: Program, compiled: Compiled, target: Target) -> Row:
  flops = program.flops_per_example * compiled.batch
  compute = memory = links = None
  if target.peak_flops:
    compute = flops / (target.num_devices * target.peak_flops)
  if compiled.traffic is not None and target.hbm_bytes_per_s:
    memory = compiled.traffic.memory_bytes / target.hbm_bytes_per_s
  if compiled.traffic is not None and target.link_bytes_per_s:
    links = compiled.traffic.link_bytes / target.link_bytes_per_s
  return Row(program, compiled, flops, compute, memory, links)


# ============================================================================ --fit

def _unit(program: Program, target: Target, mesh_cfg) -> int:
  data, fsdp, _ = sharding.mesh_shape(mesh_cfg, target.num_devices)
  return data * fsdp * program.grad_accum


def fits_in(c: Compiled, limit: float) -> bool:
  """Whether a compiled program stays under `limit` (one the compiler refused never does)."""
  return c.traffic is not None and c.bytes["total"] <= limit


def largest_fitting_batch(program: Program, target: Target, headroom: float,
                          first: Compiled | None = None,
                          log: Callable[[str], None] = lambda s: None
                          ) -> tuple[int | None, str, Compiled | None]:
  """The largest global batch (a multiple of the data-parallel size times the accumulation
  steps) whose compiled program fits, the compiled batches that show it ('fits at b, not at
  b + unit') and the program compiled at that batch. The first two candidates come from an
  affine fit of the compiled sizes, the rest from bisection; only compiles decide. None: not
  even one row per shard fits."""
  unit = _unit(program, target, program.mesh_cfg)
  limit = target.memory_bytes * (1.0 - headroom)
  seen: dict[int, Compiled] = {}

  def fits(b: int) -> bool:
    if b not in seen:
      seen[b] = first if first is not None and first.batch == b else compile_program(
          program, target, b, headroom=headroom)
      verdict = "fits" if fits_in(seen[b], limit) else "does not fit"
      log(f"  {program.name}: batch {b} {verdict}")
    return fits_in(seen[b], limit)

  def extrapolated() -> int | None:
    known = sorted((b, c.bytes["total"]) for b, c in seen.items() if c.bytes.get("total"))
    if len(known) < 2 or known[-1][0] == known[0][0]:
      return None
    (b1, m1), (b2, m2) = known[0], known[-1]
    slope = (m2 - m1) / (b2 - b1)
    return None if slope <= 0 else int((limit - (m1 - slope * b1)) / slope) // unit * unit

  start = max(program.global_batch // unit * unit, unit)
  lo, hi = (start, None) if fits(start) else (None, start)
  while lo is None:  # halve until something fits
    b = max(unit, hi // 2 // unit * unit)
    if fits(b):
      lo = b
    elif b == unit:
      return (None, f"batch {unit} ({unit // program.grad_accum} per data shard) does not fit",
              None)
    else:
      hi = b
  guesses = 2
  while hi is None or hi - lo > unit:
    b = extrapolated() if guesses else None
    guesses = max(guesses - 1, 0)
    if b is None or b <= lo or (hi is not None and b >= hi):
      b = lo * 2 if hi is None else (lo + hi) // 2 // unit * unit
    if hi is None and b > 64 * start:
      return (lo, f"fits at {lo}; larger batches were not tried (64x the configured one)",
              seen[lo])
    if fits(b):
      lo = b
    else:
      hi = b
  return lo, f"fits at {lo}, not at {hi}", seen[lo]


def suggestion(program: Program, target: Target, headroom: float,
               log: Callable[[str], None] = lambda s: None) -> str:
  """A setting that makes the configured batch fit (tried by compiling), or ''."""
  tries = []
  if program.remat_field and not program.remat:
    tries.append(({"remat": True}, f"--config.{program.remat_field}=True"))
  data, fsdp, tensor = sharding.mesh_shape(program.mesh_cfg, target.num_devices)
  if (data, fsdp, tensor) != (1, target.num_devices, 1):
    flags = "--config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1"
    tries.append(({"mesh_cfg": _FSDP}, flags))
    if program.remat_field and not program.remat:
      tries.append(({"mesh_cfg": _FSDP, "remat": True},
                    f"{flags} --config.{program.remat_field}=True"))
  for kwargs, flags in tries:
    mesh_cfg = kwargs.get("mesh_cfg", program.mesh_cfg)
    if program.global_batch % _unit(program, target, mesh_cfg):
      continue
    c = compile_program(program, target, program.global_batch, headroom=headroom, **kwargs)
    log(f"  {program.name}: batch {program.global_batch} with {flags}: "
        f"{'fits' if c.fits else 'does not fit'}")
    if c.fits:
      return flags
  return ""


# ============================================================================ schedule

def schedule(rows: dict[str, Row], entries: list[ScheduleEntry], group: str,
             chips: int) -> dict[str, Any] | None:
  """Hours and chip-hours of one group's stages (steps x projected step time), and the most
  expensive stage; None when none of the group's programs was planned, projected hours None
  when a step time is missing."""
  stages = []
  mine = [e for e in entries if e.group == group]
  if not any(r in rows for e in mine for r in e.rows):
    return None  # none of the group's programs planned (--only): nothing to sum
  for e in mine:
    times = [rows[r].projected_step_seconds if r in rows else None for r in e.rows]
    step = None if any(t is None for t in times) else sum(w * t for w, t in zip(e.weights, times))
    hours = None if step is None else e.steps * step / 3600.0
    stages.append({"stage": e.stage, "steps": e.steps, "step_seconds": step, "hours": hours,
                   "programs": list(e.rows),
                   "interpolated": len(e.rows) > 1})
  if not stages:
    return None
  known = [s for s in stages if s["hours"] is not None]
  hours = sum(s["hours"] for s in known) if len(known) == len(stages) else None
  top = max(known, key=lambda s: s["hours"])["stage"] if known else None
  return {"projected_hours": hours, "chip_hours": None if hours is None else hours * chips,
          "most_expensive_stage": top, "stages": stages}


# ============================================================================ measuring (local)

def measure(row: Row, steps: int) -> dict[str, float]:
  """Runs a compiled program `steps` times on this machine's devices (zeros for every input)
  and returns the median step time and the device's peak memory."""
  c = row.compiled
  make = lambda s: jax.jit(lambda: jnp.zeros(s.shape, s.dtype), out_shardings=s.sharding)()
  args = jax.tree.map(make, c.args)
  times = []
  out = c.executable(*args)
  jax.block_until_ready(out)
  train_step = len(args) == 3
  for _ in range(steps):
    if train_step:
      args = (out[0],) + tuple(args[1:])
    t0 = time.perf_counter()
    out = c.executable(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  peak = None
  try:
    peak = float(max(d.memory_stats().get("peak_bytes_in_use", 0) for d in jax.local_devices()))
  except Exception:  # not every runtime reports memory statistics
    logging.info("no memory statistics on %s", jax.local_devices()[0].device_kind)
  times.sort()
  return {"step_seconds": times[len(times) // 2] if times else None, "peak_bytes": peak}


# ============================================================================ the plan

@dataclasses.dataclass
class Plan:
  target: Target
  rows: list[Row]
  run: RunPrograms
  headroom: float
  fit: bool

  def by_name(self) -> dict[str, Row]:
    return {r.program.name: r for r in self.rows}

  def schedule(self, group: str = "run") -> dict[str, Any] | None:
    return schedule(self.by_name(), self.run.schedule, group, self.target.chips)


def check_batches(run: RunPrograms, target: Target) -> None:
  """A mesh that does not match the devices, or a configured batch it does not divide: one
  ValueError before anything compiles."""
  for p in run.programs:
    mesh = sharding.make_mesh(p.mesh_cfg, target.devices)
    try:
      sharding.check_batch_divisible(p.global_batch, mesh, p.grad_accum)
    except ValueError as e:
      raise ValueError(f"{p.name}: {e}") from e


def make_plan(run: RunPrograms, target: Target, *, headroom: float = 0.1, fit: bool = False,
              only: tuple[str, ...] = (), measure_steps: int = 0,
              log: Callable[[str], None] = lambda s: None) -> Plan:
  """Compiles each program (those named in `only`, when given) for `target`."""
  if not 0.0 <= headroom < 1.0:
    raise ValueError(f"--headroom={headroom}: a fraction of device memory in [0, 1)")
  programs = [p for p in run.programs if not only or p.name in only]
  unknown = sorted(set(only) - {p.name for p in run.programs})
  if unknown:
    raise ValueError(f"no program named {', '.join(unknown)}; the run's programs: "
                     + ", ".join(p.name for p in run.programs))
  check_batches(RunPrograms(programs, run.schedule, run.notes), target)
  rows = []
  for p in programs:
    log(f"compiling {p.name} (batch {p.global_batch} x {p.seq}) for {target.name} ...")
    c = compile_program(p, target, p.global_batch, headroom=headroom)
    row = project(p, c, target)
    log(f"  {c.seconds:.0f} s")
    if fit and target.memory_bytes is not None:
      row.max_fitting_batch, row.fit_evidence, row.fit_compiled = largest_fitting_batch(
          p, target, headroom, c, log)
      if not c.fits:
        row.suggestion = suggestion(p, target, headroom, log)
    if measure_steps and not target.compile_only and c.executable is not None:
      row.measured = measure(row, measure_steps)
    rows.append(row)
  return Plan(target, rows, run, headroom, fit)


def as_json(plan: Plan) -> dict[str, Any]:
  """The plan in the shape outside checks read (issue 19's contract), plus the inputs of each
  projection."""
  t = plan.target
  programs = []
  for r in plan.rows:
    c = r.compiled
    collectives = {k: {"count": v.count, "bytes": v.bytes}
                   for k, v in (c.traffic.collectives.items() if c.traffic else [])}
    entry = {
        "name": r.program.name, "stage": r.program.stage, "kind": r.program.kind,
        "group": r.program.group, "global_batch": c.batch, "seq": r.program.seq,
        "bytes": {k: c.bytes.get(k) for k in BYTE_FIELDS}, "fits": c.fits,
        "flops_per_step": r.flops_per_step,
        "projected_step_seconds": r.projected_step_seconds,
        "collectives": collectives,
        "projection": {"compute_seconds": r.compute_seconds, "memory_seconds": r.memory_seconds,
                       "collective_seconds": r.collective_seconds, "bound": r.bound,
                       "memory_traffic_bytes": c.traffic.memory_bytes if c.traffic else None,
                       "link_bytes": c.traffic.link_bytes if c.traffic else None},
        "compile_seconds": c.seconds, "note": r.program.note, "error": c.error}
    if plan.fit:
      entry["max_fitting_batch"] = r.max_fitting_batch
      entry["fit_evidence"] = r.fit_evidence
      entry["suggestion"] = r.suggestion
    if r.measured is not None:
      entry["measured"] = r.measured
    programs.append(entry)
  sched = plan.schedule("run") or {"projected_hours": None, "chip_hours": None,
                                   "most_expensive_stage": None, "stages": []}
  teacher = plan.schedule("teacher")
  if teacher is not None:
    sched["teacher_pretraining"] = teacher
  return {"topology": t.name, "devices": t.num_devices, "chips": t.chips,
          "device_kind": t.device_kind, "device_memory_bytes": t.memory_bytes,
          "headroom": plan.headroom,
          "per_device": {"peak_bf16_flops": t.peak_flops, "hbm_bytes_per_s": t.hbm_bytes_per_s,
                         "link_bytes_per_s": t.link_bytes_per_s},
          "programs": programs, "schedule": sched, "notes": list(plan.run.notes)}
