"""Error types shared by the trainers and the commands (no heavy imports)."""


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class WorkdirMismatchError(ValueError):
  """A workdir holds a run of another configuration; nothing was written or moved."""
