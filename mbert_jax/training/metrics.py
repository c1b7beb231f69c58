"""Metric writers (JSONL, TensorBoard without TensorFlow, console) and MFU.

Only process 0 writes. MFU divides analytic model FLOPs by the dense peak of the device kind
and dtype; a device kind missing from the table reports no MFU rather than a guess.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import jax

# Dense (not 2:4 sparse) peak FLOP/s per chip, by dtype family.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "TPU v2": {"bfloat16": 45e12, "float32": 45e12 / 4},
    "TPU v3": {"bfloat16": 123e12, "float32": 123e12 / 4},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 4},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12 / 4},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12 / 4},
    "TPU v6e": {"bfloat16": 918e12, "float32": 918e12 / 4},
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 19.5e12},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 19.5e12},
    "NVIDIA A100 80GB PCIe": {"bfloat16": 312e12, "float32": 19.5e12},
    "NVIDIA L4": {"bfloat16": 121e12, "float32": 30e12},
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  family = "bfloat16" if dtype in ("bfloat16", "float16") else "float32"
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind][family]
  for kind, peaks in PEAK_FLOPS.items():  # e.g. "NVIDIA H100 80GB HBM3e" variants
    if device_kind.startswith(kind):
      return peaks[family]
  return None


def mfu(flops_per_step: float, step_seconds: float, dtype: str) -> float | None:
  devices = jax.devices()
  peak = peak_flops(devices[0].device_kind, dtype)
  if peak is None or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / (len(devices) * peak)


def _scalar(v: Any) -> float:
  return float(v)


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard event files (process 0)."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.warning("tensorboardX not installed: TensorBoard events are not written")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      if v is None:
        continue
      f = _scalar(v)
      row[k] = f if math.isfinite(f) else str(f)
      if self._tb is not None and math.isfinite(f):
        self._tb.add_scalar(k, f, int(step))
    self._jsonl.write(json.dumps(row) + "\n")

  def write_text(self, tag: str, text: str, step: int = 0) -> None:
    if self._tb is not None:
      self._tb.add_text(tag, text, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


class Progress:
  """Console progress: a tqdm bar with loss, steps/s and ETA (process 0 only)."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.enabled = enabled
    self.bar = None
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step",
                      file=sys.stderr, disable=not enabled, mininterval=1.0)

  def update(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
    if self.bar is None:
      return
    self.bar.n = step
    if postfix:
      self.bar.set_postfix(
          {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
          refresh=False)
    self.bar.refresh()

  def write(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text)
    elif self.enabled:
      print(text, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class ThroughputWindow:
  """Steps and wall time between log points (started after the stage's step has compiled)."""

  def __init__(self):
    self.t = time.perf_counter()
    self.steps = 0

  def count(self, steps: int) -> None:
    self.steps += steps

  def rates(self, global_batch: int, flops_per_example: float | None,
            dtype: str) -> dict[str, float]:
    """Steps/s, examples/s and MFU since the last call (none while only compiling)."""
    now = time.perf_counter()
    dt, steps = now - self.t, self.steps
    self.t, self.steps = now, 0
    if steps == 0 or dt <= 0:
      return {}
    out = {"steps_per_second": steps / dt, "examples_per_second": steps * global_batch / dt}
    if flops_per_example:
      m = mfu(flops_per_example * global_batch * steps, dt, dtype)
      if m is not None:
        out["mfu"] = m
    return out


def warn_if_no_mfu(dtype: str, say) -> None:
  """Say that an accelerator of unknown peak gets no MFU. A CPU never has one (its peak
  depends on the cores, vector units and threads the run gets), so nothing is said there."""
  device = jax.devices()[0]
  kind = device.device_kind
  if say is not None and device.platform != "cpu" and peak_flops(kind, dtype) is None:
    say(f"MFU not reported: no peak FLOP/s known for device kind {kind!r} "
        "(add it to mbert_jax.training.metrics.PEAK_FLOPS)")


def json_safe(scalars: Mapping[str, float]) -> dict[str, Any]:
  """Non-finite floats as strings: JSON has no NaN or infinity."""
  return {k: v if not isinstance(v, float) or math.isfinite(v) else str(v)
          for k, v in scalars.items()}
