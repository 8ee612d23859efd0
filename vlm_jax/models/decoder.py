"""Transformer text decoder with cross-attention to image tokens and a key/value cache for generation.

The decoder of the image-to-text models (CoCa, Yu et al. 2022, arXiv 2205.01917; CapPa, Tschannen et al. 2023,
arXiv 2306.07915), pre-LN blocks as the shared `transformer.py` (whose `HeadsDense`, `Attention`, `Mlp` and
`layer_norm` it reuses, so parameters carry the same logical axis names):

  x ← x + SelfAttn(LN(x), mask)          causal for autoregressive prediction (Vaswani et al. 2017)
  x ← x + CrossAttn(LN(x), memory)       multimodal layers only: queries from text, keys/values from the image
  x ← x + MLP(LN(x))

`TextDecoder` stacks `unimodal_depth` blocks without cross-attention (CoCa's unimodal text decoder, which may
append a learned [CLS] token whose output is the text embedding) and `multimodal_depth` blocks with it, then a
final LayerNorm and a vocabulary projection. Generation uses Flax's 'cache' collection: a call with
`decode=True` on a model without a cache creates zero caches sized by its input ([B, L_max]); later calls with
`decode=True` take the next T tokens, write their keys/values at the cache index and attend to every position
written so far (standard incremental decoding, as flax's `MultiHeadDotProductAttention(decode=True)`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models import tokens
from vlm_jax.models.transformer import ACT, Attention, HeadsDense, Mlp, causal_mask, layer_norm

Dtype = Any
HEADS_SPEC = ("act_batch", "act_len", "act_heads", "act_kv")


class CachedSelfAttention(nn.Module):
  """Multi-head self-attention (Vaswani et al. 2017) with an optional key/value cache.

  Parameters are laid out as `transformer.Attention` (query/key/value [embed, heads, kv], out [heads, kv, embed]).
  decode=False: softmax(q kᵀ/√d + mask) v over the input. decode=True with a cache: keys/values of the T new
  tokens are written at positions [i, i + T) of `cached_key`/`cached_value` ([B, L_max, heads, kv]); query t
  attends to cached positions j ≤ i + t (`mask` is ignored: decoding is causal by construction). The first
  decode=True call creates the cache (index 0) and computes as decode=False.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, decode: bool = False):
    d = x.shape[-1]
    if d % self.num_heads:
      raise UserError(f"width {d} is not divisible by num_heads {self.num_heads}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(name):
      return HeadsDense((self.num_heads, d // self.num_heads), 1, ("embed", "heads", "kv"), ("heads", "kv"),
                        name=name, **kw)(x)

    q = nn.with_logical_constraint(proj("query"), HEADS_SPEC)
    k = nn.with_logical_constraint(proj("key"), HEADS_SPEC)
    v = nn.with_logical_constraint(proj("value"), HEADS_SPEC)
    if decode:
      initialized = self.has_variable("cache", "cached_key")
      cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      if initialized:
        i, t = index.value, x.shape[1]
        k = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, i, 0, 0))
        v = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, i, 0, 0))
        cached_k.value, cached_v.value, index.value = k, v, i + t
        mask = (jnp.arange(k.shape[1])[None, :] <= (i + jnp.arange(t))[:, None])[None, None]
    y = nn.with_logical_constraint(jax.nn.dot_product_attention(q, k, v, mask=mask), HEADS_SPEC)
    return HeadsDense((d,), 2, ("heads", "kv", "embed"), ("embed",), name="out", **kw)(y)


class DecoderBlock(nn.Module):
  """Pre-LN decoder block: self-attention (cached), cross-attention to `memory` when `cross`, MLP."""
  num_heads: int
  mlp_dim: int
  cross: bool = False
  act: str = "gelu"
  dropout: float = 0.0
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, memory=None, mask=None, decode: bool = False, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)  # noqa: E731
    x = nn.with_logical_constraint(x, ACT)
    y = layer_norm(name="ln1", eps=self.norm_eps, **kw)(x)
    x = x + drop(CachedSelfAttention(self.num_heads, name="self_attn", **kw)(y, mask, decode))
    if self.cross:
      if memory is None:
        raise ValueError("a cross-attention decoder block needs memory (image tokens)")
      y = layer_norm(name="ln_cross", eps=self.norm_eps, **kw)(x)
      x = x + drop(Attention(self.num_heads, name="cross_attn", **kw)(y, memory.astype(self.dtype)))
    y = layer_norm(name="ln2", eps=self.norm_eps, **kw)(x)
    x = x + drop(Mlp(self.mlp_dim, self.act, self.dropout, not train, name="mlp", **kw)(y))
    return nn.with_logical_constraint(x, ACT)


class DecodePosition(nn.Module):
  """Incremental decoding's position counter ('cache' collection): returns the first position of the T new
  tokens and advances by T (0 on the call that creates the cache)."""

  @nn.compact
  def __call__(self, t: int):
    initialized = self.has_variable("cache", "position")
    pos = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
    if not initialized:
      return 0
    start = pos.value
    pos.value = start + t
    return start


class TextDecoder(nn.Module):
  """Token embedding + learned positions -> unimodal blocks -> multimodal (cross-attention) blocks -> LN -> logits.

  `cls_token=True` (CoCa) appends a learned [CLS] embedding after the unimodal input; its output after
  `ln_cls` is returned as 'cls' (the text embedding before projection). Causally masked, it attends to every
  token up to and including EOT (`models.tokens.valid_tokens` with the tokenizer's `eot_id`/`pad_id`; without
  them every non-padding token, pad id 0, as open_clip's CoCa) and no token attends to it, so the token outputs
  are those of the sequence without it. `mask_token=True` (CapPa) adds a learned [MASK] input embedding: examples flagged in
  `parallel` [B] get [MASK] at every input position and full (non-causal) self-attention (parallel prediction,
  Tschannen et al. 2023, §3). The vocabulary projection starts at zero (as big_vision's CapPa decoder).
  """
  vocab_size: int
  max_len: int
  width: int = 512
  unimodal_depth: int = 0
  multimodal_depth: int = 6
  mlp_dim: int = 2048
  num_heads: int = 8
  act: str = "gelu"
  dropout: float = 0.0
  norm_eps: float = 1e-5
  cls_token: bool = False
  mask_token: bool = False
  sot_id: int | None = None
  eot_id: int | None = None
  pad_id: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.token_embedding = nn.Embed(
        self.vocab_size, self.width, **kw,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.pos_embedding = self.param(
        "pos_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
        (self.max_len, self.width), self.param_dtype)
    if self.cls_token:
      self.cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                            (self.width,), self.param_dtype)
      self.ln_cls = layer_norm(name="ln_cls", eps=self.norm_eps, **kw)
    if self.mask_token:
      self.mask_embedding = self.param(
          "mask_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
          (self.width,), self.param_dtype)
    block = lambda cross: DecoderBlock(self.num_heads, self.mlp_dim, cross, self.act, self.dropout,  # noqa: E731
                                       self.norm_eps, self.dtype, self.param_dtype)
    self.unimodal_blocks = [block(False) for _ in range(self.unimodal_depth)]
    self.multimodal_blocks = [block(True) for _ in range(self.multimodal_depth)]
    self.ln_final = layer_norm(name="ln_final", eps=self.norm_eps, **kw)
    self.position = DecodePosition()
    self.head = nn.Dense(self.vocab_size, name="head", **kw,
                         kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab")),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))

  def _inputs(self, ids, parallel, decode: bool):
    """Token (or [MASK]) embeddings plus positions; with a cache, positions continue from its index."""
    b, t = ids.shape
    x = self.token_embedding(ids).astype(self.dtype)
    if parallel is not None:
      if not self.mask_token:
        raise ValueError("parallel prediction needs mask_token=True")
      x = jnp.where(parallel[:, None, None], self.mask_embedding.astype(self.dtype)[None, None], x)
    start = self.position(t) if decode else 0
    if t > self.max_len:
      raise UserError(f"text length {t} exceeds the decoder's max_len {self.max_len}")
    table = jax.lax.dynamic_slice_in_dim(self.pos_embedding, start, t, axis=0)
    return x + table.astype(self.dtype)[None]

  def unimodal(self, ids, *, parallel=None, decode: bool = False, train: bool = False):
    """(token features [B, T, D] after the unimodal blocks, CLS output [B, D] or None)."""
    x = self._inputs(ids, parallel, decode)
    b, t, d = x.shape
    mask = causal_mask(t)
    cls_out = None
    with_cls = self.cls_token and not decode
    if with_cls:
      if t + 1 > self.max_len:
        raise UserError(f"text length {t} + [CLS] exceeds the decoder's max_len {self.max_len}")
      cls = self.cls.astype(self.dtype) + self.pos_embedding[t].astype(self.dtype)
      x = jnp.concatenate([x, jnp.broadcast_to(cls, (b, 1, d))], axis=1)
      valid = tokens.valid_tokens(ids, eot_id=self.eot_id, pad_id=self.pad_id)
      keys = jnp.concatenate([valid, jnp.ones((b, 1), bool)], axis=1)  # [CLS] sees the text, not its padding
      mask = jnp.broadcast_to(causal_mask(t + 1), (b, 1, t + 1, t + 1))
      mask = mask.at[:, :, t, :].set(keys[:, None, :])
    if parallel is not None:
      mask = jnp.where(parallel[:, None, None, None], jnp.ones_like(mask), mask)
    for block in self.unimodal_blocks:
      x = block(x, None, mask, decode, train)
    if with_cls:
      cls_out, x = self.ln_cls(x[:, t]), x[:, :t]
    return x, cls_out

  def multimodal(self, x, memory, *, parallel=None, decode: bool = False, train: bool = False):
    """Vocabulary logits [B, T, V] (float32) from unimodal token features [B, T, D] and image tokens [B, M, Dm]."""
    mask = causal_mask(x.shape[1])
    if parallel is not None:
      mask = jnp.where(parallel[:, None, None, None], jnp.ones_like(mask), mask)
    for block in self.multimodal_blocks:
      x = block(x, memory, mask, decode, train)
    return self.head(self.ln_final(x)).astype(jnp.float32)

  def target_mask(self, text):
    """bool [B, L − 1]: the next-token targets text[:, 1:] that carry the captioning loss — every token up to and
    including EOT (`models.tokens.valid_tokens`; without a layout: targets ≠ pad 0)."""
    return tokens.valid_tokens(text, eot_id=self.eot_id, pad_id=self.pad_id)[:, 1:]

  def __call__(self, ids, memory, *, parallel=None, decode: bool = False, train: bool = False):
    """{'logits': [B, T, V] float32, 'cls': [B, D] or None} for input ids [B, T] and image tokens [B, M, Dm]."""
    x, cls_out = self.unimodal(ids, parallel=parallel, decode=decode, train=train)
    return {"logits": self.multimodal(x, memory, parallel=parallel, decode=decode, train=train), "cls": cls_out}


def decoder_kwargs(cfg: dict, *, default_unimodal: int | None = None) -> dict:
  """`TextDecoder` fields from a model config's `text` dict: {'variant', overrides…} (sizes from
  `variants.text_variant`); 'depth' is split into unimodal / multimodal layers unless they are given."""
  from vlm_jax.models import variants  # noqa: PLC0415
  cfg = dict(cfg)
  kind = cfg.pop("kind", "decoder")
  if kind != "decoder":
    raise UserError(f"the text part of this model is a decoder: text.kind must be 'decoder', got {kind!r}")
  out = dict(variants.text_variant(cfg.pop("variant"))) if "variant" in cfg else {}
  out.update({k: cfg.pop(k) for k in ("width", "depth", "mlp_dim", "num_heads") if k in cfg})
  depth = int(out.pop("depth", 6))
  uni = cfg.pop("unimodal_depth", depth // 2 if default_unimodal is None else default_unimodal)
  out["unimodal_depth"] = int(uni)
  out["multimodal_depth"] = int(cfg.pop("multimodal_depth", depth - out["unimodal_depth"]))
  allowed = ("vocab_size", "max_len", "act", "dropout", "norm_eps", "sot_id", "eot_id", "pad_id")
  unknown = sorted(set(cfg) - set(allowed))
  if unknown:
    valid = allowed + ("kind", "variant", "width", "depth", "mlp_dim", "num_heads", "unimodal_depth",
                       "multimodal_depth")
    raise UserError(f"unknown text decoder option(s) {unknown}; valid: {sorted(valid)}")
  for k in ("vocab_size", "max_len"):
    if k not in cfg:
      raise UserError(f"the text decoder needs text.{k} (the runner takes it from the tokenizer)")
  out.update(cfg)
  return out
