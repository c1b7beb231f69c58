"""Hugging Face import: MobileBERT, BERT-family, ModernBERT and EuroBERT encoder directories as
a config and a Flax parameter tree.

    cfg, params = load("path/to/hf_dir")          # MobileBert*/Bert* (pre-training or bare),
                                                   # ModernBert*/EuroBert* (MLM or bare)
    imported = import_model("path/to/hf_dir")      # the same, plus layout and which heads are real

A ModernBERT or EuroBERT directory gives a `ModernConfig` (built by
`mbert_jax.models.modern.build_modern`), the others a `ModelConfig`. ModernBERT's fused
`Wqkv` and `Wi` keep their parts on an axis of their own ([H, 3, heads*head_dim], [H, 2, I]),
and the attention norm its layer 0 lacks is stored as the identity (the model bypasses it).

Import keeps Hugging Face semantics: `hidden_act="gelu"` stays the exact erf form, and a
MobileBERT import sets `hf_layer_norm_eps_quirk` because Hugging Face builds the embedding
LayerNorm and the LayerNorm after the final FFN (`MobileBertOutput.LayerNorm`) without `eps`,
i.e. with torch's 1e-5 instead of `layer_norm_eps`. BERT passes `layer_norm_eps` to every
LayerNorm, so a BERT import keeps the quirk off.

Reading safetensors needs only numpy (torch is optional); `pytorch_model.bin` needs torch.
Which tensor goes where is the table of `hf_names`, shared with the export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

from mbert_jax.interop.hf_names import (CONFIG_NAME, FAMILIES, SAFETENSORS_INDEX_NAME,
                                        SAFETENSORS_NAME, SENTENCE_TRANSFORMERS_MODULES,
                                        SUPPORTED_MODEL_TYPES, TORCH_INDEX_NAME, TORCH_NAME,
                                        entries, is_head, layout_name, placeholders, tied_keys)
from mbert_jax.models import build
from mbert_jax.models import modern_config
from mbert_jax.models.config import ModelConfig, from_hf_config
from mbert_jax.models.modern import build_modern
from mbert_jax.models.modern_config import ModernConfig
from mbert_jax.models.summary import param_shapes

# Non-persistent buffers that old checkpoints still contain; they hold no learned state.
_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
# Seed for heads a headless checkpoint lacks: fixed so two imports of one directory agree.
FRESH_INIT_SEED = 0


# ---------------------------------------------------------------------------- reading
def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(str(path))
  except TypeError:
    # numpy has no bfloat16/float8: read those through ml_dtypes (shipped with jax) instead.
    return _read_safetensors_raw(path)


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
  """The safetensors layout: u64 header length, JSON header, one flat little-endian buffer."""
  import ml_dtypes
  data = path.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  base = 8 + n
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    name = _ST_DTYPES.get(info["dtype"])
    if name is None:
      raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)
    start, end = info["data_offsets"]
    out[key] = np.frombuffer(data[base + start:base + end], dtype=dtype).reshape(info["shape"])
  return out


def _read_torch(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"{path} is a PyTorch checkpoint and reading it needs torch (pip install "
        "'mbert-jax[hf]'); a model.safetensors needs only numpy") from e
  sd = torch.load(str(path), map_location="cpu", weights_only=True)
  out = {}
  for k, v in sd.items():
    v = v.detach()
    # numpy has no bfloat16; float32 holds bf16/fp16 exactly.
    if v.dtype in (torch.bfloat16, torch.float16):
      v = v.to(torch.float32)
    out[k] = v.numpy()
  return out


def _read_state_dict(d: Path) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of a directory (single file or sharded with an index) and the file read."""
  for single, index, reader in ((SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, _read_safetensors),
                                (TORCH_NAME, TORCH_INDEX_NAME, _read_torch)):
    if (d / single).is_file():
      return reader(d / single), single
    if (d / index).is_file():
      shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
      sd: dict[str, np.ndarray] = {}
      for shard in shards:
        sd.update(reader(d / shard))
      return sd, index
  others = [f for f in ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
            if (d / f).is_file()]
  hint = (f" (found {', '.join(others)}: convert it to PyTorch/safetensors with transformers "
          "first)") if others else ""
  raise FileNotFoundError(
      f"{d}: no weights found; expected one of {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
      f"{TORCH_NAME}, {TORCH_INDEX_NAME}{hint}")


def _tensor_names(d: Path) -> list[str]:
  """The tensor names of a directory's weights, from the file header or index where there is
  one (a single pytorch_model.bin has to be read whole)."""
  if (d / SAFETENSORS_NAME).is_file():
    with open(d / SAFETENSORS_NAME, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      return [k for k in json.loads(f.read(n)) if k != "__metadata__"]
  index = d / SAFETENSORS_INDEX_NAME
  if not index.is_file() and not (d / TORCH_NAME).is_file():
    index = d / TORCH_INDEX_NAME
  if index.is_file():
    return list(json.loads(index.read_text())["weight_map"])
  return list(_read_state_dict(d)[0])


def _canonical(key: str) -> str:
  # Checkpoints converted from TF by old transformers versions name LayerNorm gamma/beta.
  if key.endswith("LayerNorm.gamma"):
    return key[:-len("gamma")] + "weight"
  if key.endswith("LayerNorm.beta"):
    return key[:-len("beta")] + "bias"
  return key


# ---------------------------------------------------------------------------- the config
def _hf_config_checks(d: Mapping[str, Any], where: Path) -> None:
  if d.get("model_type") == "bert":
    pet = d.get("position_embedding_type", "absolute")
    if pet != "absolute":
      raise ValueError(f"{where}: position_embedding_type={pet!r} is not supported (only "
                       "absolute learned positions, as in BERT and MobileBERT)")
    if d.get("is_decoder") or d.get("add_cross_attention"):
      raise ValueError(f"{where}: a BERT decoder (is_decoder/add_cross_attention) is not "
                       "supported; only bidirectional encoders")


def _infer_model_type(hf_cfg: Mapping[str, Any], tensor_names: Callable[[], Iterable[str]],
                      where: Path) -> str:
  """Old BERT config.json files predate `model_type`: go by architectures, then key names."""
  for arch in hf_cfg.get("architectures") or ():
    for model_type, family in FAMILIES.items():
      if arch.startswith(family.classes):
        return model_type
  names = list(tensor_names())
  if any(k.startswith("mobilebert.") or ".bottleneck." in k for k in names):
    return "mobilebert"
  if any(k.startswith("bert.") for k in names) or "embedding_size" not in hf_cfg:
    return "bert"
  raise ValueError(f"{where}: no model_type, and neither architectures nor tensor names tell "
                   "MobileBERT from BERT")


def model_dir(d: Path) -> Path:
  """`d`, or the Transformer module's folder of a sentence-transformers directory whose
  encoder lives in a sub-folder (older packages: `0_BERT/`, `0_Transformer/`)."""
  if (d / CONFIG_NAME).is_file() or not (d / SENTENCE_TRANSFORMERS_MODULES).is_file():
    return d
  modules = json.loads((d / SENTENCE_TRANSFORMERS_MODULES).read_text())
  for module in modules:
    kind = str(module.get("type", ""))
    if kind.endswith((".Transformer", ".BERT")):
      sub = d / module.get("path", "")
      if (sub / CONFIG_NAME).is_file():
        return sub
  raise FileNotFoundError(f"{d}: a sentence-transformers directory, but no Transformer/BERT "
                          f"module in {SENTENCE_TRANSFORMERS_MODULES} has a {CONFIG_NAME}")


def read_config(d: Path, tensor_names: Callable[[], Iterable[str]] | None = None
                ) -> tuple[ModelConfig | ModernConfig, str]:
  """The validated config of the model directory `d` (see `model_dir`) and its family, a key
  of `hf_names.FAMILIES` ('bert', 'mobilebert': a ModelConfig; 'modernbert', 'eurobert': a
  ModernConfig). A config.json without `model_type` is told apart by `architectures`, else by
  the tensor names (`tensor_names()`; by default read from the weights' header)."""
  where = d / CONFIG_NAME
  hf_cfg = json.loads(where.read_text())
  if "model_type" not in hf_cfg:
    names = tensor_names or (lambda: _tensor_names(d))
    hf_cfg["model_type"] = _infer_model_type(hf_cfg, names, where)
  model_type = hf_cfg["model_type"]
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported model "
                     f"types: {', '.join(SUPPORTED_MODEL_TYPES)}")
  _hf_config_checks(hf_cfg, where)
  try:
    if model_type in modern_config.FAMILIES:
      cfg = modern_config.from_hf_config(hf_cfg)
    else:
      cfg = from_hf_config(hf_cfg)
    cfg = cfg.validate()
  except ValueError as e:  # name the file
    raise ValueError(f"{where}: {e}") from e
  return cfg, model_type


def _build(cfg: ModelConfig | ModernConfig):
  return build_modern(cfg) if isinstance(cfg, ModernConfig) else build(cfg)


# ---------------------------------------------------------------------------- import
@functools.lru_cache(maxsize=4)
def _fresh_params(cfg: ModelConfig, paths: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Our init of the listed parameters (flattened paths); cached because init compiles
  (callers copy). Only they leave the jitted init, so XLA skips drawing the rest: a headless
  encoder's heads come without initialising its whole encoder."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  model = _build(cfg)
  ids = jnp.zeros((1, 2), jnp.int32)

  def init(key):
    params = nn.unbox(model.init(key, ids, masked_positions=jnp.zeros((1, 1), jnp.int32))["params"])
    flat = traverse_util.flatten_dict(params, sep="/")
    return {p: flat[p] for p in paths}

  return {k: np.asarray(v) for k, v in jax.jit(init)(jax.random.key(FRESH_INIT_SEED)).items()}


@dataclasses.dataclass(frozen=True)
class Imported:
  """A Hugging Face directory as `import_model` found it.

  `layout` names what the tensors hold, whatever `architectures` says: `BertForPreTraining`
  (MLM + NSP heads), `BertForMaskedLM` (MLM head only), `BertModel` (bare encoder, as
  sentence-encoder packages ship it), the `MobileBert...` equivalents, or `ModernBertForMaskedLM`,
  `ModernBertModel`, `EuroBertForMaskedLM`, `EuroBertModel` (no NSP head). Heads the file lacks
  are still in `params` (initialised fresh, so the model can run), but listed in `fresh` and
  reported by `has_mlm_head` / `has_nsp_head`: a caller must not treat them as trained.
  """
  config: ModelConfig | ModernConfig
  params: dict[str, Any]
  layout: str
  has_mlm_head: bool
  has_nsp_head: bool
  has_pooler: bool
  fresh: tuple[str, ...]   # our parameter paths initialised fresh (seed FRESH_INIT_SEED)
  source: str              # the weights file (or index) read
  directory: str           # the model directory (inside a sentence-transformers package: the
                           # Transformer module's folder)


def _backbone_prefix(sd: Mapping[str, Any], base: str, where: str) -> str:
  """'bert.' / 'mobilebert.' / 'model.' (task models) or '' (bare encoders); ValueError
  otherwise."""
  family = FAMILIES[base]
  probe = family.probe
  for prefix in (family.prefix + ".", ""):
    if prefix + probe in sd:
      return prefix
  starts: dict[str, int] = {}
  for key in sd:
    head = key.split(".", 1)[0] + "."
    starts[head] = starts.get(head, 0) + 1
  seen = ", ".join(f"{k} ({n})" for k, n in sorted(starts.items(), key=lambda kv: -kv[1])[:8])
  layouts = ([layout_name(base, True, False), layout_name(base, False, False)]
             if base in modern_config.FAMILIES else
             [layout_name(base, True, True), layout_name(base, True, False),
              layout_name(base, False, False)])
  raise ValueError(
      f"{where}: unknown checkpoint layout: neither {family.prefix}.{probe} nor {probe} is "
      f"present. Readable layouts: {', '.join(layouts)} (backbone names with or without the "
      f"`{family.prefix}.` prefix). The file's tensor names start with: "
      f"{seen or 'nothing (empty file)'}")


def load(path: str | os.PathLike) -> tuple[ModelConfig | ModernConfig, dict[str, Any]]:
  """Imports a Hugging Face MobileBERT, BERT, ModernBERT or EuroBERT directory: (config,
  params).

  The layouts of `import_model`; returns only its config and parameters (headless files get
  fresh heads, named in a warning). Use `import_model` to learn which heads were real.
  """
  imported = import_model(path)
  return imported.config, imported.params


def _table_tensors(cfg: ModelConfig | ModernConfig, sd: Mapping[str, np.ndarray], prefix: str,
                   where: str
                   ) -> tuple[dict[str, np.ndarray], set[str], list[tuple[str, Any]]]:
  """Our flattened params from the table's tensors, the file keys used, and the head/pooler
  tensors the file lacks; ValueError naming mis-shaped or missing backbone tensors."""
  def file_key(hf: str) -> str:
    return hf if is_head(hf) else prefix + hf

  shapes = param_shapes(cfg)
  flat: dict[str, np.ndarray] = {}
  used: set[str] = set()
  missing_backbone, missing_fresh, misshaped = [], [], []
  for entry in entries(cfg):
    want = entry.hf_shape(shapes[entry.ours])
    keys = ([file_key(entry.hf.format(i=i)) for i in range(cfg.num_hidden_layers)]
            if entry.layered else [file_key(entry.hf)])
    tensors = []
    for i, key in enumerate(keys):
      if entry.layered and i < entry.from_layer:
        tensors.append(entry.identity(shapes[entry.ours]))
        continue
      t = sd.get(key)
      if t is None:
        (missing_backbone if entry.part == "backbone" else missing_fresh).append((key, want))
        continue
      used.add(key)
      if tuple(t.shape) != want:
        misshaped.append((key, want, tuple(t.shape)))
        continue
      tensors.append(entry.to_ours(t.astype(np.float32, copy=False)))
    if len(tensors) != len(keys):
      continue
    arr = np.stack(tensors) if entry.layered else tensors[0]
    flat[entry.ours] = np.ascontiguousarray(arr)

  if misshaped:
    lines = [f"  {k}: expected shape {w}, found {f}" for k, w, f in misshaped]
    raise ValueError(f"{where}: {len(misshaped)} tensor(s) do not fit the architecture in "
                     f"{CONFIG_NAME}:\n" + "\n".join(lines))
  if missing_backbone:
    lines = [f"  {k} (expected shape {w})" for k, w in missing_backbone[:20]]
    more = len(missing_backbone) - 20
    raise ValueError(f"{where}: {len(missing_backbone)} backbone tensor(s) missing:\n"
                     + "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else ""))
  for key in placeholders(cfg):
    if file_key(key) in sd:
      used.add(file_key(key))
  return flat, used, missing_fresh


def _tied_tensors(cfg: ModelConfig | ModernConfig, sd: Mapping[str, np.ndarray],
                  flat: dict[str, np.ndarray], used: set[str],
                  missing_fresh: list[tuple[str, Any]], where: str) -> list[tuple[str, Any]]:
  """Checks the tied output embeddings some savers write, takes the MLM bias from the decoder
  when only it carries one; returns the head tensors still missing."""
  # They must equal what they are tied to.
  for key, ours in tied_keys(cfg).items():
    if key in sd:
      used.add(key)
      if not np.array_equal(sd[key].astype(np.float32), flat[ours]):
        untied = ("set tie_word_embeddings=false in config.json if the checkpoint's output "
                  "embeddings are its own" if isinstance(cfg, ModernConfig) else
                  "untied output embeddings cannot be represented (the MLM decoder reuses "
                  "the table)")
        raise ValueError(f"{where}: {key} differs from the word embeddings; {untied}")
  if isinstance(cfg, ModernConfig):
    return missing_fresh
  bias_key = "cls.predictions.decoder.bias"
  if bias_key in sd:
    used.add(bias_key)
    if "cls/predictions/output_bias" not in flat and sd[bias_key].shape == (cfg.vocab_size,):
      # Hugging Face ties decoder.bias to predictions.bias: either one carries the bias.
      flat["cls/predictions/output_bias"] = sd[bias_key].astype(np.float32)
      missing_fresh = [(k, w) for k, w in missing_fresh if k != "cls.predictions.bias"]
  return missing_fresh


def _fill_fresh(cfg: ModelConfig | ModernConfig, flat: dict[str, np.ndarray],
                missing_fresh: list[tuple[str, Any]], where: str) -> tuple[str, ...]:
  """Initialises the heads and pooler the file lacks (named in a warning); returns their
  paths. AssertionError when the table misses a backbone parameter of the model."""
  shapes = param_shapes(cfg)
  absent = [p for p in shapes if p not in flat]
  parts = {e.ours: e.part for e in entries(cfg)}
  unmapped = [p for p in absent if parts.get(p, "backbone") == "backbone"]
  if unmapped:  # the table and the model disagree: a bug here, not in the checkpoint
    raise AssertionError(f"mbert_jax.interop.hf_names has no Hugging Face name for {unmapped}")
  if absent:
    fresh = _fresh_params(cfg, tuple(sorted(absent)))
    for p in absent:
      flat[p] = fresh[p].copy()
    warnings.warn(
        f"{where}: no {', '.join(k for k, _ in missing_fresh)}; initialised fresh (seed "
        f"{FRESH_INIT_SEED}) as {', '.join(sorted(absent))}", stacklevel=3)
  return tuple(sorted(absent))


def import_model(path: str | os.PathLike) -> Imported:
  """Imports a Hugging Face MobileBERT, BERT-family, ModernBERT or EuroBERT encoder directory.

  Accepts `BertForPreTraining`, `BertForMaskedLM`, bare `BertModel` and MobileBERT
  (`MobileBertForPreTraining`/`MobileBertModel`) checkpoints, `ModernBertForMaskedLM`,
  `ModernBertModel`, `EuroBertForMaskedLM` and `EuroBertModel`, backbone keys with or without
  the `bert.`/`mobilebert.`/`model.` prefix, as model.safetensors or pytorch_model.bin (single
  or sharded), and sentence-transformers directories. Any other model_type is refused in one
  line naming it and the supported ones. Parameters are a float32 numpy tree shaped as
  `nn.unbox(model.init(...)['params'])`, encoder layers stacked on a leading axis.

  Heads (and the pooler) a headless directory lacks are initialised fresh with seed
  FRESH_INIT_SEED, named in a warning and in `Imported.fresh`. Errors are ValueErrors raised
  before any compilation: an unknown layout, a missing or mis-shaped backbone tensor (named);
  tensors the model does not use are named in a warning.
  """
  d = Path(path)
  if not d.is_dir():
    raise FileNotFoundError(f"{d}: not a directory (expected a Hugging Face model directory)")
  d = model_dir(d)
  if not (d / CONFIG_NAME).is_file():
    raise FileNotFoundError(f"{d}: no {CONFIG_NAME}")
  raw, source = _read_state_dict(d)
  cfg, base = read_config(d, lambda: raw)
  where = f"{d / source}"

  sd = {_canonical(k): v for k, v in raw.items()
        if not any(k.endswith(s) for s in _BUFFER_SUFFIXES)}
  # Prefixed (task models) or bare (MobileBertModel/BertModel saved alone) backbone names.
  prefix = _backbone_prefix(sd, base, where)
  flat, used, missing_fresh = _table_tensors(cfg, sd, prefix, where)
  missing_fresh = _tied_tensors(cfg, sd, flat, used, missing_fresh, where)
  absent = _fill_fresh(cfg, flat, missing_fresh, where)

  unknown = sorted(set(sd) - used)
  if unknown:
    shown = ", ".join(unknown[:12])
    if len(unknown) > 12:
      shown += f" ... ({len(unknown) - 12} more)"
    warnings.warn(f"{where}: ignoring {len(unknown)} tensor(s) this model does not use: {shown}",
                  stacklevel=2)

  extra = set(flat) - set(param_shapes(cfg))
  if extra:  # the table and the model disagree: a bug here, not in the checkpoint
    raise AssertionError(f"mbert_jax.interop.hf_names maps to unknown parameters {sorted(extra)}")
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  modern = isinstance(cfg, ModernConfig)
  has_mlm = not any(p.startswith("cls/predictions/") for p in absent)
  # These families have neither an NSP head nor a pooler.
  has_nsp = not modern and not any(p.startswith("cls/seq_relationship/") for p in absent)
  has_pooler = (not modern and cfg.classifier_activation
                and not any(p.startswith("pooler/") for p in absent))
  return Imported(
      config=cfg, params=tree, layout=layout_name(base, has_mlm, has_nsp),
      has_mlm_head=has_mlm, has_nsp_head=has_nsp, has_pooler=has_pooler,
      fresh=absent, source=where, directory=str(d))


__all__ = ["FRESH_INIT_SEED", "Imported", "import_model", "load", "model_dir", "read_config"]
