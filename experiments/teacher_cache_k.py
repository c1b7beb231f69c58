"""How many teacher logits a cached pre-training distillation (PD) stage needs (issue 12).

    python experiments/teacher_cache_k.py --demo=runs/demo --out=runs/teacher_cache_k \
        --ks=8,32,64,128,vocab --plot=docs/teacher_cache_k.png

Takes the demo's student (configs/demo.py, `runs.student`: 4 progressive phases, then the PD
stage) and its teacher (`<demo>/teacher`, which must have finished), trains the student's
layer-wise phases once (`<out>/prefix`, stopped where PD begins), then forks that checkpoint into
one arm per teacher source and trains the PD stage in each: `online` (the teacher runs, as in the
demo) and one arm per k reading a cache of the teacher's top-k logits (written here with
`mbert_jax.distill.teacher_cache`; `vocab` = every logit). The arms differ only in where the PD
targets come from: same start, batches, masks, LR and steps. Each is evaluated on the whole
held-out split (one pass, not the demo's 8 batches) so the accuracy differences are not
sampling noise of a small eval set. Writes `<out>/results.json`, `<out>/results.md` and the plot
of held-out MLM accuracy against k. Rerunning reuses finished arms and complete caches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from mbert_jax import config_files  # noqa: E402
from mbert_jax.training import workdir as workdir_lib  # noqa: E402

ONLINE = "online"


def demo_student(demo_dir: str):
  """configs/demo.py's student config, pointing at the demo's teacher."""
  c = config_files.load_config(os.path.join(ROOT, "configs", "demo.py"))
  c = config_files.substitute_workdir(c, os.path.abspath(demo_dir))
  student = c.runs.student
  teacher = student.teacher.checkpoint
  if not workdir_lib.is_finished(teacher):
    raise SystemExit(f"error: {teacher} is not a finished teacher run; run the demo first: "
                     f"python launch.py --config=configs/demo.py --workdir={demo_dir}")
  student.train.progress_bar = False
  return student


def parse_ks(text: str, vocab_size: int) -> list[int]:
  ks = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    k = vocab_size if part == "vocab" else int(part)
    if not 1 <= k <= vocab_size:
      raise SystemExit(f"error: --ks entry {part!r}: k must be in 1..{vocab_size} (or 'vocab')")
    ks.append(k)
  if not ks:
    raise SystemExit("error: --ks names no k")
  return sorted(set(ks))


def fork(prefix: str, arm: str) -> None:
  """A copy of the prefix run (checkpoints, identity, metrics) without its finished marker,
  so the loop resumes it and trains on into the PD stage."""
  if os.path.isdir(arm):
    return
  tmp = arm + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(prefix, tmp, ignore=shutil.ignore_patterns(workdir_lib.DONE_FILE))
  os.rename(tmp, arm)


def run_arm(config, arm_dir: str):
  from mbert_jax import launch
  if workdir_lib.is_finished(arm_dir):
    report = workdir_lib.read_report(arm_dir)
  else:
    t0 = time.time()
    report = launch.run_config(config, arm_dir)
    report["experiment_wall_seconds"] = time.time() - t0
    workdir_lib.write_json(os.path.join(arm_dir, "arm_wall.json"),
                           {"seconds": report["experiment_wall_seconds"]})
  wall_path = os.path.join(arm_dir, "arm_wall.json")
  wall = workdir_lib.read_json(wall_path) if os.path.exists(wall_path) else None
  return report, wall["seconds"] if wall else float("nan")


def row(name: str, k, report: dict, wall: float, cache: dict | None, vocab_size: int) -> dict:
  ev = report["eval"]
  return {"arm": name, "k": k, "k_fraction": (k / vocab_size) if k else None,
          "mlm_accuracy": ev["eval/mlm_accuracy"], "mlm_loss": ev["eval/mlm_loss"],
          "teacher_agreement": ev.get("eval/teacher_agreement"),
          "pd_wall_seconds": wall, "teacher_loaded": report.get("teacher_loaded"),
          "cache_bytes_per_sequence": (cache or {}).get("bytes_per_sequence"),
          "cache_write_seconds": (cache or {}).get("seconds")}


def markdown(rows: list[dict], vocab_size: int, eval_batches: int, batch: int) -> str:
  online = next(r for r in rows if r["arm"] == ONLINE)
  lines = [f"Held-out MLM over the whole eval split ({eval_batches} batches of {batch}); "
           f"vocabulary {vocab_size}.", "",
           "| teacher targets | k | held-out MLM acc | vs online (points) | held-out MLM loss "
           "| teacher agreement | cache bytes/seq | PD stage wall (s) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    delta = 100 * (r["mlm_accuracy"] - online["mlm_accuracy"])
    k = "" if r["k"] is None else ("V" if r["k"] == vocab_size else str(r["k"]))
    size = "" if r["cache_bytes_per_sequence"] is None else f"{r['cache_bytes_per_sequence']:,.0f}"
    agree = "" if r["teacher_agreement"] is None else f"{r['teacher_agreement']:.3f}"
    lines.append(f"| {r['arm']} | {k} | {r['mlm_accuracy']:.4f} | "
                 f"{'' if r['arm'] == ONLINE else f'{delta:+.2f}'} | {r['mlm_loss']:.3f} | "
                 f"{agree} | {size} | {r['pd_wall_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], vocab_size: int, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  online = next(r for r in rows if r["arm"] == ONLINE)
  cached = [r for r in rows if r["arm"] != ONLINE]
  fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
  ax.plot([r["k"] for r in cached], [100 * r["mlm_accuracy"] for r in cached], "o-",
          label="PD from cached top-k teacher logits")
  ax.axhline(100 * online["mlm_accuracy"], color="k", ls="--", label="PD with the teacher online")
  ax.axhspan(100 * online["mlm_accuracy"] - 0.5, 100 * online["mlm_accuracy"] + 0.5,
             color="0.85", label="online +- 0.5 point")
  ax.set_xscale("log", base=2)
  ticks = [r["k"] for r in cached]
  ax.set_xticks(ticks, ["V" if k == vocab_size else str(k) for k in ticks])
  ax.set_xlabel(f"k (teacher logits kept per prediction; V = {vocab_size})")
  ax.set_ylabel("held-out MLM accuracy (%)")
  ax.set_title("Demo student after its PD stage, by teacher-target source", fontsize=10)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--demo", default="runs/demo", help="the demo's workdir (its teacher/ is used)")
  p.add_argument("--out", default="runs/teacher_cache_k", help="where the arms and caches go")
  p.add_argument("--ks", default="8,32,64,128,vocab", help="comma-separated k; 'vocab' = all")
  p.add_argument("--plot", default="", help="also write the accuracy-vs-k plot here")
  a = p.parse_args(argv)

  from mbert_jax.distill import teacher_cache
  from mbert_jax import launch
  from mbert_jax.data import build_pipeline

  student = demo_student(a.demo)
  out = os.path.abspath(a.out)
  os.makedirs(out, exist_ok=True)
  pd_first, pd_end = teacher_cache.cached_steps(student)
  eval_pipe = build_pipeline(student.data, os.path.join(out, "prefix"), split="eval")
  vocab_size = int(eval_pipe.vocab_size)
  ks = parse_ks(a.ks, vocab_size)
  eval_batches = int(eval_pipe.steps_per_epoch)
  student.train.eval_steps = eval_batches  # not part of the run identity: forks resume

  prefix_dir = os.path.join(out, "prefix")
  prefix = student.copy_and_resolve_references()
  prefix.train.steps = pd_first
  print(f"prefix: the layer-wise phases, steps 0..{pd_first}, in {prefix_dir}", flush=True)
  launch.run_config(prefix, prefix_dir)

  rows = []
  arms = [(ONLINE, None)] + [(f"k{k}", k) for k in ks]
  for name, k in arms:
    config = student.copy_and_resolve_references()
    cache = None
    if k is not None:
      cache_dir = os.path.join(out, f"cache_{name}")
      config.schedule.teacher_cache = cache_dir
      config.teacher_cache.k = k
      cache = teacher_cache.write_cache(config, cache_dir, progress=False)
      if cache["cells_written"]:
        workdir_lib.write_json(os.path.join(cache_dir, teacher_cache.WRITER_REPORT), cache)
      else:  # complete from an earlier run: its report has the size and time
        cache = workdir_lib.read_json(os.path.join(cache_dir, teacher_cache.WRITER_REPORT))
      print(teacher_cache.summary(cache), flush=True)
    arm_dir = os.path.join(out, name)
    fork(prefix_dir, arm_dir)
    print(f"[{name}] PD stage, steps {pd_first}..{pd_end}, in {arm_dir}", flush=True)
    report, wall = run_arm(config, arm_dir)
    rows.append(row(name, k, report, wall, cache, vocab_size))
    print(f"[{name}] held-out MLM accuracy {rows[-1]['mlm_accuracy']:.4f}", flush=True)

  md = markdown(rows, vocab_size, eval_batches, int(student.data.batch_size))
  workdir_lib.write_json(os.path.join(out, "results.json"),
                         {"vocab_size": vocab_size, "eval_batches": eval_batches,
                          "pd_steps": [pd_first, pd_end], "rows": rows})
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(md)
  if a.plot:
    plot(rows, vocab_size, a.plot)
  print(md, flush=True)
  default_k = int(teacher_cache.default_cache_config().k)
  by_k = {r["k"]: r for r in rows}
  if default_k in by_k:
    gap = 100 * abs(by_k[default_k]["mlm_accuracy"] - rows[0]["mlm_accuracy"])
    print(f"default k = {default_k}: {gap:.2f} points from online (aim <= 0.5)", flush=True)
  return 0 if all(math.isfinite(r["mlm_loss"]) for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
