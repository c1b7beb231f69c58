"""Export a run's checkpoint for other tools.

    python -m mbert_jax.export --workdir=<run dir> --format=hf --out=<dir> [--step=N]
    python -m mbert_jax.export --workdir=<run dir> --format=flax --out=<dir>

`hf`: a Hugging Face directory (config.json, model.safetensors, tokenizer files) that
`transformers` loads as `MobileBertForPreTraining` and `AutoModel`. A model Hugging Face cannot
represent (the IB-BERT teacher) is refused with the reason. `flax`: `model_config.json` +
`params.safetensors` (flattened '/' keys) + tokenizer files, read back by `load_flax`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from mbert_jax.models import ModelConfig


def load_run(workdir: str, step: int | None = None) -> tuple[ModelConfig, Any, int]:
  """Model config and params (numpy) of an mbert-jax run's checkpoint (latest good by default)."""
  from mbert_jax import checkpoint as ckpt_lib
  cfg_path = os.path.join(workdir, "model_config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{workdir} is not an mbert-jax run directory (no model_config.json)")
  with open(cfg_path) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  from mbert_jax import sharding
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  _, abstract, shardings = sharding.abstract_params(cfg, mesh, sharding.DEFAULT_RULES)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  params, at = ckpt_lib.restore_params_only(os.path.join(workdir, "checkpoints"), target, step)
  return cfg, jax.tree.map(np.asarray, params), at


def tokenizer_dir_of(workdir: str) -> str | None:
  d = os.path.join(workdir, "tokenizer")
  return d if os.path.isdir(d) else None


def save_flax(cfg: ModelConfig, params: Any, out: str, tokenizer_dir: str | None = None) -> None:
  from safetensors.numpy import save_file
  os.makedirs(out, exist_ok=True)
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in
          traverse_util.flatten_dict(params, sep="/").items()}
  save_file(flat, os.path.join(out, "params.safetensors"))
  with open(os.path.join(out, "model_config.json"), "w") as f:
    json.dump(cfg.to_dict(), f, indent=1)
  _copy_tokenizer(tokenizer_dir, out)


def load_flax(path: str) -> tuple[ModelConfig, Any]:
  """Reads a `--format=flax` export: (ModelConfig, params as a nested dict of numpy arrays)."""
  from safetensors.numpy import load_file
  with open(os.path.join(path, "model_config.json")) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  flat = load_file(os.path.join(path, "params.safetensors"))
  return cfg, traverse_util.unflatten_dict(flat, sep="/")


def _copy_tokenizer(tokenizer_dir: str | None, out: str) -> None:
  if not tokenizer_dir:
    return
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    src = os.path.join(tokenizer_dir, name)
    if os.path.exists(src):
      shutil.copy(src, os.path.join(out, name))


def export(workdir: str, fmt: str, out: str, step: int | None = None) -> dict[str, Any]:
  if fmt not in ("hf", "flax"):
    raise ValueError(f"--format={fmt!r}: choose hf or flax")
  cfg, params, at = load_run(workdir, step)
  tok = tokenizer_dir_of(workdir)
  if fmt == "hf":
    from mbert_jax import hf
    cfg = cfg.replace(compute_dtype="float32")
    hf.save(cfg, params, out, tokenizer_dir=tok)
  else:
    save_flax(cfg, params, out, tokenizer_dir=tok)
  return {"workdir": workdir, "step": at, "format": fmt, "out": os.path.abspath(out)}


def main(argv=None):
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "an mbert-jax run directory")
  flags.DEFINE_enum("format", "hf", ["hf", "flax"], "hf: Hugging Face directory; flax: params + config")
  flags.DEFINE_string("out", None, "output directory")
  flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
  flags.mark_flags_as_required(["workdir", "out"])
  FLAGS = flags.FLAGS

  def run(_):
    import sys
    try:
      info = export(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.step)
    except (ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(json.dumps(info))

  app.run(run, argv)


if __name__ == "__main__":
  main()
