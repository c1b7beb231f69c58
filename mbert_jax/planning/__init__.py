"""Plans a run for the hardware it will run on, without that hardware: every program compiled
for a TPU topology (or this machine's devices), its memory plan, collectives and projected
step time, and the schedule's hours (`python -m mbert_jax.plan`)."""
