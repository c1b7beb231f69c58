"""Sweep files: a base config plus named override sets, run by `python -m mbert_jax.sweep`."""
