"""Configuration of the pre-norm rotary encoders: ModernBERT (and Ettin, mmBERT) and EuroBERT.

Both families are one architecture with options (`mbert_jax.models.modern`): rotary
positions instead of learned ones, pre-norm blocks with a final norm, gated MLPs, no token
types. The fields name those options, not the family, so that a config says what runs;
`from_hf_config` reads either family's `config.json` into them, keeping Hugging Face semantics
(`gelu` is the exact erf form, the sliding window is +-local_attention//2 inclusive).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

FAMILIES = ("modernbert", "eurobert")
LAYER_TYPES = ("full_attention", "sliding_attention")
NORMS = ("layer_norm", "rms_norm")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModernConfig:
  # What the checkpoint is (Hugging Face model_type): names the tensors on import and export;
  # the forward pass reads only the options below.
  family: str = "modernbert"
  vocab_size: int = 50368
  hidden_size: int = 768
  num_hidden_layers: int = 22
  num_attention_heads: int = 12
  num_key_value_heads: int = 12  # < num_attention_heads: grouped-query attention
  head_dim: int = 64
  intermediate_size: int = 1152  # width of each half of the gated MLP
  hidden_act: str = "gelu"       # applied to the gating half of the MLP
  max_position_embeddings: int = 8192
  # --- normalisation
  norm_type: str = "layer_norm"
  norm_eps: float = 1e-5
  norm_bias: bool = False
  embedding_norm: bool = True        # ModernBERT normalises the token embeddings; EuroBERT not
  first_layer_attn_norm: bool = False  # ModernBERT's layer 0 feeds attention un-normalised
  # --- projections
  fused_qkv: bool = True             # one [H, 3, heads*head_dim] kernel (ModernBERT's Wqkv)
  fused_mlp: bool = True             # one [H, 2, I] kernel (ModernBERT's Wi)
  attention_bias: bool = False
  mlp_bias: bool = False
  # --- attention pattern and rotary positions
  # One entry per layer; () means every layer attends globally.
  layer_types: tuple[str, ...] = ()
  local_attention: int = 128         # sliding layers see keys within +-local_attention//2
  rope_theta: float = 160000.0       # full_attention layers
  local_rope_theta: float = 10000.0  # sliding_attention layers
  # --- MLM head
  head_transform: bool = True        # dense -> act -> norm before the decoder (ModernBERT)
  head_activation: str = "gelu"
  head_bias: bool = False            # bias of the transform's dense
  tie_word_embeddings: bool = True   # decoder = word embeddings^T
  decoder_bias: bool = True
  # --- dropout (training only)
  embedding_dropout: float = 0.0
  attention_dropout: float = 0.0         # on the attention probabilities
  attention_output_dropout: float = 0.0  # on the attention block's output (ModernBERT)
  mlp_dropout: float = 0.0               # on the gated product (ModernBERT)
  # --- token ids, init
  pad_token_id: int | None = None
  mask_token_id: int | None = None
  initializer_range: float = 0.02
  # --- mbert-jax fields (as ModelConfig's)
  attention_mask_value: float | None = None  # None: most negative finite float32, as HF
  compute_dtype: str = "float32"
  scan_layers: bool = True
  remat: bool = False

  # ---------------------------------------------------------------- derived
  @property
  def global_layers(self) -> tuple[bool, ...]:
    """Per layer: True where attention is global."""
    if not self.layer_types:
      return (True,) * self.num_hidden_layers
    return tuple(t == "full_attention" for t in self.layer_types)

  @property
  def has_local_layers(self) -> bool:
    return not all(self.global_layers)

  @property
  def half_window(self) -> int:
    return self.local_attention // 2

  @property
  def num_kv_groups(self) -> int:
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def attention_norm_layers(self) -> tuple[bool, ...]:
    """Per layer: whether the attention input is normalised."""
    return tuple(i > 0 or self.first_layer_attn_norm for i in range(self.num_hidden_layers))

  # ---------------------------------------------------------------- checks
  def validate(self, max_seq_length: int | None = None) -> "ModernConfig":
    def bad(field: str, why: str):
      raise ValueError(f"model config: `{field}` = {getattr(self, field)!r}: {why}")

    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
              "local_attention"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        bad(f, "must be a positive integer")
    if self.family not in FAMILIES:
      bad("family", f"choose one of {FAMILIES}")
    if self.num_attention_heads % self.num_key_value_heads:
      bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
    if self.head_dim % 2:
      bad("head_dim", "rotary embeddings rotate pairs: must be even")
    if self.fused_qkv and self.num_key_value_heads != self.num_attention_heads:
      bad("fused_qkv", "a fused Wqkv has as many key/value heads as query heads")
    if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
      bad("layer_types", f"needs one entry per layer ({self.num_hidden_layers})")
    for t in self.layer_types:
      if t not in LAYER_TYPES:
        bad("layer_types", f"unknown layer type {t!r}; choose from {LAYER_TYPES}")
    if self.norm_type not in NORMS:
      bad("norm_type", f"choose one of {NORMS}")
    for f in ("hidden_act", "head_activation"):
      if getattr(self, f) not in ACTIVATIONS:
        bad(f, f"unknown activation; choose one of {ACTIVATIONS}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      bad("compute_dtype", f"choose one of {COMPUTE_DTYPES}")
    if self.norm_eps <= 0:
      bad("norm_eps", "must be positive")
    for f in ("embedding_dropout", "attention_dropout", "attention_output_dropout",
              "mlp_dropout"):
      if not 0.0 <= getattr(self, f) < 1.0:
        bad(f, "must be in [0, 1)")
    for f in ("pad_token_id", "mask_token_id"):
      v = getattr(self, f)
      if v is not None and not 0 <= v < self.vocab_size:
        bad(f, f"must index the vocabulary of {self.vocab_size}")
    if max_seq_length is not None and max_seq_length > self.max_position_embeddings:
      raise ValueError(
          f"model config: `max_position_embeddings` = {self.max_position_embeddings} is shorter "
          f"than the sequence length {max_seq_length}")
    return self

  # ---------------------------------------------------------------- conversion
  def replace(self, **changes: Any) -> "ModernConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["layer_types"] = list(self.layer_types)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModernConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"model config: unknown field(s) {unknown}")
    d = dict(d)
    if "layer_types" in d:
      d["layer_types"] = tuple(d["layer_types"] or ())
    return cls(**d)


# ---------------------------------------------------------------------------- Hugging Face
def _rope_thetas(d: Mapping[str, Any], where: str) -> dict[str, float]:
  """rope_theta per layer type, from `rope_parameters` (transformers >= 5) or the older
  top-level keys; anything but plain rotary positions (scaling, YaRN) is refused."""
  params = d.get("rope_parameters")
  scaling = d.get("rope_scaling")
  if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
    raise ValueError(f"{where}: rope_scaling {scaling} is not supported (plain rotary only)")
  out: dict[str, float] = {}
  if isinstance(params, Mapping) and set(params) & set(LAYER_TYPES):
    for kind in LAYER_TYPES:
      if params.get(kind):
        out[kind] = params[kind].get("rope_theta")
        if params[kind].get("rope_type", "default") != "default":
          raise ValueError(f"{where}: rope_parameters[{kind!r}] = {params[kind]} is not "
                           "supported (plain rotary only)")
  elif isinstance(params, Mapping):
    if params.get("rope_type", "default") != "default":
      raise ValueError(f"{where}: rope_parameters = {params} is not supported (plain rotary "
                       "only)")
    out["full_attention"] = out["sliding_attention"] = params.get("rope_theta")
  return {k: float(v) for k, v in out.items() if v is not None}


def from_hf_config(d: Mapping[str, Any]) -> ModernConfig:
  """A Hugging Face ModernBERT or EuroBERT `config.json` as a ModernConfig (not validated)."""
  model_type = d.get("model_type")
  thetas = _rope_thetas(d, f"model_type {model_type!r}")
  heads = d["num_attention_heads"]
  if model_type == "modernbert":
    n = d["num_hidden_layers"]
    every = d.get("global_attn_every_n_layers", 3)
    layer_types = tuple(d.get("layer_types") or (
        "sliding_attention" if i % every else "full_attention" for i in range(n)))
    return ModernConfig(
        family="modernbert", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=d["hidden_size"] // heads, intermediate_size=d["intermediate_size"],
        hidden_act=d.get("hidden_activation", "gelu"),
        max_position_embeddings=d.get("max_position_embeddings", 8192),
        norm_type="layer_norm", norm_eps=d.get("norm_eps", 1e-5),
        norm_bias=d.get("norm_bias", False), embedding_norm=True, first_layer_attn_norm=False,
        fused_qkv=True, fused_mlp=True, attention_bias=d.get("attention_bias", False),
        mlp_bias=d.get("mlp_bias", False), layer_types=layer_types,
        local_attention=d.get("local_attention", 128),
        rope_theta=thetas.get("full_attention", d.get("global_rope_theta", 160000.0)),
        local_rope_theta=thetas.get("sliding_attention", d.get("local_rope_theta", 10000.0)),
        head_transform=True, head_activation=d.get("classifier_activation", "gelu"),
        head_bias=d.get("classifier_bias", False),
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        decoder_bias=d.get("decoder_bias", True),
        embedding_dropout=float(d.get("embedding_dropout", 0.0)),
        attention_dropout=float(d.get("attention_dropout", 0.0)),
        attention_output_dropout=float(d.get("attention_dropout", 0.0)),
        mlp_dropout=float(d.get("mlp_dropout", 0.0)),
        pad_token_id=d.get("pad_token_id"), mask_token_id=d.get("mask_token_id"),
        initializer_range=d.get("initializer_range", 0.02))
  if model_type == "eurobert":
    kv = d.get("num_key_value_heads") or heads
    theta = thetas.get("full_attention", d.get("rope_theta", 10000.0))
    return ModernConfig(
        family="eurobert", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_act", "silu"),
        max_position_embeddings=d.get("max_position_embeddings", 8192),
        norm_type="rms_norm", norm_eps=d.get("rms_norm_eps", 1e-5), norm_bias=False,
        embedding_norm=False, first_layer_attn_norm=True, fused_qkv=False, fused_mlp=False,
        attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
        layer_types=(), rope_theta=theta, local_rope_theta=theta, head_transform=False,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        decoder_bias=d.get("mlp_bias", False),
        attention_dropout=float(d.get("attention_dropout", 0.0)),
        pad_token_id=d.get("pad_token_id"), mask_token_id=d.get("mask_token_id"),
        initializer_range=d.get("initializer_range", 0.02))
  raise ValueError(f"model_type {model_type!r} is not one of {FAMILIES}")


def to_hf_config(cfg: ModernConfig) -> dict[str, Any]:
  """The `config.json` of a ModernBERT/EuroBERT directory that `from_hf_config` (and
  transformers) read back as `cfg`, every architecture field stated."""
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_position_embeddings,
                attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
                tie_word_embeddings=cfg.tie_word_embeddings,
                attention_dropout=cfg.attention_dropout, pad_token_id=cfg.pad_token_id,
                mask_token_id=cfg.mask_token_id, initializer_range=cfg.initializer_range)
  if cfg.family == "modernbert":
    return dict(common, model_type="modernbert", architectures=["ModernBertForMaskedLM"],
                hidden_activation=cfg.hidden_act, norm_eps=cfg.norm_eps, norm_bias=cfg.norm_bias,
                layer_types=list(cfg.layer_types or ("full_attention",) * cfg.num_hidden_layers),
                local_attention=cfg.local_attention, global_rope_theta=cfg.rope_theta,
                local_rope_theta=cfg.local_rope_theta,
                classifier_activation=cfg.head_activation, classifier_bias=cfg.head_bias,
                decoder_bias=cfg.decoder_bias, embedding_dropout=cfg.embedding_dropout,
                mlp_dropout=cfg.mlp_dropout)
  return dict(common, model_type="eurobert", architectures=["EuroBertForMaskedLM"],
              num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
              hidden_act=cfg.hidden_act, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta)


# ---------------------------------------------------------------------------- presets
def _every_third(n: int) -> tuple[str, ...]:
  return tuple("sliding_attention" if i % 3 else "full_attention" for i in range(n))


# Hugging Face's config defaults are these checkpoints' (their docstrings name them).
_MODERNBERT_BASE = ModernConfig(layer_types=_every_third(22), pad_token_id=50283,
                                mask_token_id=50284)
_EUROBERT_210M = ModernConfig(
    family="eurobert", vocab_size=128256, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=12, head_dim=64, intermediate_size=3072,
    hidden_act="silu", norm_type="rms_norm", norm_bias=False, embedding_norm=False,
    first_layer_attn_norm=True, fused_qkv=False, fused_mlp=False, layer_types=(),
    rope_theta=250000.0, local_rope_theta=250000.0, head_transform=False,
    tie_word_embeddings=False, decoder_bias=False, pad_token_id=128001, mask_token_id=128002)
MODERN_PRESETS: dict[str, ModernConfig] = {
    "modernbert_base": _MODERNBERT_BASE,
    "modernbert_large": _MODERNBERT_BASE.replace(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
        head_dim=64,
        intermediate_size=2624, layer_types=_every_third(28)),
    "eurobert_210m": _EUROBERT_210M,
}
# CPU-sized twins: 4 layers (global, local, local, global), a window shorter than a test
# sequence, GQA for EuroBERT.
MODERN_PRESETS["modernbert_micro"] = _MODERNBERT_BASE.replace(
    vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=16,
    num_key_value_heads=4, intermediate_size=96, layer_types=_every_third(4), local_attention=16,
    max_position_embeddings=128, pad_token_id=0, mask_token_id=4)
MODERN_PRESETS["eurobert_micro"] = _EUROBERT_210M.replace(
    vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128,
    pad_token_id=0, mask_token_id=4)


def modern_preset(name: str, **overrides: Any) -> ModernConfig:
  if name not in MODERN_PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODERN_PRESETS)}")
  return MODERN_PRESETS[name].replace(**overrides).validate()


__all__ = ["FAMILIES", "MODERN_PRESETS", "ModernConfig", "from_hf_config", "modern_preset",
           "to_hf_config"]
