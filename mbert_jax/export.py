"""`python -m mbert_jax.export` (`mbert-jax export`): a run as a Hugging Face, Flax or ONNX
directory. The code is mbert_jax/interop/export.py."""

from mbert_jax.interop.export import FORMATS, QUANTIZATIONS, export, main

__all__ = ["FORMATS", "QUANTIZATIONS", "export", "main"]

if __name__ == "__main__":
  main()
