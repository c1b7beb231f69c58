"""Where a compiled train step's time goes: XLA's profiler, op by op, grouped by phase and kind.

    python benchmarks/step_profile.py [--preset=mobilebert] [--batch=8] [--seq=128]
        [--predictions=20] [--optimizer=adamw|lamb] [--stage=scratch|pd|pkt:L] [--steps=3]
        [--teacher=ib_bert_large] [--top=15]

Runs the training loop's own step (benchmarks/common.py: `train.make_train_step` on the
pretraining task's loss) under `jax.profiler.trace`, reads the Perfetto trace back and maps
every executed HLO instruction to the source op that XLA's metadata names, so each op's time
lands in one of: forward / backward (JAX's `jvp(...)` / `transpose(jvp(...))` scopes) / update
(the optimizer and everything outside the model), and in one kind: matmul (dot fusions and
dots), copy/transpose, slice/update-slice (the layer scan reading weights and writing its
stacked residuals), broadcast (buffer initialisation) or elementwise/reduce. Times are summed
over op events, so with several threads the sum can exceed the step's wall time; the shares
are what to read. One process, no other contender: not a speed comparison.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from common import compiled_step, scratch_stage, synthetic_batch

import jax

from mbert_jax.models import build, example_inputs
from mbert_jax.distill import schedule
from mbert_jax.training import sharding
from mbert_jax.models import preset

_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="mobilebert")
  p.add_argument("--teacher", default="ib_bert_large", help="for --stage=pd or pkt:L")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--predictions", type=int, default=20)
  p.add_argument("--optimizer", choices=("adamw", "lamb"), default="lamb")
  p.add_argument("--stage", default="scratch",
                 help="scratch (MLM + NSP), pd (distillation, teacher online) or pkt:L "
                      "(progressive phase L, truncated to L layers)")
  p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
  p.add_argument("--top", type=int, default=15, help="single instructions to list")
  args = p.parse_args(argv)
  if not (args.stage in ("scratch", "pd") or re.fullmatch(r"pkt:\d+", args.stage)):
    p.error(f"--stage={args.stage!r}: one of scratch, pd, pkt:L (L a layer number)")
  return args


def build_stage(args, layers: int):
  if args.stage == "scratch":
    return scratch_stage()
  sc = schedule.default_schedule_config()
  sc.name = "pkt"
  stages = schedule.build_schedule(sc, layers)
  if args.stage == "pd":
    return stages[-1]
  layer = int(args.stage.split(":")[1])
  if not 1 <= layer <= layers:
    raise SystemExit(f"error: --stage={args.stage}: the student has layers 1..{layers}")
  return stages[layer - 1]


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: the source op XLA's metadata names}."""
  out = {}
  for line in hlo_text.splitlines():
    m = _NAME.match(line)
    if m:
      op = _OP_NAME.search(m.group(2))
      out[m.group(1)] = op.group(1) if op else ""
  return out


def phase_of(op_name: str) -> str:
  if "transpose(jvp(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "update"


def kind_of(instruction: str) -> str:
  base = re.sub(r"[.\d]+$", "", instruction)
  if base.startswith(("ynn_fusion", "dot", "onednn", "custom-call")) or "convolution" in base:
    return "matmul"
  if "dynamic-update-slice" in base or "dynamic-slice" in base or base.startswith("slice"):
    return "slice/update-slice"
  if "copy" in base or "transpose" in base:
    return "copy/transpose"
  if base.startswith("wrapped_broadcast") or base == "broadcast":
    return "broadcast"
  return "elementwise/reduce"


def op_times(trace_dir: str, steps: int) -> dict[str, tuple[float, int]]:
  """{instruction: (microseconds per step, executions per step)} from the Perfetto trace."""
  files = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise SystemExit(f"error: the profiler wrote no Perfetto trace under {trace_dir}")
  with gzip.open(files[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      total[e["name"]] += e["dur"]
      count[e["name"]] += 1
  return {n: (total[n] / steps, count[n] / steps) for n in total}


def main(argv=None):
  args = parse_args(argv)
  cfg = preset(args.preset, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  batch = synthetic_batch(cfg.vocab_size, args.batch, args.seq, args.predictions)
  stage = build_stage(args, cfg.num_hidden_layers)
  t_cfg = t_params = None
  if stage.needs_teacher:
    t_cfg = preset(args.teacher)
    t_params, _ = sharding.init_params(build(t_cfg), example_inputs(t_cfg), 1, mesh, sharding.DEFAULT_RULES)
  fn, state, gbatch, _ = compiled_step(cfg, stage, mesh, batch, teacher_cfg=t_cfg,
                                       teacher_params=t_params, optimizer=args.optimizer)
  names = hlo_op_names(fn.lower(state, t_params, gbatch).compile().as_text())
  for _ in range(2):
    state, out = fn(state, t_params, gbatch)
    jax.block_until_ready(out)
  with tempfile.TemporaryDirectory() as trace_dir:
    t = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, out = fn(state, t_params, gbatch)
        jax.block_until_ready(out)
    wall = (time.perf_counter() - t) / args.steps
    times = op_times(trace_dir, args.steps)

  ops = {n: v for n, v in times.items() if n in names}  # HLO instructions only
  summed = sum(us for us, _ in ops.values())
  by_phase, by_kind, cells = (collections.Counter() for _ in range(3))
  for n, (us, _) in ops.items():
    phase, kind = phase_of(names[n]), kind_of(n)
    by_phase[phase] += us
    by_kind[kind] += us
    cells[(phase, kind)] += us
  print(f"{args.preset} train step, stage {stage.name}, batch {args.batch} x {args.seq}, "
        f"{args.predictions} predictions, {args.optimizer}, {jax.devices()[0].device_kind} "
        f"({os.cpu_count()} cores); {args.steps} profiled steps")
  print(f"wall {wall * 1e3:.1f} ms/step (under the profiler); op time summed "
        f"{summed / 1e3:.1f} ms/step over {len(ops)} instructions\n")
  kinds = ["matmul", "elementwise/reduce", "copy/transpose", "slice/update-slice", "broadcast"]
  head = f"{'phase':<10}" + "".join(f"{k:>20}" for k in kinds) + f"{'total':>10}"
  print(head)
  print("-" * len(head))
  for phase in ("forward", "backward", "update"):
    row = "".join(f"{100 * cells[(phase, k)] / summed:>19.1f}%" for k in kinds)
    print(f"{phase:<10}{row}{100 * by_phase[phase] / summed:>9.1f}%")
  print(f"{'total':<10}" + "".join(f"{100 * by_kind[k] / summed:>19.1f}%" for k in kinds))
  print(f"\ntop {args.top} instructions (ms/step, runs/step, source op):")
  for n, (us, runs) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:args.top]:
    print(f"  {us / 1e3:8.1f}  {runs:5.0f}  {n:<34} {names[n][:90]}")
  print(json.dumps({"benchmark": "step_profile", "preset": args.preset, "stage": stage.name,
                    "batch": args.batch, "seq": args.seq, "optimizer": args.optimizer,
                    "wall_s": wall, "op_time_s": summed / 1e6,
                    "share_by_phase": {k: v / summed for k, v in by_phase.items()},
                    "share_by_kind": {k: v / summed for k, v in by_kind.items()}}))


if __name__ == "__main__":
  main()
