"""The plan on the console: one row per program, then the schedule, the fits and the notes.
Every time in it is a projection (`planner`'s model), labelled as one."""

from __future__ import annotations

from typing import Any

from mbert_jax.planning.planner import Plan, Row

_SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
          "collective-permute": "CP"}


def size(n: float | None) -> str:
  if n is None:
    return "?"
  for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.1f}{unit}"
  return f"{n:.0f}B"


def _ms(s: float | None) -> str:
  return "-" if s is None else f"{s * 1e3:.3g}"


def _hours(h: float | None) -> str:
  return "?" if h is None else f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def collectives(row: Row) -> str:
  t = row.compiled.traffic
  if t is None:
    return "-"
  parts = [f"{_SHORT[k]} {c.count} ({size(c.bytes)})" for k, c in t.collectives.items() if c.count]
  return ", ".join(parts) or "none"


def header(plan: Plan, config_ref: str) -> list[str]:
  t = plan.target
  mem = "memory unknown" if t.memory_bytes is None else f"{size(t.memory_bytes)} per device"
  lines = [f"plan of {config_ref} on {t.name}: {t.num_devices} devices ({t.device_kind}, "
           f"{t.chips} chips), {mem}, headroom {plan.headroom:.0%}"]
  if t.peak_flops:
    lines.append(f"per device: {t.peak_flops / 1e12:.1f} TFLOP/s dense bf16, "
                 f"{t.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, {t.link_bytes_per_s / 1e9:.0f} GB/s "
                 "interconnect (mbert_jax/planning/hardware.py, from the vendors' tables)")
  else:
    lines.append(f"no peak figures for {t.device_kind}: step times are not projected")
  return lines


def table(plan: Plan) -> list[str]:
  cols = ("program", "batch x seq", "args", "outputs", "temps", "donated", "total", "fits",
          "GFLOP/step", "compute ms", "memory ms", "collect ms", "projected ms", "bound",
          "collectives")
  rows = []
  for r in plan.rows:
    c, b = r.compiled, r.compiled.bytes
    rows.append((r.program.name, f"{c.batch} x {r.program.seq}", size(b["arguments"]),
                 size(b["outputs"]), size(b["temporaries"]), size(b["donated"]),
                 size(b["total"]), "yes" if c.fits else "NO", f"{r.flops_per_step / 1e9:.4g}",
                 _ms(r.compute_seconds), _ms(r.memory_seconds), _ms(r.collective_seconds),
                 _ms(r.projected_step_seconds), r.bound, collectives(r)))
  widths = [max(len(str(x[i])) for x in rows + [cols]) for i in range(len(cols))]
  fmt = lambda x: "  ".join(str(v).ljust(w) if i in (0, 7, 13, 14) else str(v).rjust(w)
                            for i, (v, w) in enumerate(zip(x, widths)))
  return [fmt(cols), fmt(tuple("-" * w for w in widths))] + [fmt(x) for x in rows]


def measured(plan: Plan) -> list[str]:
  lines = []
  for r in plan.rows:
    if r.measured:
      m = r.measured
      lines.append(f"  {r.program.name}: measured {_ms(m['step_seconds'])} ms/step, peak "
                   f"{size(m['peak_bytes'])}; planned {_ms(r.projected_step_seconds)} ms, "
                   f"{size(r.compiled.bytes['total'])}")
  return ["measured on this machine (zeros as inputs, median of the steps):"] + lines if lines \
      else []


def schedule_lines(title: str, s: dict[str, Any] | None, chips: int) -> list[str]:
  if s is None:
    return []
  lines = [f"{title} (projected): {_hours(s['projected_hours'])} h, "
           f"{_hours(s['chip_hours'])} chip-hours on {chips} chips; most expensive stage: "
           f"{s['most_expensive_stage']}"]
  for st in s["stages"]:
    how = " (interpolated by depth)" if st["interpolated"] else ""
    lines.append(f"  {st['stage']:<22} {st['steps']:>9,} steps x {_ms(st['step_seconds']):>9} ms"
                 f" = {_hours(st['hours']):>9} h{how}")
  return lines


def fit_lines(plan: Plan) -> list[str]:
  if not plan.fit:
    return []
  lines = ["largest global batch that fits (compiled):"]
  for r in plan.rows:
    p, c = r.program, r.compiled
    if r.max_fitting_batch is None and not r.fit_evidence:
      continue
    best = "none" if r.max_fitting_batch is None else str(r.max_fitting_batch)
    if c.fits:
      lines.append(f"  {p.name}: {best} ({r.fit_evidence})")
      continue
    need = size(c.bytes["total"])
    fix = (f"; batch {c.batch} fits with {r.suggestion}" if r.suggestion else
           "; no remat or mesh setting tried makes it fit")
    lines.append(f"  {p.name}: batch {c.batch} does NOT fit ({need} of "
                 f"{size(plan.target.memory_bytes)}); largest that fits: {best} "
                 f"({r.fit_evidence}){fix}")
  return lines


def console(plan: Plan, config_ref: str) -> str:
  out = header(plan, config_ref) + [""] + table(plan)
  out += [""] + schedule_lines("run", plan.schedule("run"), plan.target.chips)
  teacher = plan.schedule("teacher")
  if teacher is not None:
    out += schedule_lines("teacher pretraining", teacher, plan.target.chips)
  for extra in (fit_lines(plan), measured(plan)):
    if extra:
      out += [""] + extra
  if plan.run.notes:
    out += ["", "notes:"] + [f"  {n}" for n in plan.run.notes]
  if any(not r.compiled.fits for r in plan.rows) and not plan.fit:
    out += ["", "some programs do not fit: rerun with --fit for the largest batch that does"]
  return "\n".join(out)
