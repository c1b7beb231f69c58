"""Test-wide setup, applied before jax is imported (subprocesses inherit the environment).

- the repo root on sys.path: config files import `configs.common`;
- XLA's heavy optimisation passes off and a persistent compilation cache for the session, as
  the Flax examples' tests do: the tiny models here spend far longer compiling than running,
  and resume tests recompile identical steps.
"""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "mbert_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# ---------------------------------------------------------------------------- CI: no silent skips
# CI installs every extra the README's set-up names, so there a skip for a missing optional
# dependency or packaged checkpoint is an install problem that would hide the checks behind the
# README's claims: it fails instead. Skips for what CI cannot have stay skips.
import pytest  # noqa: E402

CI_MAY_LACK = ("accelerator", "gpu", "tpu device", "network", "online")


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:
    return str(longrepr[2])
  return str(longrepr)


def _fail_skip_in_ci(report) -> None:
  if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
    return
  reason = _skip_reason(report)
  if any(word in reason.lower() for word in CI_MAY_LACK):
    return
  report.outcome = "failed"
  report.longrepr = (f"skipped in CI ({reason}): CI installs every extra of the README's set-up "
                     "(.ci/run), so this is an install problem; a skip is allowed only for an "
                     f"accelerator or the network ({', '.join(CI_MAY_LACK)})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  outcome = yield
  _fail_skip_in_ci(outcome.get_result())


# ---------------------------------------------------------------------------- shared runs
INT8_DEV_ROWS = 300  # one point of dev accuracy = 3 examples


@pytest.fixture(scope="session")
def sst2_run(tmp_path_factory):
  """One fine-tuned toy SST-2 run that every int8 export test quantizes (training it once per
  module cost CI a minute each)."""
  from export_util import glue_run, write_sst2
  d = tmp_path_factory.mktemp("sst2_run")
  data = write_sst2(str(d / "data"), n_train=512, n_dev=INT8_DEV_ROWS, seed=3)
  workdir = str(d / "run")
  report = glue_run(workdir, data, steps=60)
  return {"workdir": workdir, "data": data, "report": report, "root": d}
