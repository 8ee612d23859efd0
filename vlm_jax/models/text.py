"""CLIP-style text transformer (Radford et al. 2021) returning {'pooled', 'tokens'}.

Token embedding + learned positions -> pre-LN transformer (causal by default) -> final LayerNorm -> pooling.
'eot' pooling takes the feature at the end-of-text token: the first position holding `eot_id` when the model knows
its tokenizer's layout (fields `sot_id`, `eot_id`, `pad_id`, copied from the tokenizer; `models.tokens`), else the
argmax of the ids (CLIP convention: EOT has the largest id; what converted open_clip checkpoints keep); 'first' |
'last' | 'mean' serve the bidirectional variant (causal=False; SigLIP's text
tower, Zhai et al. 2023, pools 'last'). The encoder also accepts token embeddings plus EOT positions instead of
ids, so prompt learning (CoOp, Zhou et al. 2022) can feed learned context vectors, and deep prompts (MaPLe,
Khattak et al. 2023) that replace tokens [prompt_start, prompt_start + P) before each of the first n layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models import tokens
from vlm_jax.models.transformer import Encoder

Dtype = Any
POOL_TYPES = ("eot", "first", "last", "mean")


class TextTransformer(nn.Module):
  """Text encoder of CLIP (Radford et al. 2021); `embed(ids)` gives the token-embedding lookup alone.

  SigLIP's text tower (Zhai et al. 2023) is `causal=False, pool_type='last', norm_eps=1e-6`: it reads the
  feature at the last position of the fixed-length row, whatever token (pad or EOS) sits there.
  `sot_id`, `eot_id`, `pad_id`: the tokenizer's special ids (None: the tokenizer has none, or — all None — the old
  convention EOT = largest id, pad 0; see `models.tokens`).
  """
  vocab_size: int = 49408
  max_len: int = 77
  width: int = 512
  depth: int = 12
  mlp_dim: int = 2048
  num_heads: int = 8
  causal: bool = True
  pool_type: str = "eot"
  act: str = "gelu"
  norm_eps: float = 1e-5
  dropout: float = 0.0
  prompt_start: int = 1
  sot_id: int | None = None
  eot_id: int | None = None
  pad_id: int | None = None
  scan: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"        # 'xla' | 'cudnn' (transformer.attention_implementation)

  def setup(self):
    if self.pool_type not in POOL_TYPES:
      raise UserError(f"unknown text pool_type {self.pool_type!r}; valid choices: {', '.join(POOL_TYPES)}")
    for name in ("sot_id", "eot_id", "pad_id"):
      value = getattr(self, name)
      if value is not None and not 0 <= int(value) < self.vocab_size:
        raise UserError(f"text {name}={value} is outside the vocabulary [0, {self.vocab_size})")
    self.token_embedding = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.pos_embedding = self.param(
        "pos_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
        (self.max_len, self.width), self.param_dtype)
    self.encoder = Encoder(
        depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act, norm_eps=self.norm_eps,
        dropout=self.dropout, causal=self.causal, prompt_start=self.prompt_start, scan=self.scan, remat=self.remat,
        dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention, name="Transformer")

  def embed(self, ids):
    """Token embeddings [B, L, D] (no positions) for int ids [B, L]."""
    return self.token_embedding(ids)

  def __call__(self, ids=None, *, embeddings=None, eot_positions=None, prompts=None, train: bool = False):
    """ids int [B, L], or embeddings [B, L, D] (+ eot_positions int [B] for 'eot' pooling).

    prompts: optional deep prompts [n, (B,) P, D] (MaPLe), n <= depth.
    """
    if (ids is None) == (embeddings is None):
      raise ValueError("give exactly one of ids or embeddings")
    if ids is not None:
      embeddings = self.embed(ids)
      if eot_positions is None:
        eot_positions = tokens.eot_positions(ids, self.eot_id)
    b, length, _ = embeddings.shape
    if length > self.max_len:
      raise UserError(f"text length {length} exceeds the model's max_len {self.max_len}")
    x = embeddings.astype(self.dtype) + self.pos_embedding[:length].astype(self.dtype)[None]
    x = self.encoder(x, None, prompts, train=train)

    if self.pool_type == "eot":
      if eot_positions is None:
        raise ValueError("'eot' pooling with embeddings needs eot_positions")
      pooled = x[jnp.arange(b), eot_positions.astype(jnp.int32)]
    elif self.pool_type == "first":
      pooled = x[:, 0]
    elif self.pool_type == "last":
      pooled = x[:, -1]
    else:
      pooled = x.mean(axis=1)
    return {"pooled": pooled, "tokens": x}
