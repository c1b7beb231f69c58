"""Plots and tabulates configs/demo_bert_teacher.py: each student layer's transfer losses
during its own progressive phase, and held-out MLM accuracy and loss of the distilled student
against the scratch baseline.

    python experiments/plot_bert_teacher.py --workdir=runs/bert_teacher --out=docs/bert_teacher.png
    # more runs on the accuracy/loss panels (e.g. a variant), each as label=run_dir:
    python experiments/plot_bert_teacher.py --workdir=runs/bert_teacher \
        --extra="distilled, variant=runs/bert_teacher_variant/student"

Prints a markdown table (run, steps, held-out MLM accuracy and loss) and each layer's
transfer losses at the start (the phase's first step, before any update when log_every=1)
and the end of its phase.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

TERMS = (("fmt", "feature-map loss (LN0 MSE, projected)"),
         ("at", "Q/K/V relation loss (MiniLMv2, `at`)"),
         ("mean", "mean loss"), ("var", "variance loss"))
# --attention=per_head: the `at` term is the per-head attention-map KL instead.
ATTENTION_LABELS = {"relation": TERMS[1][1], "per_head": "attention-map loss (per head, `at`)"}


def read_rows(run_dir: str) -> list[dict[str, Any]]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_final(run_dir: str) -> dict[str, Any] | None:
  path = os.path.join(run_dir, "final.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def eval_curve(rows: list[dict[str, Any]], key: str = "eval/mlm_accuracy"
               ) -> list[tuple[int, float]]:
  """(step, value) of every evaluation, the last one kept when a step was evaluated twice."""
  by_step = {r["step"]: r[key] for r in rows if key in r}
  return sorted(by_step.items())


def phase_layers(rows: list[dict[str, Any]]) -> list[int]:
  """The student layers with a layer-wise term in the log, ascending."""
  return sorted({int(k.rsplit("_", 1)[1]) for r in rows for k in r
                 if "_loss/layer_" in k})


def phase_of(rows: list[dict[str, Any]], layer: int, term: str = "fmt"
             ) -> list[tuple[int, float]]:
  """(step, value) of a layer's term in the stage that transfers it (rows with a `stage`
  field; the log row at step s holds the loss of the batch taken at step s - 1)."""
  key = f"{term}_loss/layer_{layer:02d}"
  return [(r["step"], r[key]) for r in rows if key in r and "stage" in r]


def phase_bounds(rows: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
  """(stage index, first logged step, last logged step) for every stage in the log."""
  bounds: dict[int, list[int]] = {}
  for r in rows:
    if "stage" in r and "loss" in r:
      bounds.setdefault(int(r["stage"]), []).append(r["step"])
  return [(k, min(v), max(v)) for k, v in sorted(bounds.items())]


def transfer_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per layer and term: the value at the first and last step of the layer's phase."""
  out = []
  for layer in phase_layers(rows):
    entry: dict[str, Any] = {"layer": layer}
    for term, _ in TERMS:
      pts = phase_of(rows, layer, term)
      if pts:
        entry[term] = (pts[0][1], pts[-1][1])
        entry["steps"] = (pts[0][0], pts[-1][0])
    out.append(entry)
  return out


def run_summary(name: str, run_dir: str) -> dict[str, Any]:
  rows = read_rows(run_dir)
  final = read_final(run_dir) or {}
  ev = final.get("eval") or {}
  acc, loss = ev.get("eval/mlm_accuracy"), ev.get("eval/mlm_loss")
  if acc is None:  # unfinished run: its last evaluation
    accs, losses = eval_curve(rows), eval_curve(rows, "eval/mlm_loss")
    acc = accs[-1][1] if accs else None
    loss = losses[-1][1] if losses else None
  steps = final.get("step", max((r["step"] for r in rows), default=0))
  return {"run": name, "steps": steps, "acc": acc, "loss": loss,
          "wall": final.get("wall_seconds"), "schedule": final.get("schedule", "")}


def markdown(summaries: list[dict[str, Any]], transfer: list[dict[str, Any]]) -> str:
  lines = ["| run | schedule | steps | held-out MLM acc | held-out MLM loss | wall (s) |",
           "|---|---|---:|---:|---:|---:|"]
  for s in summaries:
    acc = "" if s["acc"] is None else f"{s['acc']:.4f}"
    loss = "" if s["loss"] is None else f"{s['loss']:.3f}"
    wall = "" if s["wall"] is None else f"{s['wall']:.0f}"
    lines.append(f"| {s['run']} | {s['schedule']} | {s['steps']} | {acc} | {loss} | {wall} |")
  lines += ["", "| student layer | phase steps | " + " | ".join(
      f"{t} start -> end" for t, _ in TERMS) + " |",
      "|---|---|" + "---|" * len(TERMS)]
  for e in transfer:
    cells = []
    for term, _ in TERMS:
      if term in e:
        a, b = e[term]
        cells.append(f"{a:.4g} -> {b:.4g} ({a / b:.1f}x)" if b else f"{a:.4g} -> {b:.4g}")
      else:
        cells.append("")
    steps = e.get("steps", ("", ""))
    lines.append(f"| {e['layer']} | {steps[0]}..{steps[1]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(student_rows, curves, out: str, pd_start: int | None, teacher: str = "all-MiniLM-L6-v2",
         attention: str = "relation", last_stage: str = "ground-truth") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(12.5, 8.0))
  bounds = phase_bounds(student_rows)
  layers = phase_layers(student_rows)
  terms = (TERMS[0], (TERMS[1][0], ATTENTION_LABELS[attention]))
  for ax, (term, label) in zip(axes[0], terms):
    for layer in layers:
      pts = phase_of(student_rows, layer, term)
      if pts:
        ax.plot(*zip(*pts), label=f"student layer {layer}")
    for k, lo, hi in bounds[:len(layers)]:
      if k % 2:
        ax.axvspan(lo - 1, hi, color="0.93", zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel("student step (one progressive phase per layer)")
    ax.set_ylabel(label)
    ax.set_title(f"{label.split(' (')[0]}: each layer in its own phase")
    ax.legend(fontsize=8)
  for ax, key, ylabel in ((axes[1][0], "eval/mlm_accuracy", "held-out MLM accuracy"),
                          (axes[1][1], "eval/mlm_loss", "held-out MLM loss")):
    for (name, rows), style in zip(curves, ("-o", "-s", "-^", "-v", "-d")):
      pts = eval_curve(rows, key)
      if pts:
        ax.plot(*zip(*pts), style, ms=3.5, label=name)
    if pd_start is not None:
      ax.axvline(pd_start, color="gray", ls="--", lw=0.8)
      ax.annotate(f"{last_stage} stage starts", (pd_start, ax.get_ylim()[1]), fontsize=8,
                  color="gray", ha="left", va="top", xytext=(3, -3), textcoords="offset points")
    ax.set_xlabel("step (same budget, data, batch and peak LR)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
  axes[1][0].set_title(f"distilled from {teacher} vs from scratch")
  # Before its MLM stage the student's MLM head is untrained (loss ~ln V):
  # cut the panel to where the runs compete.
  tops = [v for _, rows in curves for s, v in eval_curve(rows, "eval/mlm_loss")
          if pd_start is None or s > pd_start]
  if tops:
    lo, hi = min(tops), max(tops)
    axes[1][1].set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
  axes[1][1].set_title("held-out MLM loss (the student's is ~ln V before its MLM stage)",
                       fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/bert_teacher")
  p.add_argument("--out", default="docs/bert_teacher.png")
  p.add_argument("--extra", action="append", default=[],
                 help="label=run_dir: another run on the accuracy and loss panels")
  p.add_argument("--teacher_name", default="all-MiniLM-L6-v2", help="the teacher, in the title")
  p.add_argument("--attention", default="relation", choices=sorted(ATTENTION_LABELS),
                 help="which attention transfer the student's `at` term is")
  p.add_argument("--last_stage", default="ground-truth",
                 help="what the student's last stage is (ground-truth, pd), on the marker")
  a = p.parse_args(argv)
  student_dir, scratch_dir = (os.path.join(a.workdir, n) for n in ("student", "scratch"))
  runs = [(f"distilled (pkt_tf2 + {a.last_stage})", student_dir), ("scratch", scratch_dir)]
  for spec in a.extra:
    label, sep, path = spec.rpartition("=")
    if not sep:
      p.error(f"--extra={spec!r}: use label=run_dir")
    runs.append((label, path))
  runs = [(n, d) for n, d in runs if os.path.isfile(os.path.join(d, "metrics.jsonl"))]
  if not runs or runs[0][1] != student_dir:
    p.error(f"{student_dir}/metrics.jsonl not found: run configs/demo_bert_teacher.py first")
  student_rows = read_rows(student_dir)
  curves = [(n, student_rows if d == student_dir else read_rows(d)) for n, d in runs]
  layers = phase_layers(student_rows)
  bounds = phase_bounds(student_rows)
  pd_start = bounds[len(layers)][1] - 1 if len(bounds) > len(layers) else None
  plot(student_rows, curves, a.out, pd_start, a.teacher_name, a.attention, a.last_stage)
  print(markdown([run_summary(n, d) for n, d in runs], transfer_summary(student_rows)))
  print(a.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
