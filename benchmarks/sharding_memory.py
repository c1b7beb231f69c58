"""Per-device bytes of params + optimizer state: fsdp over 8 (fake CPU) devices vs 1 device.

    python benchmarks/sharding_memory.py [--preset=mobilebert] [--devices=8]

Counts the bytes each device holds from the state's shardings, and reads the compiled train
step's memory analysis (arguments, outputs, temporaries) for both layouts, side by side.
Target: sharded <= 1.15/8 of the unsharded figure.
"""

import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="mobilebert")
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--seq", type=int, default=128)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={args.devices}")

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import compiled_step, scratch_stage, synthetic_batch  # noqa: E402

from mbert_jax.training import sharding  # noqa: E402
from mbert_jax.models import preset  # noqa: E402


def state_bytes_per_device(state, st_sh) -> int:
  total = 0
  for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(st_sh)):
    total += int(np.prod(sh.shard_shape(leaf.shape))) * leaf.dtype.itemsize
  return total


def measure(mesh_cfg, devices):
  cfg = preset(args.preset)
  mesh = sharding.make_mesh(mesh_cfg, devices=devices)
  batch = synthetic_batch(cfg.vocab_size, args.batch, args.seq, 20)
  fn, state, gbatch, st_sh = compiled_step(cfg, scratch_stage(), mesh, batch)
  compiled = fn.lower(state, None, gbatch).compile()
  mem = compiled.memory_analysis()
  return {
      "state_bytes_per_device": state_bytes_per_device(state, st_sh),
      "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
      "output_bytes": getattr(mem, "output_size_in_bytes", None),
      "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
  }


devs = jax.devices()
one = measure({"data": 1, "fsdp": 1, "tensor": 1}, devs[:1])
fsdp = measure({"data": 1, "fsdp": args.devices, "tensor": 1}, devs[:args.devices])
ratio = fsdp["state_bytes_per_device"] / one["state_bytes_per_device"]
print(f"model {args.preset}, LAMB state (params + 2 moments), batch {args.batch}x{args.seq}")
print(f"{'':<28}{'1 device':>16}{f'fsdp={args.devices}':>16}")
for k in one:
  a, b = one[k], fsdp[k]
  fmt = lambda v: "n/a" if v is None else f"{v / 2**20:,.1f} MiB"
  print(f"{k:<28}{fmt(a):>16}{fmt(b):>16}")
print(f"state per device, sharded / unsharded = {ratio:.4f} "
      f"(ideal 1/{args.devices} = {1 / args.devices:.4f}; target <= {1.15 / args.devices:.4f})")
print(json.dumps({"preset": args.preset, "devices": args.devices, "unsharded": one,
                  "fsdp": fsdp, "ratio": ratio, "target": 1.15 / args.devices}))
