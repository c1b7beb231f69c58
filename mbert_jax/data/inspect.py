"""`python -m mbert_jax.data.inspect` (`mbert-jax inspect`): build the configured data pipeline
and print one JSON object describing what it produces. The code is mbert_jax/data/preview.py (a
module named `inspect` would shadow the standard library's wherever this directory is on
sys.path)."""

from absl import app

from mbert_jax.data.preview import main

__all__ = ["main"]

if __name__ == "__main__":
  app.run(main)
