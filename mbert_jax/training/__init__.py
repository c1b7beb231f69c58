"""Training: the one loop (`loop.run`), the task contract it runs (`task`), the train state and
its guarded update (`state`), the compiled step (`step`), optimizers and schedules (`optim`),
the device mesh (`sharding`), checkpoints, the workdir a run owns, and metrics. It knows no
objective and no model's parameter paths: a task brings those.

The names below load their module on first use, so a light import (`training.workdir`, which
`python -m mbert_jax.sweep --report` needs) does not pull in jax.
"""

import importlib

_EXPORTS = {"run": "loop", "TrainState": "state", "guarded_update": "state",
            "make_train_step": "step", "ParamSubset": "task", "Setup": "task",
            "StagePlan": "task", "Task": "task"}

__all__ = sorted(_EXPORTS)


_SUBMODULES = ("checkpoint", "config", "loop", "metrics", "optim", "sharding", "state", "step",
               "task", "workdir")


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
