"""`python -m mbert_jax.predict` (`mbert-jax predict`): run an exported task model on text.
The code is mbert_jax/interop/predict.py."""

from mbert_jax.interop.predict import load, main, predict, read_task

__all__ = ["load", "main", "predict", "read_task"]

if __name__ == "__main__":
  main()
