"""Launch a training run (or a pipeline of runs) from a config file.

    python launch.py --config=configs/ib_bert_large.py:smoke --workdir=runs/teacher
    python launch.py --config=configs/distill_mobilebert.py --workdir=runs/student \
        --config.teacher.checkpoint=runs/teacher --config.schedule.name=pkt
    python launch.py --config=configs/finetune_glue.py:task=sst2 --workdir=runs/sst2 \
        --config.init.checkpoint=runs/student

Running the same command again resumes from the workdir. A config with a `finetune` section
(configs/finetune_glue.py, configs/finetune_squad.py) fine-tunes and evaluates on GLUE or
SQuAD. A config with a `runs` section (see configs/demo.py) runs each named sub-config in
`<workdir>/<name>`, in order; `{workdir}` in any string field stands for the parent workdir,
so a student can name the teacher run before it.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/<name>.py[:args])",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the resolved config")
flags.mark_flags_as_required(["config", "workdir"])


def run_pipeline(config, workdir: str) -> dict:
  from mbert_jax import train
  from mbert_jax.config_files import substitute_workdir
  from mbert_jax.workdir import read_report
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
    reports[name] = train.run_config(sub, sub_dir)
    if reports[name]["status"] != "completed":
      return reports
  return reports


def print_report(reports: dict, workdir: str) -> None:
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
        f"held-out MLM acc {acc if acc is None else f'{acc:.4f}'}"
        + (f" (teacher {t_acc:.4f})" if t_acc is not None else "")
        + f"  params: backbone {p.get('backbone', 0):,}, total {p.get('total', 0):,}"
        + f"  [{r.get('wall_seconds', 0):.0f}s]")
    lines.append(f"  {'':<10} checkpoints: {r.get('checkpoints')}")
  lines.append("=" * 72)
  print("\n".join(lines), flush=True)


def main(argv):
  del argv
  # orbax and jax log every file they touch at INFO; keep the console for the run itself.
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  import datasets
  datasets.disable_progress_bars()
  config = FLAGS.config
  workdir = FLAGS.workdir
  from mbert_jax.cli import maybe_initialize_distributed
  maybe_initialize_distributed(config.get("distributed", {}))
  from mbert_jax import cli, train

  def run_all() -> dict:
    if "runs" in config:
      return run_pipeline(config, workdir)
    return {os.path.basename(os.path.normpath(workdir)): train.run_config(config, workdir)}

  reports = cli.guarded(run_all)
  import jax
  if jax.process_index() == 0:
    print_report(reports, workdir)


if __name__ == "__main__":
  from mbert_jax import cli
  from mbert_jax.config_files import check_overrides
  # absl parses the overrides before main runs; a mistyped field would end in its traceback.
  cli.guarded(check_overrides, sys.argv[1:])
  app.run(main)
