"""Is the data pipeline fast enough? Its examples/s on one core next to the full MobileBERT
train step's examples/s on this machine, measured in the same run.

  python benchmarks/data_pipeline.py [--source builtin] [--steps 3] [--batch_size 8]

The pipeline runs pinned to one core (batch_at is single-threaded numpy); the train step gets
every core. Aim: pipeline >= 20x the step, so one data process per host never starves it.
The step is a jitted forward + backward + AdamW update with MLM + NSP cross-entropy, no
dropout (as in MobileBERT's distillation stages), on the full `mobilebert` preset.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbert_jax.data import build_pipeline, default_data_config  # noqa: E402


def measure_pipeline(args) -> dict:
  cfg = default_data_config()
  cfg.source, cfg.vocab = args.source, args.vocab
  cfg.max_seq_length, cfg.max_predictions_per_seq = args.seq, args.preds
  cfg.batch_size = args.data_batch_size
  t0 = time.perf_counter()
  pipe = build_pipeline(cfg, args.workdir)
  build_s = time.perf_counter() - t0
  pipe.batch_at(0)  # pairing table of epoch 0 in memory
  allowed = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(allowed)})
  try:
    t0 = time.perf_counter()
    for step in range(args.data_batches):
      pipe.batch_at(step)
    elapsed = time.perf_counter() - t0
  finally:
    os.sched_setaffinity(0, allowed)
  return {"pipeline_examples_per_second": args.data_batches * cfg.batch_size / elapsed,
          "pipeline_build_or_load_seconds": build_s, "pipeline": pipe}


def measure_train_step(args, pipe) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  from mbert_jax.models import build
  from mbert_jax.models.config import preset

  model_cfg = preset(args.preset)
  if pipe.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"vocabulary {pipe.vocab_size} larger than the model's {model_cfg.vocab_size}")
  model = build(model_cfg)
  # The step consumes real batches: the pipeline's first global batches, re-cut to batch_size.
  data = pipe.batch_at(0)
  batch = {k: jnp.asarray(v[:args.batch_size]) for k, v in data.items()}
  if len(batch["input_ids"]) < args.batch_size:
    raise ValueError("--data_batch_size must be >= --batch_size")

  params = model.init(jax.random.PRNGKey(0), batch["input_ids"], batch["token_type_ids"],
                      batch["attention_mask"], batch["masked_lm_positions"])["params"]
  tx = optax.adamw(1e-4, weight_decay=0.01)
  opt_state = tx.init(params)

  def loss_fn(p, b):
    out = model.apply({"params": p}, b["input_ids"], b["token_type_ids"], b["attention_mask"],
                      b["masked_lm_positions"], deterministic=True)
    w = b["masked_lm_weights"]
    mlm = optax.softmax_cross_entropy_with_integer_labels(out.mlm_logits, b["masked_lm_ids"])
    mlm = jnp.sum(mlm * w) / (jnp.sum(w) + 1e-5)
    nsp = optax.softmax_cross_entropy_with_integer_labels(
        out.nsp_logits, b["next_sentence_labels"]).mean()
    return mlm + nsp

  @jax.jit
  def step(p, s, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, batch).compile()
  compile_s = time.perf_counter() - t0
  params, opt_state, loss = compiled(params, opt_state, batch)  # warm-up
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    params, opt_state, loss = compiled(params, opt_state, batch)
  jax.block_until_ready(loss)
  elapsed = time.perf_counter() - t0
  return {"step_examples_per_second": args.steps * args.batch_size / elapsed,
          "step_seconds": elapsed / args.steps, "step_compile_seconds": compile_s,
          "loss": float(loss), "device": str(jax.devices()[0]),
          "model_parameters": int(sum(x.size for x in jax.tree.leaves(params)))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", default="builtin")
  parser.add_argument("--vocab", default="train:8192")
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--preds", type=int, default=20)
  parser.add_argument("--data_batch_size", type=int, default=64)
  parser.add_argument("--data_batches", type=int, default=100)
  parser.add_argument("--preset", default="mobilebert")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mbert_jax_bench"))
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)

  data = measure_pipeline(args)
  pipe = data.pop("pipeline")
  train = measure_train_step(args, pipe)
  ratio = data["pipeline_examples_per_second"] / train["step_examples_per_second"]
  report = {"seq": args.seq, "preds": args.preds, "source": args.source, **data,
            "step_batch_size": args.batch_size, "preset": args.preset, **train,
            "ratio_pipeline_over_step": ratio, "target_ratio": 20, "meets_target": ratio >= 20}
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
