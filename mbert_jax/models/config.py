"""One configuration schema for the whole MobileBERT family.

Field names follow Hugging Face `MobileBertConfig` so a config.json round-trips; the IB-BERT
teacher needs no extra field: with `use_bottleneck=True` and neither
`key_query_shared_bottleneck` nor `use_bottleneck_attention`, queries, keys and values all come
from the wide block input (the third branch of the TF1 code, which Hugging Face cannot build).
Fields after the Hugging Face ones are mbert-jax's own (numerics, compilation, compatibility).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ACTIVATIONS = ("relu", "relu6", "gelu", "gelu_new", "tanh", "silu")
NORMALIZATIONS = ("no_norm", "layer_norm")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # --- Hugging Face MobileBertConfig fields (same names, same defaults) ---
  vocab_size: int = 30522
  hidden_size: int = 512
  num_hidden_layers: int = 24
  num_attention_heads: int = 4
  intermediate_size: int = 512
  hidden_act: str = "relu"
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  embedding_size: int = 128
  trigram_input: bool = True
  use_bottleneck: bool = True
  intra_bottleneck_size: int = 128
  use_bottleneck_attention: bool = False
  key_query_shared_bottleneck: bool = True
  num_feedforward_networks: int = 4
  normalization_type: str = "no_norm"
  classifier_activation: bool = True
  # --- mbert-jax fields ---
  # Hugging Face builds two LayerNorms without `eps` (torch default 1e-5): the embedding norm
  # and the norm after the final FFN. True reproduces that; TF1 uses layer_norm_eps everywhere.
  hf_layer_norm_eps_quirk: bool = False
  # Additive bias on masked keys; None = most negative finite value of the compute dtype.
  # -10000.0 reproduces the v2020 TF1 release. Never -inf (0 * -inf = NaN in attention KL).
  attention_mask_value: float | None = None
  compute_dtype: str = "float32"  # params stay float32
  scan_layers: bool = True  # compile time flat in depth
  remat: bool = False  # recompute each layer in the backward pass
  # "truncated" matches TF1 (truncated_normal); "normal" matches Hugging Face.
  init_distribution: str = "truncated"

  # ---------------------------------------------------------------- derived
  @property
  def true_hidden_size(self) -> int:
    """Width inside a block (h_intra)."""
    return self.intra_bottleneck_size if self.use_bottleneck else self.hidden_size

  @property
  def attention_input_size(self) -> int:
    """Width of the tensor queries and keys are projected from."""
    if self.use_bottleneck and (self.use_bottleneck_attention or self.key_query_shared_bottleneck):
      return self.intra_bottleneck_size
    return self.hidden_size

  @property
  def value_input_size(self) -> int:
    if self.use_bottleneck and self.use_bottleneck_attention:
      return self.intra_bottleneck_size
    return self.hidden_size

  @property
  def head_dim(self) -> int:
    return self.true_hidden_size // self.num_attention_heads

  @property
  def has_embedding_transformation(self) -> bool:
    return self.trigram_input or self.embedding_size != self.hidden_size

  @property
  def has_extra_output_weights(self) -> bool:
    return self.hidden_size != self.embedding_size

  @property
  def hf_representable(self) -> bool:
    """Hugging Face projects Q/K from `true_hidden_size`: with a bottleneck, one must feed them."""
    if not self.use_bottleneck:
      return True
    return self.use_bottleneck_attention or self.key_query_shared_bottleneck

  # ---------------------------------------------------------------- checks
  def validate(self, max_seq_length: int | None = None) -> "ModelConfig":
    """Raises ValueError naming the field of a config that cannot work."""
    def bad(field: str, why: str):
      raise ValueError(f"model config: `{field}` = {getattr(self, field)!r}: {why}")

    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "type_vocab_size",
              "embedding_size", "intra_bottleneck_size"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        bad(f, "must be a positive integer")
    if self.num_feedforward_networks < 1:
      bad("num_feedforward_networks", "a block needs at least one feed-forward network")
    if self.hidden_act not in ACTIVATIONS:
      bad("hidden_act", f"unknown activation; choose one of {ACTIVATIONS}")
    if self.normalization_type not in NORMALIZATIONS:
      bad("normalization_type", f"unknown normalization; choose one of {NORMALIZATIONS}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      bad("compute_dtype", f"choose one of {COMPUTE_DTYPES}")
    if self.init_distribution not in ("truncated", "normal"):
      bad("init_distribution", "choose 'truncated' or 'normal'")
    if self.true_hidden_size % self.num_attention_heads:
      bad("num_attention_heads",
          f"must divide the attention width {self.true_hidden_size} "
          f"({'intra_bottleneck_size' if self.use_bottleneck else 'hidden_size'})")
    for f in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      if not 0.0 <= getattr(self, f) < 1.0:
        bad(f, "must be in [0, 1)")
    if self.pad_token_id < 0 or self.pad_token_id >= self.vocab_size:
      bad("pad_token_id", f"must index the vocabulary of {self.vocab_size}")
    if self.layer_norm_eps <= 0:
      bad("layer_norm_eps", "must be positive")
    if self.embedding_size > self.hidden_size and not self.has_embedding_transformation:
      bad("embedding_size", "larger than hidden_size needs an embedding transformation")
    if max_seq_length is not None and max_seq_length > self.max_position_embeddings:
      raise ValueError(
          f"model config: `max_position_embeddings` = {self.max_position_embeddings} is shorter "
          f"than the sequence length {max_seq_length}")
    return self

  # ---------------------------------------------------------------- conversion
  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a mapping, rejecting unknown fields by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"model config: unknown field(s) {unknown}")
    return cls(**dict(d))

  HF_FIELDS = (
      "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
      "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
      "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps",
      "pad_token_id", "embedding_size", "trigram_input", "use_bottleneck",
      "intra_bottleneck_size", "use_bottleneck_attention", "key_query_shared_bottleneck",
      "num_feedforward_networks", "normalization_type", "classifier_activation")


def from_hf_config(d: Mapping[str, Any]) -> ModelConfig:
  """A Hugging Face `config.json` (MobileBERT or BERT) as a ModelConfig.

  Hugging Face semantics are kept: `gelu` means the exact erf form, and the two eps-less
  LayerNorms of its MobileBERT use 1e-5.
  """
  model_type = d.get("model_type", "mobilebert")
  if model_type == "bert":
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_act", "gelu"),
        hidden_dropout_prob=d.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=d.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=d.get("max_position_embeddings", 512),
        type_vocab_size=d.get("type_vocab_size", 2),
        initializer_range=d.get("initializer_range", 0.02),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12), pad_token_id=d.get("pad_token_id", 0),
        embedding_size=d["hidden_size"], trigram_input=False, use_bottleneck=False,
        intra_bottleneck_size=d["hidden_size"], use_bottleneck_attention=False,
        key_query_shared_bottleneck=False, num_feedforward_networks=1,
        normalization_type="layer_norm", classifier_activation=True,
        init_distribution="normal")
  if model_type != "mobilebert":
    raise ValueError(f"Hugging Face config: model_type {model_type!r} is neither 'mobilebert' "
                     "nor 'bert'")
  hf_defaults = ModelConfig()
  kwargs = {name: d.get(name, getattr(hf_defaults, name)) for name in ModelConfig.HF_FIELDS}
  return ModelConfig(**kwargs, hf_layer_norm_eps_quirk=True, init_distribution="normal")


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """Every architecture field written explicitly (HF defaults differ from the released model)."""
  if not cfg.hf_representable:
    raise ValueError(
        "Hugging Face MobileBERT cannot represent this model: queries and keys come from the "
        f"{cfg.hidden_size}-wide block input while Hugging Face projects them from "
        f"true_hidden_size={cfg.true_hidden_size} (the IB-BERT teacher layout). "
        "Export it with --format=flax instead.")
  d = {name: getattr(cfg, name) for name in ModelConfig.HF_FIELDS}
  if not cfg.use_bottleneck:
    # HF always builds Q/K from true_hidden_size (= hidden_size here); keep flags consistent.
    d["key_query_shared_bottleneck"] = False
    d["use_bottleneck_attention"] = False
  if cfg.use_bottleneck_attention:
    d["key_query_shared_bottleneck"] = False
  d.update(model_type="mobilebert", architectures=["MobileBertForPreTraining"],
           true_hidden_size=cfg.true_hidden_size, tie_word_embeddings=True)
  return d


# ------------------------------------------------------------------ presets
_MOBILEBERT = ModelConfig()  # HF defaults = released student, except the pooler:
PRESETS: dict[str, ModelConfig] = {
    # google/mobilebert-uncased (TF1 uncased_L-24_H-128_B-512_A-4_F-4_OPT.json)
    "mobilebert": _MOBILEBERT.replace(classifier_activation=False),
    # uncased_L-24_H-128_B-512_A-4_F-2_tiny_OPT.json
    "mobilebert_tiny": _MOBILEBERT.replace(
        classifier_activation=False, use_bottleneck_attention=True,
        key_query_shared_bottleneck=False, num_feedforward_networks=2),
    # "w/o OPT": LayerNorm + GELU (tanh form, as the TF1 code computes it)
    "mobilebert_no_opt": _MOBILEBERT.replace(
        classifier_activation=False, normalization_type="layer_norm", hidden_act="gelu_new"),
    # IB-BERT-large teacher (uncased_L-24_H-1024_B-512_A-4.json + TF1 BertConfig defaults)
    "ib_bert_large": _MOBILEBERT.replace(
        hidden_act="gelu_new", hidden_dropout_prob=0.1, intermediate_size=4096,
        intra_bottleneck_size=1024, key_query_shared_bottleneck=False,
        num_feedforward_networks=1, normalization_type="layer_norm",
        classifier_activation=True),
    "bert_base": ModelConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu_new", hidden_dropout_prob=0.1, embedding_size=768, trigram_input=False,
        use_bottleneck=False, intra_bottleneck_size=768, key_query_shared_bottleneck=False,
        num_feedforward_networks=1, normalization_type="layer_norm", classifier_activation=True),
}
PRESETS["bert_large"] = PRESETS["bert_base"].replace(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    embedding_size=1024, intra_bottleneck_size=1024)


def _micro(cfg: ModelConfig, **extra: Any) -> ModelConfig:
  """Same architecture, CPU size: keeps every op of the family exercised."""
  base = dict(vocab_size=1024, num_hidden_layers=4, max_position_embeddings=128)
  if cfg.use_bottleneck:
    scale = dict(hidden_size=64, embedding_size=16,
                 intra_bottleneck_size=32 if cfg.intra_bottleneck_size < cfg.hidden_size else 128,
                 intermediate_size=64 if cfg.intermediate_size <= cfg.hidden_size else 256)
  else:
    scale = dict(hidden_size=64, embedding_size=64, intra_bottleneck_size=64,
                 intermediate_size=256, num_attention_heads=4)
  return cfg.replace(**{**base, **scale, **extra})


# "_micro": CPU-sized twins for tests and the demo ("tiny" is the paper's MobileBERT-TINY).
for _name in list(PRESETS):
  PRESETS[_name + "_micro"] = _micro(PRESETS[_name])
del _name


def preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides).validate()


def table_size_for(model_vocab_size: int | None, tokenizer_size: int) -> int:
  """The embedding table's size for a tokenizer of `tokenizer_size` tokens: `model.vocab_size`
  -1 (or None) follows the tokenizer; a larger table (padded for the hardware, or a
  checkpoint's own) is kept; a smaller one cannot embed every id and is refused."""
  if model_vocab_size in (-1, None):
    return int(tokenizer_size)
  if int(model_vocab_size) < int(tokenizer_size):
    raise ValueError(f"model.vocab_size = {model_vocab_size} but the tokenizer has "
                     f"{tokenizer_size} tokens; set model.vocab_size=-1 to follow the tokenizer")
  return int(model_vocab_size)
