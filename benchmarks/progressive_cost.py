"""Progressive (truncated) layer-wise transfer vs the same schedule at full depth.

    python benchmarks/progressive_cost.py [--student=mobilebert] [--teacher=ib_bert_large]
        [--batch=2] [--seq=64] [--layers=1,6,12,18,24]

During PKT phase l only the first l layers of teacher and student need to run (TF2 style);
TF1 runs all 24 and gates the loss. This measures the step time of phase l both ways at the
sampled layers, side by side in one process, and integrates over the 24 phases (linear
interpolation between samples) to the cost ratio of the whole layer-wise part.
"""

import argparse
import dataclasses
import json
import time

from common import compiled_step, synthetic_batch

import jax
import numpy as np

from mbert_jax import schedule, sharding, train
from mbert_jax.models import preset

parser = argparse.ArgumentParser()
parser.add_argument("--student", default="mobilebert")
parser.add_argument("--teacher", default="ib_bert_large")
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--seq", type=int, default=64)
parser.add_argument("--layers", default="1,6,12,18,24")
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

s_cfg = preset(args.student, max_position_embeddings=max(args.seq, 512))
t_cfg = preset(args.teacher)
L = s_cfg.num_hidden_layers
mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
t_params, _ = sharding.init_params(t_cfg, 1, mesh, sharding.DEFAULT_RULES)
batch = synthetic_batch(s_cfg.vocab_size, args.batch, args.seq, 10)
sc = schedule.default_schedule_config()
sc.name = "pkt"
sc.steps_per_layer = 1000
stages = schedule.build_schedule(sc, L)


def prepared(stage):
  fn, state, gbatch, _ = compiled_step(s_cfg, stage, mesh, batch, teacher_cfg=t_cfg,
                                       teacher_params=t_params)
  state, out = fn(state, t_params, gbatch)  # compile + warm up
  jax.block_until_ready(out)
  return [fn, state, gbatch]


def one_step(p) -> float:
  fn, state, gbatch = p
  t = time.perf_counter()
  p[1], out = fn(state, t_params, gbatch)
  jax.block_until_ready(out)
  return time.perf_counter() - t


sampled = [int(x) for x in args.layers.split(",")]
rows = []
for layer in sampled:
  stage = stages[layer - 1]
  runs = {"truncated": prepared(stage), "full": prepared(dataclasses.replace(stage, num_layers=None))}
  times = {k: [] for k in runs}
  for _ in range(args.steps):  # alternate, so drift on a shared machine hits both alike
    for k, p in runs.items():
      times[k].append(one_step(p))
  truncated, full = (float(np.median(times[k])) for k in ("truncated", "full"))
  rows.append((layer, truncated, full))
  print(f"phase {layer:>2}: truncated {truncated * 1e3:8.1f} ms/step   full depth "
        f"{full * 1e3:8.1f} ms/step   ratio {truncated / full:.3f}", flush=True)

xs = np.arange(1, L + 1)
trunc_total = np.interp(xs, [r[0] for r in rows], [r[1] for r in rows]).sum()
full_total = np.interp(xs, [r[0] for r in rows], [r[2] for r in rows]).sum()
ratio = trunc_total / full_total
print(f"layer-wise transfer ({L} phases): truncated / full depth = {ratio:.3f} (target <= 0.6)")
print(json.dumps({"student": args.student, "teacher": args.teacher, "batch": args.batch,
                  "seq": args.seq, "device": jax.devices()[0].device_kind,
                  "phases": [{"layer": l, "truncated_s": t, "full_s": f} for l, t, f in rows],
                  "ratio": ratio}))
