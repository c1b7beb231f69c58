"""`python -m mbert_jax.sweep` (`mbert-jax sweep`): run or emit a strategy sweep, and report it.
The code is mbert_jax/sweeps/ (the command line: runner.py)."""

import sys

from mbert_jax.sweeps.runner import main

__all__ = ["main"]

if __name__ == "__main__":
  sys.exit(main())
