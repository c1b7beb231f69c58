"""The matmul kernels under each framework, at the shapes of the MobileBERT step: XLA:CPU vs torch.

    python benchmarks/matmul_kernels.py [--tokens=1024] [--rounds=5] [--xla_flags=...]

The train-step comparison (benchmarks/train_step_vs_torch.py) runs the same arithmetic in both
frameworks, so its ratio is bounded by how fast each one's matmul library is at the model's
shapes. This times a lone fp32 matmul per shape, jitted in JAX and `a @ b` in torch (every core
for both), in alternating rounds, and prints GFLOP/s and torch's speed-up. Shapes: the
bottleneck, attention and FFN projections of MobileBERT at `tokens` rows (batch 8 x 128 = 1024),
the MLM head on 160 gathered rows against the 30,522-word table, and a 2048^3 reference.
`--xla_flags` sets XLA_FLAGS for this process (e.g. to try XLA:CPU's other dot emitters).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tokens", type=int, default=1024, help="rows of the per-token projections")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--xla_flags", default=None, help="XLA_FLAGS for this run (default: as set)")
  p.add_argument("--pause", type=float, default=0.2,
                 help="seconds between contenders (untimed), so idle spinning threads sleep")
  args = p.parse_args(argv)
  if args.tokens < 1 or args.rounds < 1:
    p.error("--tokens and --rounds must be at least 1")
  return args


def shapes(tokens: int) -> list[tuple[str, int, int, int]]:
  return [("bottleneck in 512->128", tokens, 512, 128),
          ("attention q/k 128->128", tokens, 128, 128),
          ("value 512->128", tokens, 512, 128),
          ("FFN up 128->512", tokens, 128, 512),
          ("FFN down 512->128", tokens, 512, 128),
          ("bottleneck out 128->512", tokens, 128, 512),
          ("MLM head 160 x 512->30522", 160, 512, 30522),
          ("reference 2048^3", 2048, 2048, 2048)]


def main(argv=None):
  args = parse_args(argv)
  if args.xla_flags is not None:
    os.environ["XLA_FLAGS"] = args.xla_flags  # before jax is imported
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  cores = os.cpu_count() or 1
  torch.set_num_threads(cores)
  matmul = jax.jit(jnp.matmul)
  rows = []
  for name, m, k, n in shapes(args.tokens):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    matmul(ja, jb).block_until_ready()
    _ = ta @ tb
    flops = 2 * m * k * n
    reps = max(3, int(3e10 / flops))  # ~0.1 s of work per timing

    def run_xla():
      out = None
      for _ in range(reps):
        out = matmul(ja, jb)
      out.block_until_ready()

    def run_torch():
      for _ in range(reps):
        _ = ta @ tb

    times = {"xla": [], "torch": []}
    for _ in range(args.rounds):  # alternate: a busy machine hurts both alike
      for key, fn in (("xla", run_xla), ("torch", run_torch)):
        # OpenMP's idle threads spin for a while after torch's last op and would steal the
        # cores from the next contender's first matmuls: let them go to sleep first.
        time.sleep(args.pause)
        t = time.perf_counter()
        fn()
        times[key].append((time.perf_counter() - t) / reps)
    xla, tor = statistics.median(times["xla"]), statistics.median(times["torch"])
    rows.append({"shape": name, "m": m, "k": k, "n": n, "xla_gflop_s": flops / xla / 1e9,
                 "torch_gflop_s": flops / tor / 1e9, "torch_speedup": xla / tor})

  print(f"fp32 matmul, {cores} cores: jax {jax.__version__} (XLA:CPU, XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}) vs torch {torch.__version__}; median of "
        f"{args.rounds} alternating rounds\n")
  print(f"{'shape':<28}{'m x k x n':>20}{'XLA GFLOP/s':>13}{'torch GFLOP/s':>15}{'torch/XLA':>11}")
  for r in rows:
    dims = f"{r['m']}x{r['k']}x{r['n']}"
    print(f"{r['shape']:<28}{dims:>20}{r['xla_gflop_s']:>13.1f}{r['torch_gflop_s']:>15.1f}"
          f"{r['torch_speedup']:>10.2f}x")
  print(json.dumps({"benchmark": "matmul_kernels", "cores": cores, "tokens": args.tokens,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}))
  return rows


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
