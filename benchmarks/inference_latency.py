"""Inference latency of a full-size MobileBERT classifier on CPU: ONNX Runtime int8 and fp32,
the jitted Flax model, and transformers' PyTorch model in eager mode; plus file sizes.

    python benchmarks/inference_latency.py [--preset=mobilebert] [--batch=1] [--seq=128]
        [--rounds=5] [--calls=10] [--threads=N] [--out=DIR]

One process, one set of random weights (latency does not depend on their values): the Flax
classifier's params go through `mbert_jax.interop.onnx_export` (Hugging Face model -> torch.onnx ->
fp32 .onnx; ONNX Runtime dynamic quantization -> int8 .onnx) and `onnx_export.torch_model`
(the same weights in `MobileBertForSequenceClassification`). Contenders are timed in
alternating rounds, each round in a rotated order, so that a busy shared machine hurts all of
them alike; the figure per contender is the median single-call latency over all rounds. Every
framework gets the same thread count. Outputs are cross-checked before timing.

Aims (issue): int8 at least 3x faster than PyTorch eager; int8 file at most 30% of fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="mobilebert")
  p.add_argument("--num_labels", type=int, default=2)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--calls", type=int, default=10, help="timed calls per contender per round")
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--out", default="", help="where to keep the .onnx files (default: a temp dir)")
  return p.parse_args(argv)


def make_batch(vocab: int, batch: int, seq: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  types = np.zeros((batch, seq), np.int64)
  types[:, seq // 2:] = 1
  return {"input_ids": rng.integers(5, vocab, (batch, seq)).astype(np.int64),
          "token_type_ids": types, "attention_mask": np.ones((batch, seq), np.int64)}


def flax_contender(cfg, num_labels: int, params, batch):
  import jax
  import jax.numpy as jnp

  from mbert_jax.models import build_classifier
  model = build_classifier(cfg, num_labels, 0.0)
  fn = jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m))
  dev_params = jax.device_put(params)
  args = [jnp.asarray(batch[k], jnp.int32) for k in ("input_ids", "token_type_ids",
                                                      "attention_mask")]
  return lambda: np.asarray(jax.block_until_ready(fn(dev_params, *args)))


def torch_contender(model, batch):
  import torch
  inputs = {k: torch.tensor(v) for k, v in batch.items()}

  def call():
    with torch.inference_mode():
      return model(**inputs).logits.numpy()

  return call


def onnx_contender(path: str, threads: int, batch):
  from mbert_jax.interop import onnx_export as ox
  sess = ox.session(path, threads)
  return lambda: ox.run_session(sess, batch)["logits"]


def time_rounds(contenders: dict, rounds: int, calls: int) -> dict[str, list[float]]:
  names = list(contenders)
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      fn = contenders[name]
      for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
    print(f"round {r + 1}/{rounds}: " + ", ".join(
        f"{n} {1e3 * statistics.median(times[n][-calls:]):.1f} ms" for n in names), flush=True)
  return times


def main(argv=None) -> dict:
  args = parse_args(argv)
  import flax.linen as nn
  import jax
  import torch

  from mbert_jax.interop import onnx_export as ox
  from mbert_jax.models import build_classifier, preset

  torch.set_num_threads(args.threads)
  cfg = preset(args.preset).replace(compute_dtype="float32")
  model = build_classifier(cfg, args.num_labels, 0.0)
  ids = np.zeros((1, 8), np.int32)
  params = jax.jit(lambda k: nn.unbox(model.init(k, ids, ids, ids)["params"]))(jax.random.key(0))
  params = jax.tree.map(np.asarray, params)
  batch = make_batch(cfg.vocab_size, args.batch, args.seq)

  out = args.out or tempfile.mkdtemp(prefix="mbert_latency_")
  t0 = time.perf_counter()
  info = ox.export(cfg, params, "classification", os.path.join(out, "fp32"))
  fp32 = os.path.join(out, "fp32", ox.ONNX_FILE)
  print(f"fp32 export: {time.perf_counter() - t0:.1f}s", flush=True)
  int8 = os.path.join(out, "int8.onnx")
  ops = ox.quantize_int8(fp32, int8)
  sizes = {"fp32": os.path.getsize(fp32), "int8": os.path.getsize(int8)}

  contenders = {
      "onnxruntime_int8": onnx_contender(int8, args.threads, batch),
      "onnxruntime_fp32": onnx_contender(fp32, args.threads, batch),
      "flax_jit": flax_contender(cfg, args.num_labels, params, batch),
      "torch_eager": torch_contender(ox.torch_model(cfg, params, "classification"), batch),
  }
  outputs = {n: np.asarray(fn(), np.float64) for n, fn in contenders.items()}  # warm-up too
  ref = outputs["torch_eager"]
  scale = max(float(np.abs(ref).max()), 1e-30)
  agreement = {n: float(np.abs(o - ref).max() / scale) for n, o in outputs.items()}
  for fn in contenders.values():
    fn()

  times = time_rounds(contenders, args.rounds, args.calls)
  median = {n: statistics.median(t) for n, t in times.items()}
  result = {
      "preset": args.preset, "batch": args.batch, "seq": args.seq, "threads": args.threads,
      "rounds": args.rounds, "calls_per_round": args.calls,
      "median_ms": {n: round(1e3 * v, 2) for n, v in median.items()},
      "speedup_vs_torch_eager": {n: round(median["torch_eager"] / v, 2)
                                 for n, v in median.items()},
      "int8_vs_fp32_onnx_speedup": round(median["onnxruntime_fp32"] / median["onnxruntime_int8"],
                                         2),
      "bytes": sizes, "int8_size_ratio": round(sizes["int8"] / sizes["fp32"], 3),
      "logit_error_vs_torch": agreement,
      "fp32_graph_vs_pytorch": info["fp32_vs_pytorch_max_relative_error"],
      "integer_matmuls": sum(ops[k] for k in ox.INTEGER_MATMULS),
  }
  print()
  print(f"{'contender':<18} {'median ms':>10} {'speed-up vs torch eager':>24}")
  for n in contenders:
    print(f"{n:<18} {result['median_ms'][n]:>10.2f} {result['speedup_vs_torch_eager'][n]:>23.2f}x")
  print(f"files: fp32 {sizes['fp32'] / 2**20:.1f} MiB, int8 {sizes['int8'] / 2**20:.1f} MiB "
        f"= {100 * result['int8_size_ratio']:.1f}% of fp32")
  s = result["speedup_vs_torch_eager"]["onnxruntime_int8"]
  print(f"aim int8 >= 3x torch eager: {'met' if s >= 3 else 'not met'} ({s:.2f}x); "
        f"aim int8 file <= 30%: {'met' if result['int8_size_ratio'] <= 0.30 else 'not met'}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
