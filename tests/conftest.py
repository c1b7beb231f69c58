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
