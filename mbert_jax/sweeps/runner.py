"""Running a sweep: set-up runs, teacher caches, then the runs, each resumed where it stopped;
or the same as a script of launch.py commands (`--emit`); and the `python -m mbert_jax.sweep`
command line.

Every run goes through the one training loop (`mbert_jax.launch.run_config`) and resumes: a
finished run (`final.json`) is skipped, a half-done one continues from its own checkpoints. A
run directory whose checkpoints belong to another run (the loop's identity: model, schedule,
data, seeds) is refused before anything is written; a change the checkpoints do not depend on
(a longer final stage, logging) resumes, and re-opens a finished run. The results table and
plots (report.py) are rebuilt from what is on disk after each run and by `--report`.

Imports no jax at module level: `--report` runs on machines without accelerators, often while
the runs still train elsewhere; what needs the training code imports it where it is used.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
import traceback
from typing import Mapping, Sequence

import ml_collections

from mbert_jax import cli
from mbert_jax.config_files import REPO_ROOT
from mbert_jax.sweeps import sweep as sweep_lib
from mbert_jax.sweeps.commands import cache_command, check_round_trip, display_path, launch_command
from mbert_jax.sweeps.report import (ERROR_FILE, MANIFEST, WALL_FILE, boundaries_of,
                                     read_json_if_any, report_paths, write_report)
from mbert_jax.sweeps.sweep import Run, SweepError, SweepFile, resolve
from mbert_jax.training import workdir as workdir_lib


# ============================================================================ teacher caches

def teacher_caches(runs: Sequence[Run], sweepdir: str) -> dict[str, list[Run]]:
  """{cache directory: the runs whose pre-training distillation stage reads it}, in run order.
  Runs naming one directory share one cache: their PD stages see the same batches (the
  pipeline is step-indexed), which the cache's identity key checks for each of them."""
  from mbert_jax.distill import teacher_cache  # imports jax: --report never gets here
  groups: dict[str, list[Run]] = {}
  for r in runs:
    directory = "" if r.setup else teacher_cache.cache_dir_of(resolve(r, sweepdir))
    if directory:
      groups.setdefault(os.path.abspath(directory), []).append(r)
  return groups


def build_teacher_caches(runs: Sequence[Run], sweepdir: str, log=print) -> dict[str, list[str]]:
  """Writes each cache the runs read, once, after the set-up runs (the teacher) and before the
  runs. Every reader's config goes through the writer: the first computes the shards, the
  rest only check that the cache's key is theirs (and fill steps a longer run needs), so a
  run that names a cache built for other data is refused here, naming the field, before any
  run trains. Returns {directory: reader names}."""
  from mbert_jax.distill import teacher_cache  # imports jax: --report never gets here
  groups = teacher_caches(runs, sweepdir)
  for directory, readers in groups.items():
    log(f"[teacher cache] {directory}: read by {', '.join(r.name for r in readers)}")
    for r in readers:
      config = resolve(r, sweepdir)
      try:
        report = teacher_cache.write_cache(
            config, directory, progress=bool(config.train.get("progress_bar", True)))
      except (ValueError, FileNotFoundError) as e:
        raise SweepError(f"run {r.name!r}: {e}") from None
      if report["cells_written"]:
        workdir_lib.write_json(os.path.join(directory, teacher_cache.WRITER_REPORT), report)
      log(f"[teacher cache] {r.name}: {teacher_cache.summary(report)}")
  return {d: [r.name for r in readers] for d, readers in groups.items()}


# ============================================================================ the sweep directory

def _stage_layout(config: ml_collections.ConfigDict) -> list[tuple[int, str]] | None:
  if "schedule" not in config:
    return []  # fine-tuning: one stage
  return boundaries_of(config.schedule, config.model.num_hidden_layers)


def write_manifest(sweep_file: SweepFile, runs: Sequence[Run], sweepdir: str,
                   commands: Mapping[str, str] | None = None) -> str:
  """`sweep.json`: which directories are runs, their strategy labels, stage boundaries and
  commands; --report reads it, so a sweep run by a cluster scheduler gets the same table and
  the report needs no jax to lay out the stages."""
  os.makedirs(sweepdir, exist_ok=True)
  entries = []
  for r in runs:
    cfg = resolve(r, sweepdir)
    entries.append({
        "name": r.name, "variant": r.variant, "setup": r.setup,
        "config": r.config_ref, "overrides": [[k, v] for k, v in r.overrides],
        "strategy": str(cfg.schedule.name) if "schedule" in cfg else "",
        "stage_boundaries": _stage_layout(cfg),
        "command": (commands or {}).get(r.name) or launch_command(r, sweepdir),
    })
  caches = {d: [r.name for r in readers] for d, readers in teacher_caches(runs, sweepdir).items()}
  path = os.path.join(sweepdir, MANIFEST)
  workdir_lib.write_json(path, {"sweep": sweep_file.ref, "runs": entries,
                                "teacher_caches": caches}, all_processes=True)
  return path


def _check_identity(run: Run, run_dir: str, config: ml_collections.ConfigDict) -> None:
  """A run directory only resumes checkpoints of its own identity (what the training loop's
  workdir claim checks, here without writing anything). A directory without checkpoints has
  nothing to protect."""
  if not workdir_lib.has_checkpoints(run_dir):
    return
  stored = read_json_if_any(os.path.join(run_dir, workdir_lib.IDENTITY_FILE))
  if stored is None:
    raise SweepError(
        f"run {run.name!r}: {run_dir} holds checkpoints but no {workdir_lib.IDENTITY_FILE}, so "
        "they cannot be checked against this run; use a fresh --workdir or delete that directory")
  from mbert_jax import launch  # imports jax; only resumed runs get here
  try:
    identity = launch.task_for(config).identity()
  except (ValueError, FileNotFoundError) as e:
    raise SweepError(f"run {run.name!r}: {e}") from None
  diffs = workdir_lib.identity_differences(stored, identity)
  if diffs:
    raise SweepError(
        f"run {run.name!r}: {run_dir} holds a run of a different config ({'; '.join(diffs[:3])}"
        f"{f'; and {len(diffs) - 3} more' if len(diffs) > 3 else ''}); use a fresh --workdir "
        "or delete that directory")


def check_sweepdir(runs: Sequence[Run], sweepdir: str) -> None:
  """Refuses, before anything is written, a sweep dir whose runs were started with other
  configs (e.g. the same --workdir with a different sweep argument)."""
  for r in runs:
    _check_identity(r, os.path.join(os.path.abspath(sweepdir), r.name), resolve(r, sweepdir))


def changes_since_finished(run_dir: str, config: ml_collections.ConfigDict) -> list[str] | None:
  """None for a run that has not finished; else the config fields changed since it did. The
  identity being checked, those are fields the checkpoints do not depend on (a longer final
  stage, logging): the loop resumes such a run, so its report follows the config asked for."""
  if not workdir_lib.is_finished(run_dir):
    return None
  stored = read_json_if_any(os.path.join(run_dir, workdir_lib.CONFIG_FILE))
  return [] if stored is None else workdir_lib.identity_differences(stored, config.to_dict())


def _add_wall(run_dir: str, seconds: float) -> None:
  # The loop's wall_seconds covers only the session that finished; a resumed run's cost is the
  # sum over its sessions.
  path = os.path.join(run_dir, WALL_FILE)
  prev = read_json_if_any(path) or {"seconds": 0.0, "sessions": 0}
  workdir_lib.write_json(path, {"seconds": prev["seconds"] + seconds,
                                "sessions": prev["sessions"] + 1}, all_processes=True)


# ============================================================================ running

def run_one(run: Run, sweepdir: str, log=print) -> dict | None:
  """Runs (or resumes, or skips) one run; returns its report, None if it was already done."""
  run_dir = os.path.join(os.path.abspath(sweepdir), run.name)
  config = resolve(run, sweepdir)
  _check_identity(run, run_dir, config)  # again: another process may have started it since
  changes = changes_since_finished(run_dir, config)
  if changes == []:
    log(f"[{run.name}] finished earlier in {run_dir}; skipping")
    return None
  if changes:
    log(f"[{run.name}] finished earlier in {run_dir} with another config "
        f"({'; '.join(changes[:3])}); resuming")
  os.makedirs(run_dir, exist_ok=True)
  error_path = os.path.join(run_dir, ERROR_FILE)
  if os.path.exists(error_path):
    os.remove(error_path)
  log(f"[{run.name}] running in {run_dir}")
  from mbert_jax import launch  # imports jax: --emit and --report never get here
  t0 = time.time()
  try:
    return launch.run_config(config, run_dir)
  except Exception:
    with open(error_path, "w") as f:
      f.write(traceback.format_exc())
    raise
  finally:
    _add_wall(run_dir, time.time() - t0)


def _select(runs: Sequence[Run], only: Sequence[str] | None) -> list[Run]:
  if not only:
    return list(runs)
  names = [r.name for r in runs]
  unknown = [n for n in only if n not in names]
  if unknown:
    raise SweepError(f"--only names unknown run(s) {unknown}; runs are {names}")
  return [r for r in runs if r.name in set(only)]


def run_sweep(sweep_file: SweepFile, sweepdir: str, only: Sequence[str] | None = None,
              log=print, report_every_run: bool = True) -> dict[str, str]:
  """Set-up runs, then the runs, one after another; returns {name: status}. A failed run is
  recorded and the sweep goes on (runs are independent); a failed set-up run stops it."""
  sweepdir = os.path.abspath(sweepdir)
  setup, runs = sweep_file.setup_runs(), sweep_file.runs()
  selected = _select(runs, only)
  check_sweepdir(setup + runs, sweepdir)
  write_manifest(sweep_file, setup + runs, sweepdir)
  statuses: dict[str, str] = {}
  for r in setup:
    report = run_one(r, sweepdir, log)
    status = "completed" if report is None else report["status"]
    statuses[r.name] = status
    if status == "preempted":
      log(f"[{r.name}] preempted; rerun the same command to resume")
      write_report(sweepdir)
      return statuses
  build_teacher_caches(selected, sweepdir, log)
  for i, r in enumerate(selected):
    try:
      report = run_one(r, sweepdir, log)
    except (KeyboardInterrupt, SystemExit, SweepError):
      raise
    except Exception as e:  # one broken run must not cost the rest of the comparison
      log(f"[{r.name}] failed: {type(e).__name__}: {e} (traceback in "
          f"{os.path.join(sweepdir, r.name, ERROR_FILE)})")
      statuses[r.name] = "failed"
    else:
      statuses[r.name] = "completed" if report is None else report["status"]
    if statuses[r.name] == "preempted":
      log(f"[{r.name}] preempted; rerun the same command to resume")
      break
    if report_every_run and i + 1 < len(selected):
      write_report(sweepdir)  # partial results stay readable during a long sweep
  write_report(sweepdir)
  return statuses


# ============================================================================ emitting

def emit(sweep_file: SweepFile, sweepdir: str, only: Sequence[str] | None = None) -> list[str]:
  """Lines of a shell script: set-up commands first (they must finish before the rest), then
  one independent command per run. Each is checked to reproduce the in-process config."""
  sweepdir = os.path.abspath(sweepdir)
  setup, runs = sweep_file.setup_runs(), sweep_file.runs()
  selected = _select(runs, only)
  check_sweepdir(setup + runs, sweepdir)
  commands = {r.name: check_round_trip(r, sweepdir) for r in setup + selected}
  caches = teacher_caches(selected, sweepdir)
  write_manifest(sweep_file, setup + runs, sweepdir, commands)
  lines = [f"# sweep {display_path(sweep_file.path)}"
           + ("" if sweep_file.arg is None else f":{sweep_file.arg}")
           + f" -> {sweepdir}; run from {REPO_ROOT}"]
  if setup:
    lines.append("# set-up runs: must finish before the runs below")
    lines += [commands[r.name] for r in setup]
  if caches:
    lines.append("# teacher caches: after the set-up runs, before the runs that read them")
    for directory, readers in caches.items():
      lines.append(f"# {display_path(directory)}: read by {', '.join(r.name for r in readers)}")
      lines.append(cache_command(readers[0], directory, sweepdir))
  lines.append("# runs: independent of each other")
  lines += [commands[r.name] for r in selected]
  lines.append(f"# then: python -m mbert_jax.sweep --report --workdir={shlex.quote(sweepdir)}")
  return lines


# ============================================================================ command line

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m mbert_jax.sweep",
                              description=sweep_lib.__doc__.split("\n\n")[0])
  p.add_argument("--sweep", help="sweep file `path[:arg]`")
  p.add_argument("--workdir", required=True, help="the sweep directory (one subdirectory per run)")
  p.add_argument("--emit", action="store_true",
                 help="print one launch.py command per run instead of running")
  p.add_argument("--only", default="", help="comma-separated run names (set-up runs always run)")
  p.add_argument("--report", action="store_true",
                 help="only rebuild the results table and plots from the sweep dir")
  a = p.parse_args(argv)
  if a.report and (a.emit or a.only):
    p.error("--report takes no --emit or --only")
  if not a.report and not a.sweep:
    p.error("--sweep is required unless --report is given")
  return a


def _paths_lines(paths: Mapping[str, str]) -> list[str]:
  return [f"{k}: {v}" for k, v in paths.items()]


def _dispatch(a: argparse.Namespace) -> int:
  if a.report:
    print("\n".join(_paths_lines(write_report(a.workdir))), flush=True)
    return 0
  sweep_file = SweepFile(a.sweep)
  only = [n.strip() for n in a.only.split(",") if n.strip()]
  if a.emit:
    print("\n".join(emit(sweep_file, a.workdir, only)), flush=True)
    return 0
  statuses = run_sweep(sweep_file, a.workdir, only)
  print("\n".join([f"  {name:<20} {status}" for name, status in statuses.items()]
                  + _paths_lines(report_paths(a.workdir))), flush=True)
  return 1 if "failed" in statuses.values() else 0


def main(argv: Sequence[str] | None = None) -> int:
  """0: done; 1: some run failed (recorded, the sweep went on); 2: a known error (bad sweep
  file, run or sweep dir), one line on stderr; 3: a set-up run stopped on non-finite losses."""
  a = parse_args(argv)
  try:
    return cli.guarded(_dispatch, a)
  except SystemExit as e:  # cli.guarded ends known errors so; callers (and tests) get the code
    return e.code if isinstance(e.code, int) else cli.USAGE_EXIT
