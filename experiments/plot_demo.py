"""Plots the demo's evidence: each layer's feature-map loss during its PKT phase, and held-out
MLM accuracy of the distilled student vs the scratch baseline (and the teacher).

    python experiments/plot_demo.py --workdir=runs/demo --out=docs/demo.png
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--out", default="docs/demo.png")
  a = p.parse_args()
  student, scratch, teacher = (rows(os.path.join(a.workdir, n)) for n in ("student", "scratch", "teacher"))
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
  layers = sorted({k.split("/layer_")[1] for r in student for k in r if k.startswith("fmt_loss/layer_")})
  for layer in layers:
    key = f"fmt_loss/layer_{layer}"
    pts = [(r["step"], r[key]) for r in student if key in r]
    ax1.plot(*zip(*pts), label=f"layer {int(layer)}")
  ax1.set_yscale("log")
  ax1.set_xlabel("student step (PKT phases)")
  ax1.set_ylabel("feature-map transfer loss (LN0 MSE)")
  ax1.set_title("each layer's FMT loss during its phase")
  ax1.legend()
  for name, rs, style in (("distilled (pkt + PD)", student, "-o"), ("scratch", scratch, "-s")):
    pts = [(r["step"], r["eval/mlm_accuracy"]) for r in rs if "eval/mlm_accuracy" in r]
    ax2.plot(*zip(*pts), style, label=name)
  t_acc = [r["eval/mlm_accuracy"] for r in teacher if "eval/mlm_accuracy" in r][-1]
  ax2.axhline(t_acc, color="gray", ls="--", label=f"teacher ({t_acc:.3f})")
  ax2.set_xlabel("student step")
  ax2.set_ylabel("held-out MLM accuracy")
  ax2.set_title("student vs scratch, same steps and data")
  ax2.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  fig.savefig(a.out, dpi=110)
  print(a.out)


if __name__ == "__main__":
  main()
