"""The machine a plan is for: a TPU topology compiled for from any host, or this host's devices.

    target = resolve("v5e:16x16")   # 256 compile-only devices, XLA's TPU compiler (libtpu)
    target = resolve("local")       # jax.devices() of this machine

Topology names are libtpu's (`<generation>:<chips per dimension>`); XLA's TPU compiler ships in
the `libtpu` wheel (`pip install -e ".[tpu]"`) and builds the same program, with the same
memory plan, as the pod would run, on a host without TPUs. The figures a projection divides by
are per device, from the per-chip table below (a v3 chip is two devices: libtpu exposes each
TensorCore; v4 and v5p chips are one megacore device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import re
from typing import Any

import jax
from jax.experimental import topologies

from mbert_jax.training import metrics

TPU_EXTRA = 'pip install -e ".[tpu]"'


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: what a projection divides by. Peaks come from
  `training.metrics.PEAK_FLOPS` (dense bf16, per chip) under `peak_kind`."""
  peak_kind: str
  devices_per_chip: int
  hbm_bytes: float            # per chip, as specified
  hbm_bytes_per_s: float      # per chip
  link_bytes_per_s: float     # per chip, what one all-reduce can use (see the table)
  usable_bytes: float | None  # per device, what the compiler may allocate; None: hbm / devices


GIB = 2**30
# Per chip. Sources: cloud.google.com/tpu/docs/{v3,v4,v5e,v5p,v6e} (peak bf16, HBM capacity and
# bandwidth, ICI / all-reduce bandwidth). Interconnect: the page's "all-reduce bandwidth per Pod"
# divided by the Pod's chips (v3 340 TB/s / 1024, v4 1.1 PB/s / 4096, v5e 51.2 TB/s / 256, v6e
# 102.4 TB/s / 256); v5p gives no all-reduce figure, so half its bidirectional ICI bandwidth
# (1200 GB/s), the ratio v5e and v6e show between the two. `usable_bytes`: the HBM XLA:TPU lets
# one device's program allocate, as its out-of-memory message states it in GiB (libtpu 0.0.42:
# "exceeds available HBM (15.48G)" for a v3 core, 30.75G v4, 15.75G v5e, 95.74G v5p, 31.25G v6e;
# above the pages' "16 GB" and "32 GB", which are GiB).
TPU_CHIPS: dict[str, Chip] = {
    "v3": Chip("TPU v3", 2, 32 * GIB, 900e9, 340e12 / 1024, 15.48 * GIB),
    "v4": Chip("TPU v4", 1, 32 * GIB, 1200e9, 1.1e15 / 4096, 30.75 * GIB),
    "v5e": Chip("TPU v5e", 1, 16 * GIB, 819e9, 51.2e12 / 256, 15.75 * GIB),
    "v5p": Chip("TPU v5p", 1, 95 * GIB, 2765e9, 1200e9 / 2, 95.74 * GIB),
    "v6e": Chip("TPU v6e", 1, 32 * GIB, 1638e9, 102.4e12 / 256, 31.25 * GIB),
}
# libtpu's own spelling of each generation, and the chip configuration that makes one device
# per chip where a chip has two TensorCores (megacore; v3 has none).
_LIBTPU = {"v3": ("v3", {}), "v4": ("v4", {"chip_config_name": "megacore"}),
           "v5e": ("v5e", {}), "v5p": ("v5p", {"chip_config_name": "megacore"}),
           "v6e": ("v6e", {})}
_DIMS = {"v3": 2, "v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
# The TPU VM type each topology is sold as: only to name it to libtpu, which otherwise probes a
# metadata server that a host without TPUs does not have.
_ACCELERATOR_TYPE = {"v3": "v3-{cores}", "v4": "v4-{cores}", "v5e": "v5litepod-{chips}",
                     "v5p": "v5p-{cores}", "v6e": "v6e-{chips}"}
# GPUs for `local`, per device. Sources: NVIDIA's H100, H200 and A100 datasheets (SXM: HBM
# bandwidth; NVLink per direction = half the bidirectional figure, 900 GB/s H100/H200,
# 600 GB/s A100). Capacity comes from the device itself where it reports it.
GPU_CHIPS: dict[str, Chip] = {
    "NVIDIA H200": Chip("NVIDIA H200", 1, 141e9, 4.8e12, 450e9, None),
    "NVIDIA H100": Chip("NVIDIA H100", 1, 80e9, 3.35e12, 450e9, None),
    "NVIDIA A100-SXM4-80GB": Chip("NVIDIA A100-SXM4-80GB", 1, 80e9, 2.039e12, 300e9, None),
    "NVIDIA A100-SXM4-40GB": Chip("NVIDIA A100-SXM4-40GB", 1, 40e9, 1.555e12, 300e9, None),
}
# What jax calls one device of each generation (compile-only devices and real ones alike).
TPU_DEVICE_KINDS = {"TPU v3": "v3", "TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p",
                    "TPU v6 lite": "v6e"}
_TOPOLOGY = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)*)$")


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices a plan compiles for and the per-device figures its projections use."""
  name: str
  devices: tuple[Any, ...]
  device_kind: str
  chips: int
  memory_bytes: float | None       # what one device's program may hold; None: unknown
  peak_flops: float | None         # dense bf16 FLOP/s per device
  hbm_bytes_per_s: float | None
  link_bytes_per_s: float | None
  compile_only: bool               # True: a named topology, nothing can run

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def has_libtpu() -> bool:
  try:
    importlib.import_module("libtpu")  # the wheel that ships XLA's TPU compiler
  except ImportError:
    return False
  return True


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """`v5e:16x16` -> ('v5e', (16, 16)); a one-line ValueError for anything else."""
  m = _TOPOLOGY.match(name.strip())
  known = ", ".join(TPU_CHIPS)
  if not m or m.group(1) not in TPU_CHIPS:
    raise ValueError(f"unknown topology {name!r}: give <generation>:<chips per dimension> with "
                     f"generation one of {known} (e.g. v5e:16x16, v5p:4x4x8), or local")
  gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if len(dims) != _DIMS[gen] or min(dims) < 1:
    example = "x".join(["2"] * _DIMS[gen])
    raise ValueError(f"topology {name!r}: {gen} chips form a {_DIMS[gen]}-D grid "
                     f"(e.g. {gen}:{example})")
  return gen, dims


def parse_target_name(name: str) -> str:
  """`local`, or a checked topology name; a one-line ValueError for anything else."""
  if name.strip() == "local":
    return "local"
  parse_topology(name)
  return name.strip()


@contextlib.contextmanager
def _quiet_libtpu(gen: str, chips: int):
  """Environment for loading libtpu on a host without TPUs, set while it loads and restored
  after: no metadata server to ask, and no exclusive lock on TPU chips that are not there
  (another process may hold libtpu too, e.g. a test run). Restored because these variables
  name a TPU host to everything started later from this process (`TPU_WORKER_HOSTNAMES` makes
  a child look like a pod worker to `jax.distributed`)."""
  devices = chips * TPU_CHIPS[gen].devices_per_chip
  cores = chips * 2 if gen in ("v3", "v4", "v5p") else devices
  wanted = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
            "TPU_ACCELERATOR_TYPE": _ACCELERATOR_TYPE[gen].format(cores=cores, chips=chips),
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  saved = {k: os.environ.get(k) for k in wanted}
  for k, v in wanted.items():
    os.environ.setdefault(k, v)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def tpu_target(name: str) -> Target:
  gen, dims = parse_topology(name)
  if not has_libtpu():
    raise ValueError(f"--topology={name} compiles with XLA's TPU compiler, which the libtpu "
                     f"wheel ships: {TPU_EXTRA}")
  chips = math.prod(dims)
  spelled, kwargs = _LIBTPU[gen]
  host = (2, 2, 1)  # chips per host of every generation here (a 4-chip VM)
  if any(d % h for d, h in zip(dims + (1,) * (3 - len(dims)), host)):
    # A slice smaller than one host (v5e:1x1, a single-chip VM) is one host of its own size.
    kwargs = {**kwargs, "chips_per_host_bounds": tuple(dims) + (1,) * (3 - len(dims))}
  try:
    with _quiet_libtpu(gen, chips):
      devices = topologies.get_topology_desc(f"{spelled}:{'x'.join(map(str, dims))}", "tpu",
                                             **kwargs).devices
  except Exception as e:  # libtpu's refusals come as runtime errors of several types
    raise ValueError(f"topology {name!r}: libtpu refused it ({' '.join(str(e).split())[:300]})"
                     ) from e
  chip = TPU_CHIPS[gen]
  per = chip.devices_per_chip
  return Target(name=name, devices=tuple(devices), device_kind=devices[0].device_kind,
                chips=chips, memory_bytes=chip.usable_bytes or chip.hbm_bytes / per,
                peak_flops=metrics.peak_flops(chip.peak_kind, "bfloat16") / per,
                hbm_bytes_per_s=chip.hbm_bytes_per_s / per,
                link_bytes_per_s=chip.link_bytes_per_s / per, compile_only=True)


def _local_chip(kind: str) -> Chip | None:
  for name, chip in GPU_CHIPS.items():
    if kind.startswith(name):
      return chip
  gen = TPU_DEVICE_KINDS.get(kind)
  return TPU_CHIPS[gen] if gen else None


def local_target() -> Target:
  """This machine's devices. Peaks and bandwidths only for the device kinds of the tables: a
  CPU gets no projected time, and no memory limit."""
  devices = tuple(jax.devices())
  kind = devices[0].device_kind
  chip = _local_chip(kind) if devices[0].platform != "cpu" else None
  try:
    memory = float(devices[0].memory_stats()["bytes_limit"])
  except Exception:  # CPUs and some runtimes report no memory statistics
    memory = None
  if chip is None:
    return Target("local", devices, kind, len(devices), memory, None, None, None, False)
  per = chip.devices_per_chip
  return Target("local", devices, kind, max(len(devices) // per, 1),
                memory if memory is not None else (chip.usable_bytes or chip.hbm_bytes / per),
                metrics.peak_flops(chip.peak_kind, "bfloat16") / per, chip.hbm_bytes_per_s / per,
                chip.link_bytes_per_s / per, False)


def resolve(name: str) -> Target:
  """`local` or a TPU topology name; ValueError (one line) for anything else."""
  if parse_target_name(name) == "local":
    return local_target()
  return tpu_target(name.strip())
