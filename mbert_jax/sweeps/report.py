"""A sweep directory's results: results.csv, results.md, loss_curves.png, final_accuracy.png.

    python -m mbert_jax.sweep --report --workdir=runs/kt

Rebuilt from what is on disk (the manifest `sweep.json` the runner writes, each run's
metrics.jsonl and final.json), so a sweep run one command at a time by a cluster scheduler gets
the same table as one run in-process. Imports no jax: reports are made on machines without
accelerators, often while the runs still train elsewhere. (Expanding a schedule into stages
needs mbert_jax.distill.schedule, which imports jax; the runner stores each run's stage
boundaries in the manifest so that the report does not have to.)
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Mapping, Sequence

from mbert_jax.training import workdir as workdir_lib

# The sweep directory's layout, shared with the runner (runner.py), which writes it.
MANIFEST = "sweep.json"
WALL_FILE = "sweep_wall.json"
ERROR_FILE = "sweep_error.txt"
DEFAULT_VARIANT = "default"
METRICS_FILE = "metrics.jsonl"

COLUMNS = ("name", "strategy", "variant", "status", "steps", "mlm_accuracy", "mlm_loss",
           "teacher_agreement", "train_loss", "wall_seconds")
_HEADERS = {"name": "run", "strategy": "strategy", "variant": "variant", "status": "status",
            "steps": "steps", "mlm_accuracy": "held-out MLM acc", "mlm_loss": "eval MLM loss",
            "teacher_agreement": "teacher agreement", "train_loss": "final train loss",
            "wall_seconds": "wall (s)"}
_TEXT_COLUMNS = ("name", "strategy", "variant", "status")

Boundaries = list[tuple[int, str]]


# ============================================================================ reading runs

def read_json_if_any(path: str) -> Any:
  """The file's JSON, or None when it is missing or torn: a sweep dir is read while its runs
  are being written, and a missing file only means "not yet"."""
  try:
    return workdir_lib.read_json(path)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _number(value: Any) -> float | None:
  try:
    return float(value)  # metrics.jsonl stores non-finite values as strings ("nan", "inf")
  except (TypeError, ValueError):
    return None


def read_metrics(run_dir: str) -> list[dict]:
  """Rows of metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
  rows = []
  try:
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(row, dict) and "step" in row:
          rows.append(row)
  except FileNotFoundError:
    pass
  return rows


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`; a resumed run logs some steps twice, the later row wins."""
  by_step: dict[int, float] = {}
  for row in rows:
    if key in row:
      v = _number(row[key])
      if v is not None:
        by_step[int(row["step"])] = v
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _last_eval(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
  best_step, out = -1, {}
  for row in rows:
    if "eval/mlm_accuracy" in row and int(row["step"]) >= best_step:
      best_step = int(row["step"])
      out = {k: _number(v) for k, v in row.items() if k.startswith("eval/")}
  return out


def boundaries_of(schedule: Any, num_layers: int) -> Boundaries | None:
  """(start step, stage name) of each stage after the first; None for a schedule that does not
  expand (the run fails on it and says why; the table only loses its stage lines)."""
  # Imports jax: the runner calls this for the manifest; the report only for a run the manifest
  # does not lay out.
  from mbert_jax.distill import schedule as schedule_lib
  try:
    stages = schedule_lib.build_schedule(schedule, int(num_layers))
  except (ValueError, TypeError, KeyError):
    return None
  out, start = [], 0
  for done, following in zip(stages[:-1], stages[1:]):
    start += done.steps
    out.append((start, following.name))
  return out


def stage_boundaries(run_dir: str) -> Boundaries:
  """Stage boundaries from the run's saved config (the schedule it actually trained)."""
  config = read_json_if_any(os.path.join(run_dir, workdir_lib.CONFIG_FILE))
  if not config or "schedule" not in config:
    return []
  model = read_json_if_any(os.path.join(run_dir, workdir_lib.MODEL_CONFIG_FILE)) or {}
  layers = model.get("num_hidden_layers", config.get("model", {}).get("num_hidden_layers"))
  return boundaries_of(config["schedule"], layers) or []


def _status(run_dir: str, final: dict | None, has_rows: bool, has_config: bool) -> str:
  if final:
    return final.get("status", "completed")
  if os.path.exists(os.path.join(run_dir, ERROR_FILE)):
    return "failed"
  return "incomplete" if has_rows or has_config else "pending"


def _row(sweepdir: str, entry: Mapping[str, Any]) -> dict:
  run_dir = os.path.join(sweepdir, entry["name"])
  final = read_json_if_any(os.path.join(run_dir, workdir_lib.DONE_FILE))
  rows = read_metrics(run_dir)
  config = read_json_if_any(os.path.join(run_dir, workdir_lib.CONFIG_FILE)) or {}
  # A run resumed at its last step writes final.json without evaluating again; its last
  # evaluation is then in metrics.jsonl.
  ev = (final or {}).get("eval") or _last_eval(rows)
  steps, losses = series(rows, "loss")
  # final.json's wall_seconds covers only the session that finished; the runner sums them all.
  wall = (read_json_if_any(os.path.join(run_dir, WALL_FILE)) or {}).get("seconds")
  if wall is None and final:
    wall = final.get("wall_seconds")
  bounds = entry.get("stage_boundaries")
  return {
      "name": entry["name"],
      "strategy": entry.get("strategy") or config.get("schedule", {}).get("name", ""),
      "variant": entry.get("variant", DEFAULT_VARIANT),
      "status": _status(run_dir, final, bool(rows), bool(config)),
      "steps": (final or {}).get("step", steps[-1] if steps else None),
      "mlm_accuracy": ev.get("eval/mlm_accuracy"),
      "mlm_loss": ev.get("eval/mlm_loss"),
      "teacher_agreement": ev.get("eval/teacher_agreement"),
      "teacher_mlm_accuracy": ev.get("eval/teacher_mlm_accuracy"),
      "train_loss": losses[-1] if losses else None,
      "wall_seconds": wall,
      "stage_boundaries": None if bounds is None else [(int(s), str(n)) for s, n in bounds],
  }


def _entries(sweepdir: str) -> list[dict]:
  """The manifest's runs in order, else every subdirectory holding a run."""
  manifest = read_json_if_any(os.path.join(sweepdir, MANIFEST))
  if manifest:
    return manifest["runs"]
  if not os.path.isdir(sweepdir):
    raise FileNotFoundError(f"sweep dir {sweepdir} does not exist")
  marks = (workdir_lib.DONE_FILE, METRICS_FILE, workdir_lib.CONFIG_FILE)
  entries = [{"name": d, "variant": DEFAULT_VARIANT, "setup": False}
             for d in sorted(os.listdir(sweepdir))
             if any(os.path.exists(os.path.join(sweepdir, d, f)) for f in marks)]
  if not entries:
    raise ValueError(f"{sweepdir} holds no sweep manifest ({MANIFEST}) and no run directories")
  return entries


def collect(sweepdir: str) -> tuple[list[dict], list[dict]]:
  """(rows of the runs, rows of the set-up runs) from the sweep dir."""
  sweepdir = os.path.abspath(sweepdir)
  runs, setup = [], []
  for e in _entries(sweepdir):
    (setup if e.get("setup") else runs).append(_row(sweepdir, e))
  return runs, setup


# ============================================================================ the table

def _fmt(value: Any, key: str) -> str:
  if value is None:
    return ""
  if key == "wall_seconds":
    return f"{value:.0f}"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def _write_text(path: str, write) -> None:
  # Tmp file + rename: a reader (or a second --report) never sees half a table.
  with open(path + ".tmp", "w", newline="") as f:
    write(f)
  os.replace(path + ".tmp", path)


def _write_csv(f, runs: Sequence[dict]) -> None:
  w = csv.writer(f)
  w.writerow(COLUMNS)
  for r in runs:
    w.writerow(["" if r[c] is None else r[c] for c in COLUMNS])


def markdown_lines(sweepdir: str, runs: Sequence[dict], setup: Sequence[dict]) -> list[str]:
  lines = [f"# Sweep results: {os.path.basename(os.path.normpath(sweepdir))}", ""]
  teacher_acc = _teacher_accuracy(runs)
  if teacher_acc is not None:
    lines.append(f"Teacher held-out MLM accuracy on the same eval batches: {teacher_acc:.4f}")
  for s in setup:
    lines.append(f"Set-up run `{s['name']}`: {s['status']}, {s['steps']} steps, held-out MLM "
                 f"accuracy {_fmt(s['mlm_accuracy'], 'mlm_accuracy') or 'n/a'}")
  if len(lines) > 2:
    lines.append("")
  lines.append("| " + " | ".join(_HEADERS[c] for c in COLUMNS) + " |")
  lines.append("|" + "|".join("---" if c in _TEXT_COLUMNS else "---:" for c in COLUMNS) + "|")
  for r in runs:
    lines.append("| " + " | ".join(_fmt(r[c], c) for c in COLUMNS) + " |")
  lines += ["", "Held-out MLM accuracy and loss: the last evaluation on the held-out split. "
            "Teacher agreement: fraction of masked positions where student and teacher predict "
            "the same token (empty without a teacher). Final train loss: the run's total "
            "objective at its last logged step, so it differs in composition between strategies. "
            "Wall: summed over every session of the run.", ""]
  return lines


def write_table(sweepdir: str, runs: Sequence[dict], setup: Sequence[dict]) -> None:
  _write_text(os.path.join(sweepdir, "results.csv"), lambda f: _write_csv(f, runs))
  text = "\n".join(markdown_lines(sweepdir, runs, setup))
  _write_text(os.path.join(sweepdir, "results.md"), lambda f: f.write(text))


def _teacher_accuracy(runs: Sequence[dict]) -> float | None:
  return next((r["teacher_mlm_accuracy"] for r in runs
               if r.get("teacher_mlm_accuracy") is not None), None)


# ============================================================================ the plots

def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _run_boundaries(sweepdir: str, row: Mapping[str, Any]) -> Boundaries:
  if row.get("stage_boundaries") is not None:
    return list(row["stage_boundaries"])
  return stage_boundaries(os.path.join(sweepdir, row["name"]))


def _plot_run(ax, sweepdir: str, r: Mapping[str, Any]) -> None:
  steps, values = series(read_metrics(os.path.join(sweepdir, r["name"])), "loss")
  finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
  if finite:
    ax.plot([s for s, _ in finite], [v for _, v in finite], lw=1.2, color="C0")
    low, high = min(v for _, v in finite), max(v for _, v in finite)
    # KT stages and PD differ by orders of magnitude; a log axis keeps both readable.
    if low > 0 and high / low > 20:
      ax.set_yscale("log")
  else:
    ax.text(0.5, 0.5, f"no logged loss ({r['status']})", ha="center", va="center",
            transform=ax.transAxes)
  bounds = _run_boundaries(sweepdir, r)
  for start, _ in bounds:
    ax.axvline(start, color="0.45", ls="--", lw=0.8)
  if bounds:
    end = max(steps[-1] if steps else 0, bounds[-1][0])
    ax.axvspan(bounds[-1][0], end, color="C1", alpha=0.08, lw=0)
    if len(bounds) <= 3:
      for start, name in bounds:
        ax.annotate(name, (start, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="0.3")
  title = r["name"] if r["variant"] in ("", DEFAULT_VARIANT) else f"{r['name']} ({r['variant']})"
  stages = f"{len(bounds) + 1} stages" if bounds else "1 stage" if finite else r["status"]
  ax.set_title(f"{title}\n{r['strategy']}, {stages}", fontsize=9)
  ax.set_xlabel("step", fontsize=8)
  ax.set_ylabel("train loss", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(alpha=0.3, which="both")


def plot_loss_curves(sweepdir: str, runs: Sequence[dict], path: str) -> str:
  """One panel per run (stage layouts differ): train loss vs step on a log axis, dashed lines
  where a stage begins, the PD/final stage shaded."""
  plt = _pyplot()
  n = max(len(runs), 1)
  cols = min(4, n)
  rows_n = math.ceil(n / cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  for ax, r in zip(axes.flat, runs):
    _plot_run(ax, sweepdir, r)
  fig.suptitle("Train loss per run (dashed: stage boundaries; shaded: last stage)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_final_accuracy(runs: Sequence[dict], path: str) -> str:
  plt = _pyplot()
  strategies = list(dict.fromkeys(r["strategy"] for r in runs))
  colors = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
  fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(runs) + 3), 4))
  xs = range(len(runs))
  accs = [r["mlm_accuracy"] if r["mlm_accuracy"] is not None else 0.0 for r in runs]
  bars = ax.bar(xs, accs, color=[colors[r["strategy"]] for r in runs])
  for bar, r in zip(bars, runs):
    label = "n/a" if r["mlm_accuracy"] is None else f"{r['mlm_accuracy']:.3f}"
    ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
  teacher = _teacher_accuracy(runs)
  if teacher is not None:
    ax.axhline(teacher, color="k", ls=":", lw=1, label=f"teacher {teacher:.3f}")
  ax.set_xticks(list(xs))
  ax.set_xticklabels([r["name"] for r in runs], rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("held-out MLM accuracy")
  ax.set_title("Final held-out MLM accuracy by strategy (equal total steps)", fontsize=10)
  handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in strategies]
  labels = list(strategies)
  if teacher is not None:
    handles.append(ax.get_lines()[0])
    labels.append(f"teacher {teacher:.3f}")
  ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax.grid(axis="y", alpha=0.3)
  top = max(accs + ([teacher] if teacher is not None else []) + [1e-3])
  ax.set_ylim(0, top * 1.15)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ============================================================================ the report

def report_paths(sweepdir: str) -> dict[str, str]:
  sweepdir = os.path.abspath(sweepdir)
  return {k: os.path.join(sweepdir, f) for k, f in (
      ("csv", "results.csv"), ("md", "results.md"), ("loss_curves", "loss_curves.png"),
      ("final_accuracy", "final_accuracy.png"))}


def write_report(sweepdir: str) -> dict[str, str]:
  """(Re)builds results.csv, results.md, loss_curves.png and final_accuracy.png."""
  sweepdir = os.path.abspath(sweepdir)
  paths = report_paths(sweepdir)
  runs, setup = collect(sweepdir)
  write_table(sweepdir, runs, setup)
  plot_loss_curves(sweepdir, runs, paths["loss_curves"])
  plot_final_accuracy(runs, paths["final_accuracy"])
  return paths
