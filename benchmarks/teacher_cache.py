"""Pre-training distillation step reading cached teacher targets vs the teacher run online.

    python benchmarks/teacher_cache.py [--smoke] [--batch=8] [--seq=128] [--predictions=20]
        [--k=64] [--rounds=3]

One process, alternating rounds (a busy machine hurts both alike), on the same batch; the
ratio is printed from the medians and from the fastest round of each:
  online   the PD step as the loop runs it today: IB-BERT-large forward (no gradient) and
           MobileBERT forward + backward with the full-vocabulary KD term
           (`losses.distillation_mlm_loss`), MLM + NSP terms, LAMB update;
  cached   the same student step with `losses.sparse_kd_loss` on top-k targets, timed from
           reading the step's targets out of a real cache shard (`TeacherCache.targets_at`:
           unzip, check, copy to the device) to the updated state.
The shard is written by the cache's own writer pieces from the IB-BERT-large forward on this
batch, so the bytes per sequence are those of real shard files; with random weights and
random tokens the teacher's logits compress differently from a trained teacher's, and the
raw record size (k x (2 + 2) + 4 bytes per prediction + 8 per row) is the bound that holds.
`--smoke` uses the micro presets at a small size (seconds, for checking the script).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from common import synthetic_batch  # noqa: E402

from mbert_jax.models import build, example_inputs
from mbert_jax.distill import losses  # noqa: E402
from mbert_jax.training import optim  # noqa: E402
from mbert_jax.distill import schedule  # noqa: E402
from mbert_jax.training import sharding  # noqa: E402
from mbert_jax.distill import cache_format, cache_writer  # noqa: E402
from mbert_jax.distill import teacher_cache as tc  # noqa: E402
from mbert_jax.models import build, preset  # noqa: E402
from mbert_jax.models.summary import forward_flops  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="micro models, tiny batch")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--predictions", type=int, default=20)
  p.add_argument("--k", type=int, default=tc.default_cache_config().k)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.seq, args.predictions = 4, 32, 5
  return args


def pd_stage():
  c = schedule.default_schedule_config()
  c.name = "pd_only"
  c.distill_steps = 1000
  c.warmup_steps = 0
  return schedule.build_schedule(c, 1)[0]


def make_step(student, teacher, tx, stage):
  """One PD step; `teacher` None = KD targets come from the batch (the cache's keys)."""
  def loss_fn(params, teacher_params, batch):
    args = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    out = student.apply({"params": params}, *args,
                        masked_positions=batch["masked_lm_positions"], deterministic=True)
    labels, weights = batch["masked_lm_ids"], batch["masked_lm_weights"]
    mlm, _ = losses.mlm_loss(out.mlm_logits, labels, weights)
    if teacher is None:
      _, parts = losses.sparse_kd_loss(
          out.mlm_logits, batch["teacher_topk_values"], batch["teacher_topk_indices"],
          batch["teacher_log_normalizer"], labels, weights, temperature=stage.temperature)
    else:
      t_out = jax.lax.stop_gradient(teacher.apply(
          {"params": teacher_params}, *args, masked_positions=batch["masked_lm_positions"],
          deterministic=True))
      _, parts = losses.distillation_mlm_loss(out.mlm_logits, t_out.mlm_logits, labels, weights,
                                              alpha=0.0, temperature=stage.temperature)
    nsp, _ = losses.nsp_loss(out.nsp_logits, batch["next_sentence_labels"])
    return (stage.weight("mlm") * mlm + stage.weight("kd") * parts["kd_ce"]
            + stage.weight("nsp") * nsp)

  def step(params, opt_state, teacher_params, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, teacher_params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def write_bench_cache(directory: str, t_model, vocab: int, t_params, batch: dict, k: int,
                      steps: int, stage) -> tc.TeacherCache:
  """A real cache of `steps` steps (the same batch each step) made by the writer's pieces."""
  settings = tc.default_cache_config()
  settings.k = k
  geometry = types.SimpleNamespace(max_predictions_per_seq=batch["masked_lm_ids"].shape[1],
                                   vocab_size=vocab,
                                   batch_size=batch["input_ids"].shape[0])
  key = {"benchmark": {"k": k, "batch": geometry.batch_size}}
  header = cache_writer.make_header(key, settings, geometry, 1)
  header["steps_per_shard"] = steps
  from mbert_jax.training.workdir import write_json
  write_json(os.path.join(directory, cache_format.HEADER_FILE), header)
  os.makedirs(os.path.join(directory, cache_format.SHARD_DIR))
  fn = jax.jit(cache_writer.make_targets_fn(t_model, k, stage.temperature, settings.value_dtype,
                                            np.dtype(header["index_dtype"])))
  values, indices, normalizer = (np.asarray(a) for a in fn(t_params, {
      name: jnp.asarray(v) for name, v in batch.items()}))
  records = cache_writer.records_from(values, indices, normalizer,
                                      cache_format.row_digests(batch),
                                      cache_format.header_record_dtype(header))
  shard = os.path.join(directory, cache_format.SHARD_DIR, cache_format.shard_name(0, 0, 1))
  writer = cache_writer.ShardWriter(shard, {"cell": 0, "first_step": 0, "end_step": steps,
                                            "key_digest": header["key_digest"],
                                            "rows": [0, geometry.batch_size]})
  for step in range(steps):
    writer.add(step, records)
  writer.close()
  return tc.open_cache(directory, key, steps=(0, steps))


def main(argv=None) -> None:
  args = parse_args(argv)
  suffix = "_micro" if args.smoke else ""
  s_cfg = preset("mobilebert" + suffix, max_position_embeddings=max(args.seq, 512))
  t_cfg = preset("ib_bert_large" + suffix, max_position_embeddings=max(args.seq, 512))
  k = min(args.k, t_cfg.vocab_size)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  student, teacher = build(s_cfg), build(t_cfg)
  t_params, _ = sharding.init_params(build(t_cfg), example_inputs(t_cfg), 1, mesh, rules)
  stage = pd_stage()
  host_batch = synthetic_batch(s_cfg.vocab_size, args.batch, args.seq, args.predictions)
  # Everything on one device under one sharding, so a step's outputs are valid inputs of the
  # next without a recompile.
  rep = sharding.replicated(mesh)
  t_params = jax.device_put(t_params, rep)
  batch = jax.device_put(host_batch, rep)

  def fresh_state():
    params, _ = sharding.init_params(build(s_cfg), example_inputs(s_cfg), 0, mesh, rules)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    o = optim.default_optimizer_config()
    o.schedule, o.warmup_steps = "constant", 0
    tx = optim.build_optimizer(o, abstract, schedule.lr_multiplier_tree(stage, abstract),
                               lr_schedule=stage.learning_rate)
    return jax.device_put([params, tx.init(params)], rep), tx

  steps = 1 + args.rounds
  with tempfile.TemporaryDirectory() as tmp:
    cache = write_bench_cache(tmp, teacher, t_cfg.vocab_size, t_params, host_batch, k, steps,
                              stage)
    raw = cache_format.header_record_dtype(cache.header).itemsize
    on_disk = cache.bytes_per_sequence

    runs = {}
    for name, t_model in (("online", teacher), ("cached", None)):
      state, tx = fresh_state()
      step_fn = jax.jit(make_step(student, t_model, tx, stage), out_shardings=rep,
                        donate_argnums=(0, 1))
      runs[name] = (step_fn, state)

    def online(step: int) -> float:
      fn, state = runs["online"]
      t = time.perf_counter()
      state[0], state[1], loss = fn(state[0], state[1], t_params, batch)
      jax.block_until_ready(loss)
      return time.perf_counter() - t

    read_times = []

    def cached(step: int) -> float:
      fn, state = runs["cached"]
      t = time.perf_counter()
      targets = cache.targets_at(step)
      read_times.append(time.perf_counter() - t)
      full = dict(batch, **jax.device_put(targets, rep))
      state[0], state[1], loss = fn(state[0], state[1], None, full)
      jax.block_until_ready(loss)
      return time.perf_counter() - t

    for name, fn in (("online", online), ("cached", cached)):
      print(f"{name}: compile + first step {fn(0):.1f} s", flush=True)
    read_times.clear()
    times = {"online": [], "cached": []}
    for r in range(1, steps):
      for name, fn in (("online", online), ("cached", cached)):
        times[name].append(fn(r))
      print(f"round {r}: online {times['online'][-1]:.3f} s, cached {times['cached'][-1]:.3f} s",
            flush=True)
    cache.close()

  online_s, cached_s = (statistics.median(times[n]) for n in ("online", "cached"))
  print(f"\n{'smoke: ' if args.smoke else ''}{s_cfg.num_hidden_layers}-layer student "
        f"({'mobilebert' + suffix}), teacher {'ib_bert_large' + suffix}, batch {args.batch} x "
        f"{args.seq}, {args.predictions} predictions, k = {k}, vocabulary {t_cfg.vocab_size}")
  print(f"PD step, median of {args.rounds} alternating rounds: online {online_s:.3f} s, cached "
        f"{cached_s:.3f} s (of which reading the shard {statistics.median(read_times) * 1e3:.1f} "
        f"ms) = {cached_s / online_s:.3f}x the online step (aim <= 0.35x)")
  student_flops = 3 * forward_flops(s_cfg, args.seq, None, args.predictions, heads=True)
  teacher_flops = forward_flops(t_cfg, args.seq, None, args.predictions, heads=True)
  analytic = student_flops / (student_flops + teacher_flops)
  print(f"analytic matmul FLOPs: cached / online = {analytic:.3f} (student forward + backward "
        f"{student_flops / 1e9:.3g} GFLOP per sequence, teacher forward "
        f"{teacher_flops / 1e9:.3g})")
  fastest = {n: min(times[n]) for n in times}
  print(f"fastest rounds (least disturbed by other jobs): online {fastest['online']:.3f} s, "
        f"cached {fastest['cached']:.3f} s = {fastest['cached'] / fastest['online']:.3f}x")
  print(f"cache: {on_disk:,.0f} bytes per sequence in the shard files, {raw:,} raw "
        f"(aim <= 8,192 at 20 predictions)")


if __name__ == "__main__":
  main()
