"""The command line of the planner:

    python -m mbert_jax.plan --config=configs/distill_mobilebert.py:bf16 --topology=v3:8x16
    python -m mbert_jax.plan --config=configs/ib_bert_large.py:bf16 --topology=v5p:4x4x8 --fit \
        --out=plan.json
    python -m mbert_jax.plan --config=configs/finetune_glue.py:task=sst2 --topology=local

It reads the config as launch.py does (`--config.a.b=v` overrides included), reads no data and
no weights, and prints one row per program, the schedule and, with --fit, the largest batch
that fits. Known errors (an unknown topology, a mesh the devices do not match, a batch the
mesh does not divide, a missing libtpu) end in one line and exit status 2.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mbert_jax import cli
from mbert_jax.config_files import check_overrides, config_ref
from mbert_jax.planning import hardware, planner, programs, report

FLAGS = flags.FLAGS
# A GPU or TPU of this machine runs a few steps of each program, next to the plan.
LOCAL_MEASURE_STEPS = 3


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "the run's config file "
                                  "(configs/<name>.py[:args]), as launch.py reads it",
                                  lock_config=False)
  flags.DEFINE_string("topology", None, "a TPU topology as libtpu names it (v3:8x16, v4:4x4x4, "
                      "v5e:16x16, v5p:4x4x8, v6e:16x16, ...) or `local` (this machine)")
  flags.DEFINE_bool("fit", False, "also find each program's largest global batch that fits, "
                    "by compiling; for one that does not fit, a setting that makes it fit")
  flags.DEFINE_string("out", None, "write the plan as JSON to this file")
  flags.DEFINE_float("headroom", 0.1, "fraction of device memory kept free: a program fits when "
                     "its peak stays below (1 - headroom) x the device's memory")
  flags.DEFINE_list("only", [], "plan only these programs (names as the table prints them)")
  flags.DEFINE_string("teacher", None, "the teacher's model preset when teacher.checkpoint is "
                      "empty (default: the config argument's teacher=, else ib_bert_large)")
  flags.DEFINE_string("teacher_config", None, "the config that pretrains the teacher "
                      f"(default for an IB-BERT teacher: {programs.TEACHER_RECIPE})")
  flags.DEFINE_integer("measure_steps", None, "with --topology=local on a GPU or TPU: steps to "
                       f"run per program (default {LOCAL_MEASURE_STEPS}; 0 = none)")
  flags.mark_flags_as_required(["config", "topology"])


def plan_command(argv: Sequence[str]) -> str:
  """Runs the planner as the flags say; returns the console text."""
  ref = config_ref(argv) or ""
  target = hardware.resolve(FLAGS.topology)
  preset = FLAGS.teacher or programs.teacher_preset_from_ref(ref)
  run = programs.programs_for(FLAGS.config, target.num_devices, teacher_preset=preset,
                              teacher_recipe=FLAGS.teacher_config)
  steps = FLAGS.measure_steps
  if steps is None:
    steps = LOCAL_MEASURE_STEPS if not target.compile_only and target.peak_flops else 0
  say = lambda s: print(s, file=sys.stderr, flush=True)
  plan = planner.make_plan(run, target, headroom=FLAGS.headroom, fit=FLAGS.fit,
                           only=tuple(FLAGS.only), measure_steps=steps, log=say)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(planner.as_json(plan), f, indent=1)
  return report.console(plan, ref)


def main(argv: Sequence[str] | None = None) -> None:
  _define_flags()
  argv = list(sys.argv if argv is None else argv)
  cli.guarded(check_overrides, argv[1:])

  def run(_):
    absl_logging.set_verbosity(absl_logging.WARNING)
    if cli.guarded(hardware.parse_target_name, FLAGS.topology) != "local":
      # Nothing runs on this machine's devices: keep jax off them (a TPU VM's chips stay free).
      jax.config.update("jax_platforms", "cpu")
    print(cli.guarded(plan_command, argv), flush=True)

  app.run(run, argv)
