"""Progressive (truncated) layer-wise transfer vs the same schedule at full depth.

    python benchmarks/progressive_cost.py [--student=mobilebert] [--teacher=ib_bert_large]
        [--batch=2] [--seq=64] [--layers=1,6,12,18,24]

During PKT phase l only the first l layers of teacher and student need to run (TF2 style);
TF1 runs all 24 and gates the loss. This measures the step time of phase l both ways at the
sampled layers, side by side in one process, and integrates over the 24 phases (linear
interpolation between samples) to the cost ratio of the whole layer-wise part.
"""

import argparse
import contextlib
import dataclasses
import json
import time

from common import compiled_step, synthetic_batch

import flax.linen as nn
import jax
import numpy as np

from mbert_jax.models import build, example_inputs
from mbert_jax.distill import objective
from mbert_jax.distill import schedule
from mbert_jax.training import sharding
from mbert_jax.models import mobilebert, preset

parser = argparse.ArgumentParser()
parser.add_argument("--student", default="mobilebert")
parser.add_argument("--teacher", default="ib_bert_large")
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--seq", type=int, default=64)
parser.add_argument("--layers", default="1,6,12,18,24")
parser.add_argument("--steps", type=int, default=7, help="timed steps per variant and phase")
parser.add_argument("--ab", action="store_true",
                    help="also time the truncated phase as it ran before issue 14, in the same "
                         "alternating rounds: scanning a slice params[:l] (a copy of l layers, "
                         "gradients padded back) and updating every layer slice")
args = parser.parse_args()

s_cfg = preset(args.student, max_position_embeddings=max(args.seq, 512))
t_cfg = preset(args.teacher)
L = s_cfg.num_hidden_layers
mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
t_params, _ = sharding.init_params(build(t_cfg), example_inputs(t_cfg), 1, mesh, sharding.DEFAULT_RULES)
batch = synthetic_batch(s_cfg.vocab_size, args.batch, args.seq, 10)
sc = schedule.default_schedule_config()
sc.name = "pkt"
sc.steps_per_layer = 1000
stages = schedule.build_schedule(sc, L)


def _sliced_first_layers(self, x, mask_bias, deterministic, k, return_qkv, layer_outputs):
  """The pre-issue-14 truncation: scan over a copy of the first k layer slices."""
  sliced = jax.tree.map(lambda a: a[:k], nn.unbox(self.variables["params"]["layers"]))
  block = mobilebert.Block(self.cfg, deterministic, return_qkv, layer_outputs, parent=None)
  return jax.lax.scan(lambda h, p: block.apply({"params": p}, h, mask_bias), x, sliced)


@contextlib.contextmanager
def before_issue_14():
  saved = mobilebert.Encoder._first_layers, objective.trained_depth
  mobilebert.Encoder._first_layers = _sliced_first_layers
  objective.trained_depth = lambda stage, num_layers: None
  try:
    yield
  finally:
    mobilebert.Encoder._first_layers, objective.trained_depth = saved


def prepared(stage, old: bool = False):
  with before_issue_14() if old else contextlib.nullcontext():
    fn, state, gbatch, _ = compiled_step(s_cfg, stage, mesh, batch, teacher_cfg=t_cfg,
                                         teacher_params=t_params)
    state, out = fn(state, t_params, gbatch)  # trace, compile and warm up inside the patch
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
  if args.ab and stage.num_layers is not None and stage.num_layers < L:
    runs["truncated_before"] = prepared(stage, old=True)
  times = {k: [] for k in runs}
  for _ in range(args.steps):  # alternate, so drift on a shared machine hits all alike
    for k, p in runs.items():
      times[k].append(one_step(p))
  med = {k: float(np.median(v)) for k, v in times.items()}
  med.setdefault("truncated_before", med["truncated"])  # phase L: nothing is truncated
  rows.append((layer, med["truncated"], med["full"], med["truncated_before"]))
  before = (f"   before issue 14 {med['truncated_before'] * 1e3:8.1f} ms/step "
            f"({med['truncated_before'] / med['full']:.3f})" if args.ab else "")
  print(f"phase {layer:>2}: truncated {med['truncated'] * 1e3:8.1f} ms/step   full depth "
        f"{med['full'] * 1e3:8.1f} ms/step   ratio {med['truncated'] / med['full']:.3f}{before}",
        flush=True)


def integrated(column: int) -> float:
  """Sum over the L phases (linear interpolation between the sampled ones) / full depth."""
  xs = np.arange(1, L + 1)
  at = [r[0] for r in rows]
  return float(np.interp(xs, at, [r[column] for r in rows]).sum()
               / np.interp(xs, at, [r[2] for r in rows]).sum())


ratio = integrated(1)
print(f"layer-wise transfer ({L} phases): truncated / full depth = {ratio:.3f} (aim <= 0.55; "
      f"arithmetic of l of {L} layers: {(L + 1) / (2 * L):.3f})")
result = {"student": args.student, "teacher": args.teacher, "batch": args.batch,
          "seq": args.seq, "device": jax.devices()[0].device_kind,
          "phases": [{"layer": l, "truncated_s": t, "full_s": f, "truncated_before_s": b}
                     for l, t, f, b in rows],
          "ratio": ratio}
if args.ab:
  result["ratio_before_issue_14"] = integrated(3)
  print(f"  before issue 14 (slice copy, every layer slice updated): "
        f"{result['ratio_before_issue_14']:.3f}")
print(json.dumps(result))
