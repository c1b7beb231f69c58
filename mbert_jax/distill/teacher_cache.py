"""Cached teacher targets for pre-training distillation: run the teacher once, read it back.

    python -m mbert_jax.teacher_cache --config=configs/distill_mobilebert.py --workdir=<cache>

writes, for every batch of the run's pre-training distillation (PD) stage, the teacher's top-k
MLM logits; a run whose `schedule.teacher_cache` names that directory then trains its PD stage
against them (`losses.sparse_kd_loss`) without running the teacher. The cache is spread over
four modules, one job each:

  cache_config  what a run caches: writer settings, the PD stage's steps, the identity key
  cache_format  the files: header, shards, records, and the checks that name a bad shard
  cache_writer  `write_cache`: run the teacher, write (or complete) the shards
  cache_reader  `open_cache` / `open_for_run`: check a cache up front, serve each step's targets

This module is the command line, and the names the rest of the code base uses, in one place.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from mbert_jax import cli
from mbert_jax.distill.cache_config import (cache_dir_of, cached_steps, default_cache_config,
                                            distillation_stage, identity_key,
                                            resolve_teacher_step)
from mbert_jax.distill.cache_format import ShardError
from mbert_jax.distill.cache_reader import TeacherCache, open_cache, open_for_run
from mbert_jax.distill.cache_writer import WRITER_REPORT, summary, write_cache
from mbert_jax.training.workdir import write_json

__all__ = ["ShardError", "TeacherCache", "WRITER_REPORT", "cache_dir_of", "cached_steps",
           "cli_main", "default_cache_config", "distillation_stage", "identity_key",
           "open_cache", "open_for_run", "resolve_teacher_step", "summary", "write_cache"]


def main(argv: Sequence[str]) -> None:
  del argv
  FLAGS = flags.FLAGS

  def run():
    config = FLAGS.config
    cli.maybe_initialize_distributed(config.get("distributed") or {})
    report = write_cache(config, FLAGS.workdir, verify=FLAGS.verify,
                         progress=bool(config.train.get("progress_bar", True)))
    write_json(os.path.join(FLAGS.workdir, WRITER_REPORT), report)
    print(summary(report), flush=True)

  cli.guarded(run)


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "the distillation run's config file "
                                  "(configs/<name>.py[:args]); its PD stage is cached",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "the cache directory (schedule.teacher_cache of the run)")
  flags.DEFINE_bool("verify", False, "also check the CRC of every existing shard (reads them "
                    "all) and rewrite the corrupt ones")
  flags.mark_flags_as_required(["config", "workdir"])


def cli_main(argv: Sequence[str] | None = None) -> None:
  _define_flags()
  app.run(main, argv)


if __name__ == "__main__":
  cli_main()
