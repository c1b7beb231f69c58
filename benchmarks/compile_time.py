"""Compile time of the full 24-layer MobileBERT train step, with and without scan over layers.

    python benchmarks/compile_time.py [--preset=mobilebert] [--remat]

Unrolled (`scan_layers=False`) traces and optimises every layer separately; the scanned step
compiles one layer body, so its compile time stays flat in depth.
"""

import argparse
import json
import time

from common import compiled_step, scratch_stage, synthetic_batch

import jax

from mbert_jax.training import sharding
from mbert_jax.models import preset

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="mobilebert")
parser.add_argument("--remat", action="store_true")
args = parser.parse_args()

results = {}
for scan in (True, False):
  cfg = preset(args.preset, scan_layers=scan, remat=args.remat)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  batch = synthetic_batch(cfg.vocab_size, 8, 128, 20)
  fn, state, gbatch, _ = compiled_step(cfg, scratch_stage(), mesh, batch)
  t0 = time.perf_counter()
  lowered = fn.lower(state, None, gbatch)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  results["scan" if scan else "unrolled"] = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1,
                                             "total_s": t2 - t0}
  print(f"{'scan' if scan else 'unrolled':<9} trace+lower {t1 - t0:6.1f}s  compile {t2 - t1:6.1f}s  "
        f"total {t2 - t0:6.1f}s", flush=True)
ratio = results["unrolled"]["total_s"] / results["scan"]["total_s"]
print(f"unrolled / scan = {ratio:.2f}x ({cfg.num_hidden_layers} layers, {jax.devices()[0].device_kind})")
print(json.dumps({"preset": args.preset, "remat": args.remat, **results, "ratio": ratio}))
