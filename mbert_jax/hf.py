"""Hugging Face interop: import MobileBERT / BERT directories, export MobileBERT ones.

    cfg, params = load("path/to/hf_dir")          # MobileBert*/Bert* (pre-training or bare)
    imported = import_model("path/to/hf_dir")      # the same, plus layout and which heads are real
    save(cfg, params, "out_dir", tokenizer_dir=...)  # loads in MobileBertForPreTraining
    save_task(cfg, params, "out_dir", head="classification", label_names=[...])
                    # fine-tuned: MobileBertForSequenceClassification / ...ForQuestionAnswering

Import keeps Hugging Face semantics (spec §7, §13.3): `hidden_act="gelu"` stays the exact erf
form, and a MobileBERT import sets `hf_layer_norm_eps_quirk` because Hugging Face builds the
embedding LayerNorm and the LayerNorm after the final FFN (`MobileBertOutput.LayerNorm`) without
`eps`, i.e. with torch's 1e-5 instead of `layer_norm_eps`. BERT passes `layer_norm_eps` to every
LayerNorm, so a BERT import keeps the quirk off.

Reading safetensors needs only numpy (torch is optional); `pytorch_model.bin` needs torch.
One table (`_entries`) maps every Hugging Face tensor to its place in the Flax tree and is used
in both directions, so import and export cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mbert_jax.models.config import ModelConfig, from_hf_config, to_hf_config

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")

# Non-persistent buffers that old checkpoints still contain; they hold no learned state.
_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
# Seed for heads a headless checkpoint lacks: fixed so two imports of one directory agree.
FRESH_INIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One Hugging Face tensor.

  `hf`: key without the backbone prefix (`mobilebert.`/`bert.`); layer entries contain `{i}`.
  `ours`: flattened Flax path (`/`). (Tensors Hugging Face builds but this architecture never
  reads are not entries: see `_placeholders`.)
  `transpose`: HF `Linear.weight` is [out, in], our kernels [in, out].
  `part`: 'backbone' (must be present), 'pooler' or 'heads' (initialised fresh if absent).
  """
  hf: str
  ours: str
  transpose: bool = False
  layered: bool = False
  part: str = "backbone"


def _entries(cfg: ModelConfig) -> list[_Entry]:
  """Every tensor of a Hugging Face MobileBERT (or BERT: the same names minus the bottleneck
  parts) checkpoint for this config, in a fixed order."""
  out: list[_Entry] = []

  def dense(hf, ours, **kw):
    out.append(_Entry(f"{hf}.weight", f"{ours}/kernel", transpose=True, **kw))
    out.append(_Entry(f"{hf}.bias", f"{ours}/bias", **kw))

  def norm(hf, ours, **kw):
    out.append(_Entry(f"{hf}.weight", f"{ours}/scale", **kw))
    out.append(_Entry(f"{hf}.bias", f"{ours}/bias", **kw))

  for table in ("word", "position", "token_type"):
    out.append(_Entry(f"embeddings.{table}_embeddings.weight",
                      f"embeddings/{table}_embeddings/embedding"))
  if cfg.has_embedding_transformation:
    dense("embeddings.embedding_transformation", "embeddings/embedding_transformation")
  norm("embeddings.LayerNorm", "embeddings/norm")

  L, E = "encoder.layer.{i}.", "encoder/layers/"
  lay = dict(layered=True)
  if cfg.use_bottleneck:
    dense(L + "bottleneck.input.dense", E + "bottleneck_input/dense", **lay)
    norm(L + "bottleneck.input.LayerNorm", E + "bottleneck_input/norm", **lay)
    if cfg.key_query_shared_bottleneck and not cfg.use_bottleneck_attention:
      dense(L + "bottleneck.attention.dense", E + "bottleneck_attention/dense", **lay)
      norm(L + "bottleneck.attention.LayerNorm", E + "bottleneck_attention/norm", **lay)
  for proj in ("query", "key", "value"):
    dense(L + f"attention.self.{proj}", E + f"attention/{proj}", **lay)
  dense(L + "attention.output.dense", E + "attention/output/dense", **lay)
  norm(L + "attention.output.LayerNorm", E + "attention/output/norm", **lay)
  for j in range(cfg.num_feedforward_networks - 1):
    dense(L + f"ffn.{j}.intermediate.dense", E + f"ffn_{j}/intermediate", **lay)
    dense(L + f"ffn.{j}.output.dense", E + f"ffn_{j}/output/dense", **lay)
    norm(L + f"ffn.{j}.output.LayerNorm", E + f"ffn_{j}/output/norm", **lay)
  dense(L + "intermediate.dense", E + "intermediate", **lay)
  dense(L + "output.dense", E + "output/dense", **lay)
  norm(L + "output.LayerNorm", E + "output/norm", **lay)
  if cfg.use_bottleneck:
    dense(L + "output.bottleneck.dense", E + "output/bottleneck/dense", **lay)
    norm(L + "output.bottleneck.LayerNorm", E + "output/bottleneck/norm", **lay)

  if cfg.classifier_activation:
    dense("pooler.dense", "pooler/dense", part="pooler")

  heads = dict(part="heads")
  dense("cls.predictions.transform.dense", "cls/predictions/transform/dense", **heads)
  norm("cls.predictions.transform.LayerNorm", "cls/predictions/transform/norm", **heads)
  if cfg.has_extra_output_weights:
    out.append(_Entry("cls.predictions.dense.weight", "cls/predictions/extra_output_weights",
                      transpose=True, **heads))
  out.append(_Entry("cls.predictions.bias", "cls/predictions/output_bias", **heads))
  dense("cls.seq_relationship", "cls/seq_relationship", **heads)
  return out


def _placeholders(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Tensors Hugging Face MobileBERT always builds though this architecture never reads them.

  `embedding_transformation` exists even with trigram off and embedding_size == hidden_size
  (then unused): written as identity + zero bias, so that applying it anyway would be a no-op.
  `cls.predictions.dense` is [hidden - embedding, vocab]: zero rows when the sizes are equal.
  """
  out = {}
  if not cfg.has_embedding_transformation:  # implies embedding_size == hidden_size
    out["embeddings.embedding_transformation.weight"] = np.eye(cfg.hidden_size, dtype=np.float32)
    out["embeddings.embedding_transformation.bias"] = np.zeros(cfg.hidden_size, np.float32)
  if not cfg.has_extra_output_weights:
    out["cls.predictions.dense.weight"] = np.zeros((0, cfg.vocab_size), np.float32)
  return out


def _is_head(hf_key: str) -> bool:
  return hf_key.startswith("cls.")


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


def _canonical(key: str) -> str:
  # Checkpoints converted from TF by old transformers versions name LayerNorm gamma/beta.
  if key.endswith("LayerNorm.gamma"):
    return key[:-len("gamma")] + "weight"
  if key.endswith("LayerNorm.beta"):
    return key[:-len("beta")] + "bias"
  return key


# ---------------------------------------------------------------------------- import
def _hf_config_checks(d: Mapping[str, Any], where: Path) -> None:
  if d.get("model_type") == "bert":
    pet = d.get("position_embedding_type", "absolute")
    if pet != "absolute":
      raise ValueError(f"{where}: position_embedding_type={pet!r} is not supported (only "
                       "absolute learned positions, as in BERT and MobileBERT)")
    if d.get("is_decoder") or d.get("add_cross_attention"):
      raise ValueError(f"{where}: a BERT decoder (is_decoder/add_cross_attention) is not "
                       "supported; only bidirectional encoders")


def _infer_model_type(hf_cfg: Mapping[str, Any], sd: Mapping[str, Any], where: Path) -> str:
  """Old BERT config.json files predate `model_type`: go by architectures, then key names."""
  for arch in hf_cfg.get("architectures") or ():
    if arch.startswith("MobileBert"):
      return "mobilebert"
    if arch.startswith("Bert"):
      return "bert"
  if any(k.startswith("mobilebert.") or ".bottleneck." in k for k in sd):
    return "mobilebert"
  if any(k.startswith("bert.") for k in sd) or "embedding_size" not in hf_cfg:
    return "bert"
  raise ValueError(f"{where}: no model_type, and neither architectures nor tensor names tell "
                   "MobileBERT from BERT")


@functools.lru_cache(maxsize=4)
def _fresh_params(cfg: ModelConfig, paths: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Our init of the listed parameters (flattened paths); cached because init compiles
  (callers copy). Only they leave the jitted init, so XLA skips drawing the rest: a headless
  encoder's heads come without initialising its whole encoder."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  from mbert_jax.models import build
  model = build(cfg)
  ids = jnp.zeros((1, 2), jnp.int32)

  def init(key):
    params = nn.unbox(model.init(key, ids, masked_positions=jnp.zeros((1, 1), jnp.int32))["params"])
    flat = traverse_util.flatten_dict(params, sep="/")
    return {p: flat[p] for p in paths}

  return {k: np.asarray(v) for k, v in jax.jit(init)(jax.random.key(FRESH_INIT_SEED)).items()}


def _expected_hf_shape(entry: _Entry, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
  shape = ours_shape[1:] if entry.layered else ours_shape
  return tuple(reversed(shape)) if entry.transpose else tuple(shape)


@dataclasses.dataclass(frozen=True)
class Imported:
  """A Hugging Face directory as `import_model` found it.

  `layout` names what the tensors hold, whatever `architectures` says: `BertForPreTraining`
  (MLM + NSP heads), `BertForMaskedLM` (MLM head only), `BertModel` (bare encoder, as
  sentence-encoder packages ship it), or the `MobileBert...` equivalents. Heads the file lacks
  are still in `params` (initialised fresh, so the model can run), but listed in `fresh` and
  reported by `has_mlm_head` / `has_nsp_head`: a caller must not treat them as trained.
  """
  config: ModelConfig
  params: dict[str, Any]
  layout: str
  has_mlm_head: bool
  has_nsp_head: bool
  has_pooler: bool
  fresh: tuple[str, ...]   # our parameter paths initialised fresh (seed FRESH_INIT_SEED)
  source: str              # the weights file (or index) read
  directory: str           # the model directory (inside a sentence-transformers package: the
                           # Transformer module's folder)


# Probe for the backbone: every BERT-family checkpoint has the word table.
_PROBE = "embeddings.word_embeddings.weight"
_SENTENCE_TRANSFORMERS_MODULES = "modules.json"


def _model_dir(d: Path) -> Path:
  """`d`, or the Transformer module's folder of a sentence-transformers directory whose
  encoder lives in a sub-folder (older packages: `0_BERT/`, `0_Transformer/`)."""
  if (d / CONFIG_NAME).is_file() or not (d / _SENTENCE_TRANSFORMERS_MODULES).is_file():
    return d
  modules = json.loads((d / _SENTENCE_TRANSFORMERS_MODULES).read_text())
  for module in modules:
    kind = str(module.get("type", ""))
    if kind.endswith((".Transformer", ".BERT")):
      sub = d / module.get("path", "")
      if (sub / CONFIG_NAME).is_file():
        return sub
  raise FileNotFoundError(f"{d}: a sentence-transformers directory, but no Transformer/BERT "
                          f"module in {_SENTENCE_TRANSFORMERS_MODULES} has a {CONFIG_NAME}")


def _backbone_prefix(sd: Mapping[str, Any], base: str, where: str) -> str:
  """'bert.' / 'mobilebert.' (task models) or '' (bare encoders); ValueError otherwise."""
  for prefix in (base + ".", ""):
    if prefix + _PROBE in sd:
      return prefix
  starts: dict[str, int] = {}
  for key in sd:
    head = key.split(".", 1)[0] + "."
    starts[head] = starts.get(head, 0) + 1
  seen = ", ".join(f"{k} ({n})" for k, n in sorted(starts.items(), key=lambda kv: -kv[1])[:8])
  raise ValueError(
      f"{where}: unknown checkpoint layout: neither {base}.{_PROBE} nor {_PROBE} is present. "
      f"Readable layouts: {_layout_name(base, True, True)}, {_layout_name(base, True, False)}, "
      f"{_layout_name(base, False, False)} (backbone names with or without the `{base}.` "
      f"prefix). The file's tensor names start with: {seen or 'nothing (empty file)'}")


def _layout_name(base: str, mlm: bool, nsp: bool) -> str:
  family = "MobileBert" if base == "mobilebert" else "Bert"
  if mlm and nsp:
    return family + "ForPreTraining"
  if mlm:
    return family + "ForMaskedLM"
  if nsp:
    return family + "ForNextSentencePrediction"
  return family + "Model"


def load(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
  """Imports a Hugging Face MobileBERT or BERT directory: (config, params).

  The layouts of `import_model`; returns only its config and parameters (headless files get
  fresh heads, named in a warning). Use `import_model` to learn which heads were real.
  """
  imported = import_model(path)
  return imported.config, imported.params


def import_model(path: str | os.PathLike) -> Imported:
  """Imports a Hugging Face MobileBERT or BERT-family encoder directory.

  Accepts `BertForPreTraining`, `BertForMaskedLM`, bare `BertModel` and MobileBERT
  (`MobileBertForPreTraining`/`MobileBertModel`) checkpoints, backbone keys with or without the
  `bert.`/`mobilebert.` prefix, as model.safetensors or pytorch_model.bin (single or sharded),
  and sentence-transformers directories. Parameters are a float32 numpy tree shaped as
  `nn.unbox(model.init(...)['params'])`, encoder layers stacked on a leading axis.

  Heads (and the pooler) a headless directory lacks are initialised fresh with seed
  FRESH_INIT_SEED, named in a warning and in `Imported.fresh`. Errors are ValueErrors raised
  before any compilation: an unknown layout, a missing or mis-shaped backbone tensor (named);
  tensors the model does not use are named in a warning.
  """
  from flax import traverse_util

  from mbert_jax.models.summary import param_shapes

  d = Path(path)
  if not d.is_dir():
    raise FileNotFoundError(f"{d}: not a directory (expected a Hugging Face model directory)")
  d = _model_dir(d)
  if not (d / CONFIG_NAME).is_file():
    raise FileNotFoundError(f"{d}: no {CONFIG_NAME}")
  hf_cfg = json.loads((d / CONFIG_NAME).read_text())
  raw, source = _read_state_dict(d)
  if "model_type" not in hf_cfg:
    hf_cfg["model_type"] = _infer_model_type(hf_cfg, raw, d / CONFIG_NAME)
  _hf_config_checks(hf_cfg, d / CONFIG_NAME)
  cfg = from_hf_config(hf_cfg).validate()
  base = "bert" if hf_cfg["model_type"] == "bert" else "mobilebert"
  where = f"{d / source}"

  sd = {_canonical(k): v for k, v in raw.items()
        if not any(k.endswith(s) for s in _BUFFER_SUFFIXES)}
  # Prefixed (task models) or bare (MobileBertModel/BertModel saved alone) backbone names.
  prefix = _backbone_prefix(sd, base, where)

  def file_key(hf: str) -> str:
    return hf if _is_head(hf) else prefix + hf

  shapes = param_shapes(cfg)
  flat: dict[str, np.ndarray] = {}
  used: set[str] = set()
  missing_backbone, missing_fresh, misshaped = [], [], []
  for entry in _entries(cfg):
    want = _expected_hf_shape(entry, shapes[entry.ours])
    keys = ([file_key(entry.hf.format(i=i)) for i in range(cfg.num_hidden_layers)]
            if entry.layered else [file_key(entry.hf)])
    tensors = []
    for key in keys:
      t = sd.get(key)
      if t is None:
        (missing_backbone if entry.part == "backbone" else missing_fresh).append((key, want))
        continue
      used.add(key)
      if tuple(t.shape) != want:
        misshaped.append((key, want, tuple(t.shape)))
        continue
      tensors.append(t.astype(np.float32, copy=False))
    if len(tensors) != len(keys):
      continue
    arr = np.stack([t.T if entry.transpose else t for t in tensors]) if entry.layered else (
        tensors[0].T if entry.transpose else tensors[0])
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

  # Tied output embeddings: written by some savers; must equal what they are tied to.
  tied = {"cls.predictions.decoder.weight": "embeddings/word_embeddings/embedding"}
  for key, ours in tied.items():
    if key in sd:
      used.add(key)
      if not np.array_equal(sd[key].astype(np.float32), flat[ours]):
        raise ValueError(f"{where}: {key} differs from the word embeddings; untied output "
                         "embeddings cannot be represented (the MLM decoder reuses the table)")
  bias_key = "cls.predictions.decoder.bias"
  if bias_key in sd:
    used.add(bias_key)
    if "cls/predictions/output_bias" not in flat and sd[bias_key].shape == (cfg.vocab_size,):
      # Hugging Face ties decoder.bias to predictions.bias: either one carries the bias.
      flat["cls/predictions/output_bias"] = sd[bias_key].astype(np.float32)
      missing_fresh = [(k, w) for k, w in missing_fresh if k != "cls.predictions.bias"]
  for key in _placeholders(cfg):
    if file_key(key) in sd:
      used.add(file_key(key))

  absent = [p for p in shapes if p not in flat]
  parts = {e.ours: e.part for e in _entries(cfg)}
  unmapped = [p for p in absent if parts.get(p, "backbone") == "backbone"]
  if unmapped:  # the table and the model disagree: a bug here, not in the checkpoint
    raise AssertionError(f"mbert_jax.hf has no Hugging Face name for {unmapped}")
  if absent:
    fresh = _fresh_params(cfg, tuple(sorted(absent)))
    for p in absent:
      flat[p] = fresh[p].copy()
    warnings.warn(
        f"{where}: no {', '.join(k for k, _ in missing_fresh)}; initialised fresh (seed "
        f"{FRESH_INIT_SEED}) as {', '.join(sorted(absent))}", stacklevel=2)

  unknown = sorted(set(sd) - used)
  if unknown:
    shown = ", ".join(unknown[:12])
    if len(unknown) > 12:
      shown += f" ... ({len(unknown) - 12} more)"
    warnings.warn(f"{where}: ignoring {len(unknown)} tensor(s) this model does not use: {shown}",
                  stacklevel=2)

  extra = set(flat) - set(shapes)
  if extra:  # the table and the model disagree: a bug here, not in the checkpoint
    raise AssertionError(f"mbert_jax.hf table maps to unknown parameters {sorted(extra)}")
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  has_mlm = not any(p.startswith("cls/predictions/") for p in absent)
  has_nsp = not any(p.startswith("cls/seq_relationship/") for p in absent)
  return Imported(
      config=cfg, params=tree, layout=_layout_name(base, has_mlm, has_nsp),
      has_mlm_head=has_mlm, has_nsp_head=has_nsp,
      has_pooler=cfg.classifier_activation and not any(p.startswith("pooler/") for p in absent),
      fresh=tuple(sorted(absent)), source=where, directory=str(d))


# ---------------------------------------------------------------------------- export
# What each exported head becomes in transformers.
ARCHITECTURES = {"pretraining": "MobileBertForPreTraining",
                 "classification": "MobileBertForSequenceClassification",
                 "question_answering": "MobileBertForQuestionAnswering"}
# Our fine-tuning heads are one Dense each, named as Hugging Face names the Linear.
_TASK_HEADS = {"classification": "classifier", "question_answering": "qa_outputs"}


def _flat_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  import flax.linen as nn
  from flax import traverse_util
  flat = traverse_util.flatten_dict(nn.unbox(dict(params)), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def _check_shapes(flat: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> None:
  problems = [f"  {p}: missing (expected {s})" for p, s in shapes.items() if p not in flat]
  problems += [f"  {p}: expected shape {s}, found {tuple(flat[p].shape)}"
               for p, s in shapes.items() if p in flat and tuple(flat[p].shape) != tuple(s)]
  problems += [f"  {p}: not a parameter of this config" for p in flat if p not in shapes]
  if problems:
    raise ValueError("parameters do not match the model config:\n" + "\n".join(problems))


def _table_state_dict(cfg: ModelConfig, flat: Mapping[str, np.ndarray],
                      parts: tuple[str, ...]) -> dict[str, np.ndarray]:
  """HF tensors of the `_entries` in `parts` (plus the placeholders HF builds for them)."""
  def hf_name(key: str) -> str:
    return key if _is_head(key) else "mobilebert." + key

  sd: dict[str, np.ndarray] = {}
  for entry in _entries(cfg):
    if entry.part not in parts:
      continue
    arr = flat[entry.ours].astype(np.float32)
    if entry.layered:
      for i in range(cfg.num_hidden_layers):
        t = arr[i].T if entry.transpose else arr[i]
        sd[hf_name(entry.hf.format(i=i))] = np.ascontiguousarray(t)
    else:
      sd[hf_name(entry.hf)] = np.ascontiguousarray(arr.T if entry.transpose else arr)
  for key, value in _placeholders(cfg).items():
    if "heads" in parts or not _is_head(key):
      sd[hf_name(key)] = value
  return sd


def to_state_dict(model_config: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The `MobileBertForPreTraining` state dict of a parameter tree (float32 numpy, HF names)."""
  from mbert_jax.models.summary import param_shapes

  cfg = model_config.validate()
  to_hf_config(cfg)  # raises for the IB-BERT teacher before any work
  flat = _flat_params(params)
  _check_shapes(flat, param_shapes(cfg))
  return _table_state_dict(cfg, flat, ("backbone", "pooler", "heads"))


def _task_layout(cfg: ModelConfig, head: str, flat: Mapping[str, np.ndarray]
                 ) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...], int]:
  """(expected shapes, table parts, outputs) of a fine-tuning tree for `head`."""
  from mbert_jax.models.summary import param_shapes
  name = _TASK_HEADS[head]
  kernel = flat.get(f"{name}/kernel")
  if kernel is None or kernel.ndim != 2:
    raise ValueError(f"no {name}/kernel in the parameters: not a {head} model")
  outputs = int(kernel.shape[1])
  if head == "question_answering" and outputs != 2:
    raise ValueError(f"qa_outputs/kernel has {outputs} outputs; a span extractor has 2 "
                     "(start, end)")
  # Hugging Face's QA model has no pooler, and our span extractor never reads its own.
  parts = ("backbone", "pooler") if head == "classification" else ("backbone",)
  shapes = {p: s for p, s in param_shapes(cfg).items()
            if p.startswith(("embeddings/", "encoder/")) or ("pooler" in parts
                                                              and p.startswith("pooler/"))}
  shapes[f"{name}/kernel"] = (cfg.hidden_size, outputs)
  shapes[f"{name}/bias"] = (outputs,)
  return shapes, parts, outputs


def task_state_dict(model_config: ModelConfig, params: Mapping[str, Any], head: str
                    ) -> dict[str, np.ndarray]:
  """The state dict of `MobileBertForSequenceClassification` (head="classification") or
  `MobileBertForQuestionAnswering` (head="question_answering") for the params of
  `build_classifier` / `build_span_extractor`."""
  if head not in _TASK_HEADS:
    raise ValueError(f"head {head!r}: choose one of {sorted(_TASK_HEADS)}")
  cfg = model_config.validate()
  to_hf_config(cfg)
  flat = _flat_params(params)
  shapes, parts, _ = _task_layout(cfg, head, flat)
  if "pooler" not in parts:
    flat = {k: v for k, v in flat.items() if not k.startswith("pooler/")}
  _check_shapes(flat, shapes)
  sd = _table_state_dict(cfg, flat, parts)
  name = _TASK_HEADS[head]
  sd[f"{name}.weight"] = np.ascontiguousarray(flat[f"{name}/kernel"].astype(np.float32).T)
  sd[f"{name}.bias"] = flat[f"{name}/bias"].astype(np.float32)
  return sd


def task_hf_config(model_config: ModelConfig, head: str, num_labels: int,
                   label_names: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
  """config.json of a task model: architecture, labels and (classification) problem type."""
  d = to_hf_config(model_config.validate())
  d["architectures"] = [ARCHITECTURES[head]]
  if head == "question_answering":
    return {**d, "num_labels": 2, "id2label": {"0": "start", "1": "end"},
            "label2id": {"start": 0, "end": 1}}
  names = list(label_names or ())
  if names and len(names) != num_labels:
    raise ValueError(f"{len(names)} label names {names} for a classifier with {num_labels} "
                     "outputs")
  if not names:
    names = ["score"] if num_labels == 1 else [f"LABEL_{i}" for i in range(num_labels)]
  return {**d, "num_labels": num_labels,
          "id2label": {str(i): n for i, n in enumerate(names)},
          "label2id": {n: i for i, n in enumerate(names)},
          # transformers would infer these from the label dtype at training time; state them so
          # a user fine-tuning further gets MSE for STS-B and cross-entropy elsewhere.
          "problem_type": "regression" if num_labels == 1 else "single_label_classification"}


def _tokenizer_files(tokenizer_dir: str | os.PathLike | None) -> list[Path]:
  if tokenizer_dir is None:
    return []
  tok = Path(tokenizer_dir)
  files = [tok / f for f in TOKENIZER_FILES if (tok / f).is_file()]
  if not files:
    raise FileNotFoundError(f"tokenizer_dir {tok}: none of {TOKENIZER_FILES} found")
  return files


def _warn_lossy_semantics(cfg: ModelConfig) -> None:
  if cfg.normalization_type == "layer_norm" and not cfg.hf_layer_norm_eps_quirk:
    warnings.warn(
        "Hugging Face MobileBERT normalises the embeddings and the final FFN output with eps "
        f"1e-5, this model with layer_norm_eps={cfg.layer_norm_eps}: its outputs will differ "
        "slightly after export", stacklevel=3)
  if cfg.attention_mask_value is not None:
    warnings.warn(
        f"attention_mask_value={cfg.attention_mask_value} is not exported; Hugging Face masks "
        "padded keys with the dtype minimum", stacklevel=3)


def _write(path: str | os.PathLike, hf_cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray],
           tok_files: list[Path]) -> Path:
  from safetensors.numpy import save_file
  out = Path(path)
  out.mkdir(parents=True, exist_ok=True)
  hf_cfg = {**hf_cfg, "dtype": "float32"}
  (out / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
  save_file(dict(sd), str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
  for f in tok_files:
    shutil.copyfile(f, out / f.name)
  return out


def save(model_config: ModelConfig, params: Mapping[str, Any], path: str | os.PathLike, *,
         tokenizer_dir: str | os.PathLike | None = None) -> Path:
  """Writes a Hugging Face `MobileBertForPreTraining` directory; returns its path.

  config.json states every architecture field (Hugging Face defaults differ from the released
  model, spec §7.1); model.safetensors holds `mobilebert.*` and `cls.*` tensors with [out, in]
  kernels; the tied `cls.predictions.decoder.*` are left out as `save_pretrained` leaves them
  out. The IB-BERT teacher cannot be represented and raises ValueError. With `tokenizer_dir`,
  its tokenizer files are copied alongside.
  """
  cfg = model_config.validate()
  hf_cfg = to_hf_config(cfg)
  sd = to_state_dict(cfg, params)
  tok_files = _tokenizer_files(tokenizer_dir)
  _warn_lossy_semantics(cfg)
  return _write(path, hf_cfg, sd, tok_files)


def save_task(model_config: ModelConfig, params: Mapping[str, Any], path: str | os.PathLike, *,
              head: str, label_names: list[str] | tuple[str, ...] | None = None,
              tokenizer_dir: str | os.PathLike | None = None) -> Path:
  """Writes a fine-tuned model as a Hugging Face directory; returns its path.

  head="classification": the params of `build_classifier` (num_labels read from the head;
  1 = regression) as `MobileBertForSequenceClassification`, with id2label/label2id from
  `label_names` and problem_type. head="question_answering": the params of
  `build_span_extractor` as `MobileBertForQuestionAnswering`. Every check of `save` applies.
  """
  cfg = model_config.validate()
  to_hf_config(cfg)
  sd = task_state_dict(cfg, params, head)
  outputs = int(sd[f"{_TASK_HEADS[head]}.bias"].shape[0])
  hf_cfg = task_hf_config(cfg, head, outputs, label_names)
  tok_files = _tokenizer_files(tokenizer_dir)
  _warn_lossy_semantics(cfg)
  return _write(path, hf_cfg, sd, tok_files)


__all__ = ["load", "save", "save_task", "task_state_dict", "task_hf_config", "to_state_dict",
           "ARCHITECTURES", "FRESH_INIT_SEED"]
