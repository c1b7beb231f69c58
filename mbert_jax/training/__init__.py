"""Training: the one loop (`loop.run`), the task contract it runs (`task`), the train state and
its guarded update (`state`), the compiled step (`step`), optimizers and schedules (`optim`),
the device mesh (`sharding`), checkpoints, the workdir a run owns, and metrics. It knows no
objective and no model's parameter paths: a task brings those."""

from mbert_jax.training.loop import run
from mbert_jax.training.state import TrainState, guarded_update
from mbert_jax.training.step import make_train_step
from mbert_jax.training.task import ParamSubset, StagePlan, Task

__all__ = ["run", "TrainState", "guarded_update", "make_train_step", "ParamSubset", "StagePlan",
           "Task"]
