"""Entry points: which task a config runs, a run or a pipeline of runs, and the `mbert-jax`
console command.

    mbert-jax train --config=configs/demo.py --workdir=runs/demo     # = python launch.py ...
    mbert-jax export|predict|teacher-cache|sweep|inspect|summary ...  # = python -m mbert_jax.<x>

A config with a `finetune` section fine-tunes on GLUE/SQuAD (`finetune.task.FinetuneTask`); any
other one pretrains or distils (`distill.task.PretrainTask`). A config with a `runs` section
(configs/demo.py) runs each named sub-config in `<workdir>/<name>`, in order; `{workdir}` in any
string field stands for the parent workdir, so a student can name the teacher run before it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import ml_collections

from mbert_jax import cli
from mbert_jax.config_files import check_overrides, substitute_workdir
from mbert_jax.distill.task import PretrainTask
from mbert_jax.finetune.task import FinetuneTask
from mbert_jax.training import loop
from mbert_jax.training.workdir import read_report


def task_for(config: ml_collections.ConfigDict):
  """The task a config runs, built and validated (every check that needs no data and no
  compile; a ValueError names the field)."""
  if "finetune" in config:
    return FinetuneTask(config)
  return PretrainTask(config)



def run_config(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) one config in `workdir`; returns its report."""
  return loop.run(task_for(config), workdir)



def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """Each run of a `runs` section in `<workdir>/<name>`, in order; a finished one is skipped,
  and an unfinished one stops the pipeline."""
  reports = {}
  for name in config.runs.order:
    sub = substitute_workdir(config.runs[name].copy_and_resolve_references(),
                             os.path.abspath(workdir))
    sub_dir = os.path.join(workdir, name)
    done = read_report(sub_dir)
    if done is not None:
      reports[name] = done
      print(f"[{name}] already finished in {sub_dir}; skipping", flush=True)
      continue
    print(f"[{name}] running in {sub_dir}", flush=True)
    reports[name] = run_config(sub, sub_dir)
    if reports[name]["status"] != "completed":
      return reports
  return reports


def run_all(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  if "runs" in config:
    return run_pipeline(config, workdir)
  return {os.path.basename(os.path.normpath(workdir)): run_config(config, workdir)}


def _fmt(x) -> str:
  return "None" if x is None else f"{x:.4f}"


def report_lines(reports: dict[str, dict], workdir: str) -> list[str]:
  lines = ["", "=" * 72, f"report ({os.path.abspath(workdir)})"]
  for name, r in reports.items():
    if "task" in r:  # a fine-tuning run
      lines.append(f"  {name:<10} {r.get('status', '?'):<10} step {r.get('step')}/"
                   f"{r.get('total_steps')}  {r['task']} {r.get('main_metric')} = {r.get('score')}"
                   f"  [{r.get('wall_seconds', 0):.0f}s]")
      lines += [f"  {'':<10} {k} = {v:.4f}" for k, v in sorted(r.get("eval", {}).items())]
      continue
    acc = r.get("eval", {}).get("eval/mlm_accuracy")
    t_acc = r.get("eval", {}).get("eval/teacher_mlm_accuracy")
    p = r.get("params", {})
    lines.append(
        f"  {name:<10} {r.get('status', '?'):<10} step {r.get('step')}/{r.get('end_step')}  "
        f"held-out MLM acc {_fmt(acc)}"
        + (f" (teacher {t_acc:.4f})" if t_acc is not None else "")
        + f"  params: backbone {p.get('backbone', 0):,}, total {p.get('total', 0):,}"
        + f"  [{r.get('wall_seconds', 0):.0f}s]")
    lines.append(f"  {'':<10} checkpoints: {r.get('checkpoints')}")
  lines.append("=" * 72)
  return lines


def train_main(argv: list[str] | None = None) -> None:
  """`launch.py` / `mbert-jax train`: --config=FILE[:args] --workdir=DIR [--config.a.b=v ...]."""
  from absl import app, flags
  from absl import logging as absl_logging
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "config file (configs/<name>.py[:args])",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the resolved config")
  flags.mark_flags_as_required(["config", "workdir"])
  argv = list(sys.argv if argv is None else argv)
  # absl parses the overrides before main runs; a mistyped field would end in its traceback.
  cli.guarded(check_overrides, argv[1:])

  def main(_):
    # orbax and jax log every file they touch at INFO; keep the console for the run itself.
    absl_logging.set_verbosity(absl_logging.WARNING)
    import datasets
    datasets.disable_progress_bars()
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    cli.maybe_initialize_distributed(config.get("distributed", {}))
    reports = cli.guarded(run_all, config, workdir)
    if jax.process_index() == 0:
      print("\n".join(report_lines(reports, workdir)), flush=True)

  app.run(main, argv)


# `mbert-jax <command>` -> the module whose `python -m` command it is.
COMMANDS = {
    "train": "mbert_jax.launch",
    "export": "mbert_jax.export",
    "predict": "mbert_jax.predict",
    "teacher-cache": "mbert_jax.teacher_cache",
    "sweep": "mbert_jax.sweep",
    "inspect": "mbert_jax.data.inspect",
    "summary": "mbert_jax.models.summary",
    "plan": "mbert_jax.plan",
}


def console() -> None:
  """The `mbert-jax` console script: `mbert-jax <command> [flags]`."""
  import runpy
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    names = ", ".join(COMMANDS)
    given = f"unknown command {sys.argv[1]!r}; " if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
    cli.fail(f"{given}usage: mbert-jax <command> [flags], command one of: {names}")
  command = sys.argv.pop(1)
  if command == "train":
    train_main()
    return
  sys.argv[0] = f"mbert-jax {command}"
  runpy.run_module(COMMANDS[command], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  train_main()
