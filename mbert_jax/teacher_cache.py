"""`python -m mbert_jax.teacher_cache` (`mbert-jax teacher-cache`): write the teacher's top-k
logits for a distillation run's PD stage. The code is mbert_jax/distill/teacher_cache.py."""

from mbert_jax.distill.teacher_cache import cli_main, write_cache

__all__ = ["cli_main", "write_cache"]

if __name__ == "__main__":
  cli_main()
