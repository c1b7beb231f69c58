"""`python -m mbert_jax.plan` (`mbert-jax plan`): every program of a run compiled for the
hardware it will run on (a TPU topology, or this machine), its memory, collectives and
projected time, and the schedule's chip-hours. The code is mbert_jax/planning/."""

from mbert_jax.planning.command import main

__all__ = ["main"]

if __name__ == "__main__":
  main()
