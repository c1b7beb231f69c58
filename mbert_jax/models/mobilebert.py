"""The MobileBERT family in Flax linen: IB-BERT teacher, MobileBERT(-TINY), w/o OPT, BERT.

One module covers every architecture of the paper; the configuration picks the branches
(MobileBERT paper, Sec. 3 and Fig. 1). Parameters are float32 and annotated with logical axes;
computation runs in `compute_dtype`. The encoder is a scan over a stacked layer axis, so compile time does not grow
with depth and the first `num_layers` layers can run alone (progressive knowledge transfer).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mbert_jax.models.config import ModelConfig
from mbert_jax.models.layers import scanned_stack

Array = jax.Array


def check_call(cfg, input_ids: Array, num_layers: int | None) -> None:
  """What every encoder of the package refuses before tracing: a non-[batch, seq] input, a
  sequence beyond the position range, a layer count outside the stack."""
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
  if input_ids.shape[1] > cfg.max_position_embeddings:
    raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  if num_layers is not None and not 0 <= num_layers <= cfg.num_hidden_layers:
    raise ValueError(f"num_layers={num_layers} outside [0, {cfg.num_hidden_layers}]")


def batch_sharded(x: Array) -> Array:
  """Pins the leading (example) axis to the mesh axes of the logical "batch" rule when the
  trace runs under logical-axis rules and a mesh (`training.sharding.under_rules`); anywhere
  else a no-op. Without it XLA's sharding propagation may follow the fsdp-sharded weights and
  gather the whole global batch onto every device: the planner found IB-BERT-large's step at
  4096 x 512 on 512 v3 cores needing 2.3 TB of temporaries per device."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


@flax.struct.dataclass
class ModelOutput:
  """What pretraining and knowledge transfer need from one forward pass.

  `hidden_states`: embedding output, then one feature map per layer that ran ([B, T, H]);
    with `layer_outputs=False` only the last one (what the heads read).
  `attention_scores`: masked pre-softmax scores per layer ([B, heads, T, T], float32); ()
    with `layer_outputs=False`.
  `mlm_logits`: [B, P, V] at `masked_positions`, else [B, T, V] (float32).
  `qkv`: per layer that ran, (queries, keys, values) each [B, T, heads * head_dim] before the
    head split (compute dtype); only with `return_qkv=True` (relation transfer), else ().
  """
  mlm_logits: Array | None
  nsp_logits: Array
  pooled: Array
  hidden_states: tuple[Array, ...]
  attention_scores: tuple[Array, ...]
  qkv: tuple[tuple[Array, Array, Array], ...] = ()

  @property
  def last_hidden_state(self) -> Array:
    return self.hidden_states[-1]


def activation(name: str) -> Callable[[Array], Array]:
  # Hugging Face names: "gelu" is exact (erf), "gelu_new" the tanh form TF1 BERT computes.
  return {
      "relu": jax.nn.relu,
      "relu6": jax.nn.relu6,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "tanh": jnp.tanh,
      "silu": jax.nn.silu,
  }[name]


def _kernel_init(cfg: ModelConfig):
  if cfg.init_distribution == "truncated":
    return nn.initializers.truncated_normal(stddev=cfg.initializer_range)
  return nn.initializers.normal(stddev=cfg.initializer_range)


class Dense(nn.Module):
  """Dense layer whose kernel and bias carry logical axis names."""
  features: int
  axes: tuple[str | None, str | None]
  cfg: ModelConfig
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dtype = jnp.dtype(self.cfg.compute_dtype)
    kernel = self.param("kernel", nn.with_logical_partitioning(_kernel_init(self.cfg), self.axes),
                        (x.shape[-1], self.features), jnp.float32)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.features,), jnp.float32)
      y = y + bias.astype(dtype)
    return y


class Norm(nn.Module):
  """NoNorm (element-wise affine, paper eq. 1) or LayerNorm over the last axis.

  LayerNorm statistics are two-pass in float32: MobileBERT activations reach 1e7, where the
  one-pass E[x^2] - E[x]^2 form loses every significant digit.
  """
  kind: str
  eps: float
  axis_name: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (d,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                      (d,), jnp.float32)
    if self.kind == "no_norm":
      return (x * scale.astype(x.dtype) + bias.astype(x.dtype)).astype(self.dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centered = xf - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


def _norm(cfg: ModelConfig, axis_name: str, name: str, hf_eps_quirk: bool = False) -> Norm:
  eps = 1e-5 if (hf_eps_quirk and cfg.hf_layer_norm_eps_quirk) else cfg.layer_norm_eps
  return Norm(cfg.normalization_type, eps, axis_name, jnp.dtype(cfg.compute_dtype), name=name)


class Embeddings(nn.Module):
  """Word lookup, trigram concat (next, current, previous) + dense, positions, types, norm."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    words = WordEmbeddings(cfg, name="word_embeddings")(input_ids).astype(dtype)
    if cfg.trigram_input:
      # The paper's "kernel-3 convolution": zero vectors (not [PAD]) beyond both ends.
      nxt = jnp.pad(words[:, 1:], ((0, 0), (0, 1), (0, 0)))
      prev = jnp.pad(words[:, :-1], ((0, 0), (1, 0), (0, 0)))
      words = jnp.concatenate([nxt, words, prev], axis=-1)
    if cfg.has_embedding_transformation:
      words = Dense(cfg.hidden_size, ("embed_in", "embed"), cfg,
                    name="embedding_transformation")(words)
    pos = PositionEmbeddings(cfg, name="position_embeddings")(input_ids.shape[1]).astype(dtype)
    types = TypeEmbeddings(cfg, name="token_type_embeddings")(token_type_ids).astype(dtype)
    x = words + pos[None] + types
    x = _norm(cfg, "embed", "norm", hf_eps_quirk=True)(x)
    return batch_sharded(nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic))


class WordEmbeddings(nn.Module):
  cfg: ModelConfig

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(_kernel_init(self.cfg), ("vocab", "embed_table")),
        (self.cfg.vocab_size, self.cfg.embedding_size), jnp.float32)

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding, ids, axis=0)


class PositionEmbeddings(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, seq_len: int) -> Array:
    table = self.param(
        "embedding", nn.with_logical_partitioning(_kernel_init(self.cfg), ("positions", "embed")),
        (self.cfg.max_position_embeddings, self.cfg.hidden_size), jnp.float32)
    return table[:seq_len]


class TypeEmbeddings(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    table = self.param(
        "embedding", nn.with_logical_partitioning(_kernel_init(self.cfg), ("types", "embed")),
        (self.cfg.type_vocab_size, self.cfg.hidden_size), jnp.float32)
    return jnp.take(table, ids, axis=0)


class BottleneckLayer(nn.Module):
  """Dense(h_inter -> h_intra) + Norm: the input and the shared query/key bottlenecks."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    y = Dense(cfg.intra_bottleneck_size, ("embed", "intra"), cfg, name="dense")(x)
    return _norm(cfg, "intra", "norm")(y)


class AddNorm(nn.Module):
  """Dense, (dropout where plain BERT has it), residual add, Norm: every post-norm sub-layer."""
  cfg: ModelConfig
  features: int
  axes: tuple[str, str]
  deterministic: bool
  dropout: bool = False
  hf_eps_quirk: bool = False

  @nn.compact
  def __call__(self, h: Array, residual: Array) -> Array:
    cfg = self.cfg
    y = Dense(self.features, self.axes, cfg, name="dense")(h)
    if self.dropout:
      y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=self.deterministic)
    return _norm(cfg, self.axes[1], "norm", hf_eps_quirk=self.hf_eps_quirk)(y + residual)


class FeedForward(nn.Module):
  """One of the stacked FFNs: intermediate (Dense + act), then output AddNorm."""
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, h: Array) -> Array:
    cfg = self.cfg
    inner = activation(cfg.hidden_act)(
        Dense(cfg.intermediate_size, ("intra", "mlp"), cfg, name="intermediate")(h))
    return AddNorm(cfg, cfg.true_hidden_size, ("mlp", "intra"), self.deterministic,
                   name="output")(inner, h)


class FinalOutput(nn.Module):
  """The last FFN's output AddNorm, then the output bottleneck back to h_inter."""
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, inner: Array, h: Array, x: Array) -> Array:
    cfg = self.cfg
    y = Dense(cfg.true_hidden_size, ("mlp", "intra"), cfg, name="dense")(inner)
    if not cfg.use_bottleneck:
      y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=self.deterministic)
    y = _norm(cfg, "intra", "norm", hf_eps_quirk=True)(y + h)
    if not cfg.use_bottleneck:
      return y
    return AddNorm(cfg, cfg.hidden_size, ("intra", "embed"), self.deterministic, dropout=True,
                   name="bottleneck")(y, x)


class SelfAttention(nn.Module):
  """Multi-head attention; returns the AddNorm'd output, the masked pre-softmax scores and the
  (query, key, value) projections before the head split."""
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, q_in, k_in, v_in, layer_input, mask_bias):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    n, hd = cfg.num_attention_heads, cfg.head_dim
    qk_axis = "intra" if cfg.attention_input_size == cfg.intra_bottleneck_size and cfg.use_bottleneck else "embed"
    v_axis = "intra" if cfg.value_input_size == cfg.intra_bottleneck_size and cfg.use_bottleneck else "embed"
    split = lambda t: t.reshape(t.shape[:-1] + (n, hd))
    flat_q = Dense(cfg.true_hidden_size, (qk_axis, "qkv"), cfg, name="query")(q_in)
    flat_k = Dense(cfg.true_hidden_size, (qk_axis, "qkv"), cfg, name="key")(k_in)
    flat_v = Dense(cfg.true_hidden_size, (v_axis, "qkv"), cfg, name="value")(v_in)
    q, k, v = split(flat_q), split(flat_k), split(flat_v)
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k,
                        preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
    scores = batch_sharded(scores + mask_bias)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=self.deterministic)
    context = jnp.einsum("bnqk,bknd->bqnd", probs.astype(dtype), v)
    context = context.reshape(context.shape[:2] + (n * hd,))
    out = AddNorm(cfg, cfg.true_hidden_size, ("qkv", "intra"), self.deterministic,
                  dropout=not cfg.use_bottleneck, name="output")(context, layer_input)
    return out, scores, (flat_q, flat_k, flat_v)


class Block(nn.Module):
  """One transformer block (bottlenecks, stacked FFNs, NoNorm as the config says); scanned, so
  it returns (carry, per-layer outputs).

  The per-layer outputs carry Q/K/V only with `return_qkv`: as scan outputs they would be
  stacked over layers, i.e. materialised, even when nothing reads them. For the same reason
  `layer_outputs=False` returns none at all: under `jax.grad` an unread stacked output still
  gets a stacked zero cotangent ([L, B, heads, T, T] for the scores) that the backward loop
  reads layer by layer.
  """
  cfg: ModelConfig
  deterministic: bool = True
  return_qkv: bool = False
  layer_outputs: bool = True

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array) -> tuple[Array, tuple[Any, ...]]:
    cfg = self.cfg
    x = batch_sharded(x)
    if cfg.use_bottleneck:
      layer_input = BottleneckLayer(cfg, name="bottleneck_input")(x)
      if cfg.use_bottleneck_attention:      # TINY: Q, K, V all from the input bottleneck
        q_in = k_in = v_in = layer_input
      elif cfg.key_query_shared_bottleneck:  # MobileBERT: values from the wide block input
        q_in = k_in = BottleneckLayer(cfg, name="bottleneck_attention")(x)
        v_in = x
      else:                                  # IB-BERT teacher: Q, K, V from the block input
        q_in = k_in = v_in = x
    else:
      layer_input = q_in = k_in = v_in = x
    h, scores, qkv = SelfAttention(cfg, self.deterministic, name="attention")(
        q_in, k_in, v_in, layer_input, mask_bias)
    for j in range(cfg.num_feedforward_networks - 1):
      h = FeedForward(cfg, self.deterministic, name=f"ffn_{j}")(h)
    inner = activation(cfg.hidden_act)(
        Dense(cfg.intermediate_size, ("intra", "mlp"), cfg, name="intermediate")(h))
    y = batch_sharded(FinalOutput(cfg, self.deterministic, name="output")(inner, h, x))
    if not self.layer_outputs:
      return y, ()
    return y, (y, scores, qkv) if self.return_qkv else (y, scores)


class Encoder(nn.Module):
  """Scans `Block` over a stacked layer axis; `num_layers` runs only the first layers.

  Returns per-layer (hidden states, attention scores, (q, k, v) or () without `return_qkv`);
  with `layer_outputs=False` only ((last hidden state,), (), ()).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array, deterministic: bool, num_layers: int | None,
               return_qkv: bool = False, layer_outputs: bool = True
               ) -> tuple[tuple[Array, ...], tuple[Array, ...],
                          tuple[tuple[Array, Array, Array], ...]]:
    cfg = self.cfg
    total = cfg.num_hidden_layers
    k = total if num_layers is None else num_layers
    layer_outputs = layer_outputs or return_qkv
    if k != total and not self.is_initializing():
      last, per_layer = self._first_layers(x, mask_bias, deterministic, k, return_qkv,
                                           layer_outputs)
    else:
      scanned = scanned_stack(Block, cfg, k, in_axes=(nn.broadcast,))
      last, per_layer = scanned(cfg, deterministic, return_qkv, layer_outputs,
                                name="layers")(x, mask_bias)
    if not layer_outputs:
      return (last,), (), ()
    states, scores = per_layer[0], per_layer[1]
    hidden = tuple(states[i] for i in range(k))
    qkv = ()
    if return_qkv:
      qkv = tuple(tuple(t[i] for t in per_layer[2]) for i in range(k))
    return hidden, tuple(scores[i] for i in range(k)), qkv

  def _first_layers(self, x: Array, mask_bias: Array, deterministic: bool, k: int,
                    return_qkv: bool, layer_outputs: bool) -> tuple[Array, tuple[Array, ...]]:
    """Runs layers 0..k-1 of the stacked parameters. A deeper stack (a teacher, an
    evaluation) is read in place: a loop of length k indexes layer i of the whole stack, where
    scanning a slice `params[:k]` would copy k layers of weights and pad their gradients back
    to full depth. A stack of exactly k layers (what the training step differentiates in a
    truncated phase) is scanned over directly."""
    cfg = self.cfg
    stacked = nn.unbox(self.variables["params"]["layers"])
    block = Block(cfg, deterministic, return_qkv, layer_outputs, parent=None)
    rng = None if deterministic else self.make_rng("dropout")

    def run(h, i, params):
      rngs = {} if rng is None else {"dropout": jax.random.fold_in(rng, i)}
      return block.apply({"params": params}, h, mask_bias, rngs=rngs)

    unroll = 1 if cfg.scan_layers else k
    if jax.tree.leaves(stacked)[0].shape[0] == k:
      # A stack already cut to the k layers (the training step's narrowed tree): scan over it.
      # Its gradients come out stacked, where indexing a closed-over stack would add a
      # stack-sized cotangent every backward iteration (~15% slower per layer).
      layer = lambda h, xs: run(h, xs[0], xs[1])
      return jax.lax.scan(jax.checkpoint(layer) if cfg.remat else layer, x,
                          (jnp.arange(k), stacked), unroll=unroll)
    layer = lambda h, i: run(
        h, i, jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked))
    return jax.lax.scan(jax.checkpoint(layer) if cfg.remat else layer, x, jnp.arange(k),
                        unroll=unroll)


class HeadTransform(nn.Module):
  """Dense, act, then ALWAYS a real LayerNorm, even in NoNorm models (it tames 1e7 activations)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h: Array) -> Array:
    cfg = self.cfg
    h = activation(cfg.hidden_act)(Dense(cfg.hidden_size, ("embed", "embed_out"), cfg,
                                         name="dense")(h))
    return Norm("layer_norm", cfg.layer_norm_eps, "embed_out", jnp.dtype(cfg.compute_dtype),
                name="norm")(h)


class MLMPredictions(nn.Module):
  """Logits = h[:E] @ word_table.T + h[E:] @ extra_output_weights.T + output_bias."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h: Array, word_embeddings: Array) -> Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    h = HeadTransform(cfg, name="transform")(h)
    e = cfg.embedding_size
    word = word_embeddings.astype(dtype)
    extra = None
    if cfg.has_extra_output_weights:
      extra = self.param(
          "extra_output_weights",
          nn.with_logical_partitioning(_kernel_init(cfg), ("vocab", "extra")),
          (cfg.vocab_size, cfg.hidden_size - e), jnp.float32).astype(dtype)
    bias = self.param("output_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (cfg.vocab_size,), jnp.float32)
    dot = lambda x, table: jnp.dot(x, table.T, preferred_element_type=jnp.float32)
    if extra is None:
      return dot(h[..., :e], word) + bias
    if math.prod(h.shape[:-1]) < cfg.hidden_size:  # few rows: the masked positions
      return dot(h[..., :e], word) + dot(h[..., e:], extra) + bias
    # Many rows (every position of a batch): one H-wide product over the joined table beats
    # an E-wide plus an (H-E)-wide one summed (a 128-wide contraction runs at half the matmul
    # rate, and the sum is another pass over the [rows, V] logits); for a few rows joining the
    # [V, H] table costs more than it saves.
    return dot(h, jnp.concatenate([word, extra], axis=1)) + bias


class PretrainingHeads(nn.Module):
  """`cls/predictions` (MLM) and `cls/seq_relationship` (NSP), named as TF1 and HF name them."""
  cfg: ModelConfig

  def setup(self):
    self.predictions = MLMPredictions(self.cfg)
    self.seq_relationship = Dense(2, ("embed_out", "classes"), self.cfg)

  def mlm(self, h: Array, word_embeddings: Array) -> Array:
    return self.predictions(h, word_embeddings)

  def nsp(self, pooled: Array) -> Array:
    return self.seq_relationship(pooled).astype(jnp.float32)


class Pooler(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, first: Array) -> Array:
    return jnp.tanh(Dense(self.cfg.hidden_size, ("embed", "embed_out"), self.cfg, name="dense")(first))


class MobileBert(nn.Module):
  """Backbone + pooler + pretraining heads. See `ModelOutput` for what a call returns."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embeddings = Embeddings(cfg)
    self.encoder = Encoder(cfg)
    if cfg.classifier_activation:
      self.pooler = Pooler(cfg)
    self.cls = PretrainingHeads(cfg)

  def __call__(self, input_ids: Array, token_type_ids: Array | None = None,
               attention_mask: Array | None = None, masked_positions: Array | None = None,
               deterministic: bool = True, num_layers: int | None = None,
               heads: bool = True, return_qkv: bool = False,
               layer_outputs: bool = True) -> ModelOutput:
    cfg = self.cfg
    check_call(cfg, input_ids, num_layers)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)

    x = self.embeddings(input_ids, token_type_ids, deterministic)
    mask_bias = self.mask_bias(attention_mask)
    if num_layers == 0:
      layer_states, scores, qkv = (), (), ()
    else:
      layer_states, scores, qkv = self.encoder(x, mask_bias, deterministic, num_layers,
                                               return_qkv, layer_outputs)
    hidden = (x,) + layer_states if layer_outputs or return_qkv else layer_states[-1:] or (x,)
    seq = hidden[-1]

    first = seq[:, 0]
    pooled = self.pooler(first) if cfg.classifier_activation else first
    nsp_logits = self.cls.nsp(pooled)
    mlm_logits = None
    if heads:
      if masked_positions is not None:
        # Gathering first is what makes the 30k-vocabulary head cheap.
        seq = jnp.take_along_axis(seq, masked_positions[..., None].astype(jnp.int32), axis=1)
      mlm_logits = self.cls.mlm(seq, self.word_table())
    return ModelOutput(mlm_logits=mlm_logits, nsp_logits=nsp_logits, pooled=pooled,
                       hidden_states=hidden, attention_scores=scores, qkv=qkv)

  def word_table(self) -> Array:
    return nn.unbox(self.embeddings.variables["params"]["word_embeddings"]["embedding"])

  def mask_bias(self, attention_mask: Array) -> Array:
    value = self.cfg.attention_mask_value
    if value is None:
      value = float(jnp.finfo(jnp.float32).min)
    keep = attention_mask.astype(jnp.float32)[:, None, None, :]
    return (1.0 - keep) * value


class _Backbone(nn.Module):
  """Embeddings + encoder (+ pooler), for the fine-tuning models."""
  cfg: ModelConfig

  def setup(self):
    self.embeddings = Embeddings(self.cfg)
    self.encoder = Encoder(self.cfg)
    if self.cfg.classifier_activation:
      self.pooler = Pooler(self.cfg)

  def features(self, input_ids, token_type_ids, attention_mask, deterministic):
    cfg = self.cfg
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids, deterministic)
    value = cfg.attention_mask_value
    value = float(jnp.finfo(jnp.float32).min) if value is None else value
    bias = (1.0 - attention_mask.astype(jnp.float32)[:, None, None, :]) * value
    states, _, _ = self.encoder(x, bias, deterministic, None, layer_outputs=False)
    seq = states[-1] if states else x
    pooled = self.pooler(seq[:, 0]) if cfg.classifier_activation else seq[:, 0]
    return seq, pooled


class SequenceClassifier(_Backbone):
  """GLUE-style head on the pooled [CLS] (TF1 run_classifier: dropout 0.1, then Dense).

  `num_labels == 1` is regression (STS-B). Parameter names match Hugging Face's
  `MobileBertForSequenceClassification` (`classifier`).
  """
  num_labels: int = 2
  classifier_dropout: float = 0.1

  def setup(self):
    super().setup()
    self.classifier = Dense(self.num_labels, ("embed_out", "classes"), self.cfg)
    self.dropout = nn.Dropout(self.classifier_dropout)

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, deterministic=True):
    _, pooled = self.features(input_ids, token_type_ids, attention_mask, deterministic)
    pooled = self.dropout(pooled, deterministic=deterministic)
    return self.classifier(pooled).astype(jnp.float32)


class SpanExtractor(_Backbone):
  """SQuAD head: start/end logits from every position (`qa_outputs`, as Hugging Face)."""

  def setup(self):
    super().setup()
    self.qa_outputs = Dense(2, ("embed_out", "classes"), self.cfg)

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, deterministic=True):
    seq, _ = self.features(input_ids, token_type_ids, attention_mask, deterministic)
    logits = self.qa_outputs(seq).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]
