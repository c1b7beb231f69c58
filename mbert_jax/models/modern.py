"""Pre-norm rotary encoders in Flax linen: ModernBERT (Ettin, mmBERT) and EuroBERT.

One module, options from `ModernConfig`: rotary positions with a theta per layer kind, a
gated MLP (fused or separate input projections; GeGLU or SiLU-gated by `hidden_act`), pre-norm
blocks (LayerNorm with or without bias, or RMSNorm; layer 0 optionally without its attention
norm) and a final norm, a fused or separate Q/K/V projection, grouped-query attention, and
sliding-window attention on the layers `layer_types` marks as such.

The layers are scanned over a stacked layer axis under `encoder/layers/`, as in MobileBERT.
Scanned layers share one parameter structure, so what differs between layers is data, indexed
by the layer number the scan carries: whether attention is global (which rotary table and
which mask it reads) and whether its input is normalised (ModernBERT's layer 0 is not; its
`attn_norm` slice exists but is bypassed, so it gets no gradient and import writes identity).

Outputs follow Hugging Face's eager attention exactly, padding included: `hidden_states` are
the embedding output, then every layer's output with the final norm applied to the last one
(what `output_hidden_states` gives); `attention_scores` are the masked pre-softmax scores per
query head (local layers: the full [T, T] map, out-of-window keys at the mask value).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mbert_jax.models.layers import scanned_stack
from mbert_jax.models.mobilebert import ModelOutput, batch_sharded, check_call
from mbert_jax.models.modern_config import ModernConfig

Array = jax.Array


def activation(name: str):
  # Hugging Face's ACT2FN names: "gelu" is the exact (erf) form.
  return {
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
  }[name]


def _init(cfg: ModernConfig, output: bool = False):
  # ModernBERT scales the projections that write into the residual stream by 1/sqrt(2L),
  # so that the stream's variance does not grow with depth; EuroBERT uses one std.
  std = cfg.initializer_range
  if output and cfg.family == "modernbert":
    std /= math.sqrt(2.0 * cfg.num_hidden_layers)
  return nn.initializers.truncated_normal(stddev=std)


class Projection(nn.Module):
  """x @ kernel (+ bias), kernel [in, *features] with logical axes: a fused projection keeps
  its parts on an axis of their own, so a sharded output axis never straddles two parts."""
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  cfg: ModernConfig
  use_bias: bool
  output: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dtype = jnp.dtype(self.cfg.compute_dtype)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(_init(self.cfg, self.output), self.axes),
        (x.shape[-1],) + tuple(self.features), jnp.float32)
    y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=1)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[1:]),
                        tuple(self.features), jnp.float32)
      y = y + bias.astype(dtype)
    return y


class Normalization(nn.Module):
  """LayerNorm (bias optional) or RMSNorm over the last axis, statistics in float32."""
  kind: str
  eps: float
  use_bias: bool
  axis_name: str = "embed"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (d,), jnp.float32)
    xf = x.astype(jnp.float32)
    if self.kind == "rms_norm":
      y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
      return (y * scale).astype(self.dtype)
    centered = xf - jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + self.eps) * scale
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (self.axis_name,)),
                        (d,), jnp.float32)
      y = y + bias
    return y.astype(self.dtype)


def _norm(cfg: ModernConfig, name: str, axis_name: str = "embed") -> Normalization:
  return Normalization(cfg.norm_type, cfg.norm_eps, cfg.norm_bias, axis_name,
                       jnp.dtype(cfg.compute_dtype), name=name)


# ---------------------------------------------------------------------------- rotary
def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos and sin [T, head_dim] for positions 0..T-1, both halves of the head repeating the
  frequencies (the rotate-half layout of Hugging Face's Llama-style RoPE)."""
  # Float32 throughout, as transformers computes them: the tables are constants of the trace.
  inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                          / np.float32(head_dim)))
  freqs = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
  emb = np.concatenate([freqs, freqs], axis=-1)
  return jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32)


def rotate(x: Array, cos: Array, sin: Array) -> Array:
  """Rotary embedding of x [B, T, heads, head_dim] in float32."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def mask_biases(cfg: ModernConfig, attention_mask: Array) -> tuple[Array, Array | None]:
  """Additive biases of the global [B, 1, 1, T] and (if any layer is local) the sliding
  [B, 1, T, T] attention: 0 where a key is visible, the mask value where not (never summed,
  so never -inf)."""
  value = cfg.attention_mask_value
  value = float(jnp.finfo(jnp.float32).min) if value is None else value
  keep = attention_mask.astype(bool)[:, None, None, :]
  full = jnp.where(keep, 0.0, value).astype(jnp.float32)
  if not cfg.has_local_layers:
    return full, None
  t = attention_mask.shape[1]
  pos = jnp.arange(t)
  band = jnp.abs(pos[:, None] - pos[None, :]) <= cfg.half_window
  sliding = jnp.where(keep & band[None, None], 0.0, value).astype(jnp.float32)
  return full, sliding


# ---------------------------------------------------------------------------- layers
class RotaryAttention(nn.Module):
  """Multi-head (grouped-query when num_key_value_heads < heads) attention with rotary
  queries and keys. Returns the output projection, the masked scores per query head and the
  flat (q, k, v) projections before rotation."""
  cfg: ModernConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, bias: Array):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    n, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if cfg.fused_qkv:
      qkv = Projection((3, n * hd), ("embed", None, "qkv"), cfg, cfg.attention_bias,
                       name="qkv")(x)
      flat_q, flat_k, flat_v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    else:
      proj = lambda heads, name: Projection((heads * hd,), ("embed", "qkv"), cfg,
                                            cfg.attention_bias, name=name)(x)
      flat_q, flat_k, flat_v = proj(n, "query"), proj(kv, "key"), proj(kv, "value")
    b, t = x.shape[:2]
    q = rotate(flat_q.reshape(b, t, n, hd), cos, sin)
    k = rotate(flat_k.reshape(b, t, kv, hd), cos, sin)
    v = flat_v.reshape(b, t, kv, hd)
    # Query head h reads key/value head h // groups (Hugging Face's repeat_kv order).
    g = cfg.num_kv_groups
    qg = q.reshape(b, t, kv, g, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    scores = batch_sharded(scores.reshape(b, n, t, t) * (1.0 / math.sqrt(hd)) + bias)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=self.deterministic)
    context = jnp.einsum("bkgqs,bskd->bqkgd", probs.reshape(b, kv, g, t, t).astype(dtype), v)
    out = Projection((cfg.hidden_size,), ("qkv", "embed"), cfg, cfg.attention_bias,
                     output=True, name="output")(context.reshape(b, t, n * hd))
    out = nn.Dropout(cfg.attention_output_dropout)(out, deterministic=self.deterministic)
    return out, scores, (flat_q, flat_k, flat_v)


class GatedMLP(nn.Module):
  """output(act(x W_gate) * (x W_lin)): GeGLU with gelu, SwiGLU with silu. A fused `wi`
  kernel [H, 2, I] holds the activated half at index 0 (ModernBERT's `Wi` rows [:I]) and the
  linear half at 1; separate ones are `gate` (activated) and `up` (linear), as Llama names
  them."""
  cfg: ModernConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    i = cfg.intermediate_size
    if cfg.fused_mlp:
      wi = Projection((2, i), ("embed", None, "mlp"), cfg, cfg.mlp_bias, name="wi")(x)
      gate, lin = wi[..., 0, :], wi[..., 1, :]
    else:
      proj = lambda name: Projection((i,), ("embed", "mlp"), cfg, cfg.mlp_bias, name=name)(x)
      gate, lin = proj("gate"), proj("up")
    h = nn.Dropout(cfg.mlp_dropout)(activation(cfg.hidden_act)(gate) * lin,
                                    deterministic=self.deterministic)
    return Projection((cfg.hidden_size,), ("mlp", "embed"), cfg, cfg.mlp_bias, output=True,
                      name="output")(h)


class PreNormBlock(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(.)); scanned, so it returns (carry, per-layer
  outputs) and takes its layer number as the scanned input."""
  cfg: ModernConfig
  deterministic: bool = True
  return_qkv: bool = False
  layer_outputs: bool = True

  @nn.compact
  def __call__(self, x: Array, tables: tuple, layer: Array):
    cfg = self.cfg
    x = batch_sharded(x)
    attn_in = _norm(cfg, "attn_norm")(x)
    if not all(cfg.attention_norm_layers):
      attn_in = jnp.where(jnp.asarray(cfg.attention_norm_layers)[layer], attn_in, x)
    (cos, sin, bias), local = tables[0], tables[1]
    if local is not None:
      is_global = jnp.asarray(cfg.global_layers)[layer]
      cos, sin, bias = (jnp.where(is_global, a, b) for a, b in zip((cos, sin, bias), local))
    h, scores, qkv = RotaryAttention(cfg, self.deterministic, name="attention")(
        attn_in, cos, sin, bias)
    x = x + h
    y = batch_sharded(x + GatedMLP(cfg, self.deterministic, name="mlp")(_norm(cfg, "mlp_norm")(x)))
    if not self.layer_outputs:
      return y, ()
    return y, (y, scores, qkv) if self.return_qkv else (y, scores)


class Encoder(nn.Module):
  """Scans `PreNormBlock` over `encoder/layers/`, then the final norm. `num_layers` runs
  only the first layers, reading the stack in place as MobileBERT's encoder does; the final
  norm then stays off, so that state k is the same with or without the later layers.

  Returns (per-layer states, per-layer scores, per-layer qkv); with `layer_outputs=False`
  ((last state,), (), ()).
  """
  cfg: ModernConfig

  @nn.compact
  def __call__(self, x: Array, tables: tuple, deterministic: bool, num_layers: int | None,
               return_qkv: bool = False, layer_outputs: bool = True):
    cfg = self.cfg
    total = cfg.num_hidden_layers
    k = total if num_layers is None else num_layers
    layer_outputs = layer_outputs or return_qkv
    final_norm = _norm(cfg, "final_norm")
    layers = jnp.arange(k, dtype=jnp.int32)
    if k != total and not self.is_initializing():
      last, per_layer = self._first_layers(x, tables, deterministic, layers, return_qkv,
                                           layer_outputs)
    else:
      scanned = scanned_stack(PreNormBlock, cfg, k, in_axes=(nn.broadcast, 0))
      last, per_layer = scanned(cfg, deterministic, return_qkv, layer_outputs,
                                name="layers")(x, tables, layers)
    normed = final_norm(last) if k == total else last
    if not layer_outputs:
      return (normed,), (), ()
    states, scores = per_layer[0], per_layer[1]
    hidden = tuple(states[i] for i in range(k - 1)) + (normed,)
    qkv = ()
    if return_qkv:
      qkv = tuple(tuple(t[i] for t in per_layer[2]) for i in range(k))
    return hidden, tuple(scores[i] for i in range(k)), qkv

  def _first_layers(self, x, tables, deterministic, layers, return_qkv, layer_outputs):
    cfg = self.cfg
    stacked = nn.unbox(self.variables["params"]["layers"])
    block = PreNormBlock(cfg, deterministic, return_qkv, layer_outputs, parent=None)
    rng = None if deterministic else self.make_rng("dropout")

    def layer(h, i):
      params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                            stacked)
      rngs = {} if rng is None else {"dropout": jax.random.fold_in(rng, i)}
      return block.apply({"params": params}, h, tables, i, rngs=rngs)

    return jax.lax.scan(jax.checkpoint(layer) if cfg.remat else layer, x, layers,
                        unroll=1 if cfg.scan_layers else layers.shape[0])


class WordEmbeddings(nn.Module):
  cfg: ModernConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                                  ("vocab", "embed_table")),
        (cfg.vocab_size, cfg.hidden_size), jnp.float32)

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding, ids, axis=0)


class Embeddings(nn.Module):
  """Token lookup (no positions, no token types), then the optional norm."""
  cfg: ModernConfig

  @nn.compact
  def __call__(self, input_ids: Array, deterministic: bool) -> Array:
    cfg = self.cfg
    x = WordEmbeddings(cfg, name="word_embeddings")(input_ids)
    x = x.astype(jnp.dtype(cfg.compute_dtype))
    if cfg.embedding_norm:
      x = _norm(cfg, "norm")(x)
    return batch_sharded(nn.Dropout(cfg.embedding_dropout)(x, deterministic=deterministic))


class HeadTransform(nn.Module):
  cfg: ModernConfig

  @nn.compact
  def __call__(self, h: Array) -> Array:
    cfg = self.cfg
    h = Projection((cfg.hidden_size,), ("embed", "embed_out"), cfg, cfg.head_bias, output=True,
                   name="dense")(h)
    return _norm(cfg, "norm", "embed_out")(activation(cfg.head_activation)(h))


class MaskedLMHead(nn.Module):
  """[transform: dense -> act -> norm] -> decoder (the word table, or its own `decoder`
  [V, H] table) + `output_bias`."""
  cfg: ModernConfig

  @nn.compact
  def __call__(self, h: Array, word_table: Array) -> Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    if cfg.head_transform:
      h = HeadTransform(cfg, name="transform")(h)
    table = word_table
    if not cfg.tie_word_embeddings:
      table = self.param("decoder", nn.with_logical_partitioning(_init(cfg, output=True),
                                                                  ("vocab", "embed_out")),
                         (cfg.vocab_size, cfg.hidden_size), jnp.float32)
    logits = jnp.dot(h.astype(dtype), table.astype(dtype).T, preferred_element_type=jnp.float32)
    if cfg.decoder_bias:
      logits = logits + self.param(
          "output_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
          (cfg.vocab_size,), jnp.float32)
    return logits


class _Heads(nn.Module):
  """`cls/predictions`: the MLM head under the path the BERT family uses."""
  cfg: ModernConfig

  def setup(self):
    self.predictions = MaskedLMHead(self.cfg)

  def __call__(self, h: Array, word_table: Array) -> Array:
    return self.predictions(h, word_table)


class ModernEncoder(nn.Module):
  """Embeddings + scanned pre-norm layers + final norm + MLM head; called as `MobileBert` is.

  There are no token types and no NSP head: `token_type_ids` is accepted and ignored,
  `nsp_logits` is None, and `pooled` is the final state at [CLS] (ModernBERT's "cls"
  pooling). `return_qkv` gives each layer's flat (q, k, v) projections before the rotation
  (keys and values with num_key_value_heads heads).
  """
  cfg: ModernConfig

  def setup(self):
    self.embeddings = Embeddings(self.cfg)
    self.encoder = Encoder(self.cfg)
    self.cls = _Heads(self.cfg)

  def __call__(self, input_ids: Array, token_type_ids: Array | None = None,
               attention_mask: Array | None = None, masked_positions: Array | None = None,
               deterministic: bool = True, num_layers: int | None = None,
               heads: bool = True, return_qkv: bool = False,
               layer_outputs: bool = True) -> ModelOutput:
    cfg = self.cfg
    del token_type_ids  # no token types in these families
    check_call(cfg, input_ids, num_layers)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)

    x = self.embeddings(input_ids, deterministic)
    if num_layers == 0:
      layer_states, scores, qkv = (), (), ()
    else:
      layer_states, scores, qkv = self.encoder(
          x, self.tables(attention_mask), deterministic, num_layers, return_qkv, layer_outputs)
    hidden = (x,) + layer_states if layer_outputs or return_qkv else layer_states[-1:] or (x,)
    seq = hidden[-1]
    mlm_logits = None
    if heads:
      if masked_positions is not None:
        seq = jnp.take_along_axis(seq, masked_positions[..., None].astype(jnp.int32), axis=1)
      mlm_logits = self.cls(seq, self.word_table())
    return ModelOutput(mlm_logits=mlm_logits, nsp_logits=None, pooled=hidden[-1][:, 0],
                       hidden_states=hidden, attention_scores=scores, qkv=qkv)

  def word_table(self) -> Array:
    return nn.unbox(self.embeddings.variables["params"]["word_embeddings"]["embedding"])

  def tables(self, attention_mask: Array) -> tuple:
    """((cos, sin, bias) of global layers, same of local layers or None): what each layer
    selects from, computed once per call."""
    cfg = self.cfg
    t = attention_mask.shape[1]
    full_bias, sliding_bias = mask_biases(cfg, attention_mask)
    full = rotary_tables(t, cfg.head_dim, cfg.rope_theta) + (full_bias,)
    if sliding_bias is None:
      return full, None
    local = rotary_tables(t, cfg.head_dim, cfg.local_rope_theta) + (sliding_bias,)
    return full, local


def build_modern(cfg: ModernConfig) -> ModernEncoder:
  """The Flax module of a ModernBERT/EuroBERT config (validated)."""
  return ModernEncoder(cfg.validate())


__all__ = ["ModernEncoder", "build_modern", "mask_biases", "rotary_tables", "rotate"]
