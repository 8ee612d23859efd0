"""CoCa: contrastive captioner (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models",
arXiv 2205.01917) — the 'coca' framework of `vlm_jax.models.FRAMEWORKS`.

  image tokens     = ViT(image)                                   [B, N, D_img]
  contrastive pool = AttnPool_1(image tokens)        (n_query = 1)  -> zimg = ‖W_i · pool‖₂⁻¹ W_i · pool
  caption pool     = AttnPool_nq(image tokens)       (n_query = 256 in the paper) -> cross-attention memory
  unimodal decoder = causal text layers on [SOT] w_1 … plus a learned [CLS] token appended at the end;
                     ztxt = ‖W_t · LN(cls)‖₂⁻¹ W_t · LN(cls)
  multimodal decoder = causal self-attention + cross-attention to the caption pool -> next-token logits
  L_CoCa = λ_con · L_con + λ_cap · L_cap   (paper: λ_cap = 2, λ_con = 1; set by config.objectives)

outputs: zimg, ztxt, logit_scale (so the registered 'clip' objective applies unchanged), img (the ViT dict),
caption = {'logits' [B, L−1, V], 'targets' = text[:, 1:], 'mask' = targets up to EOT} for the 'captioning' objective.
Generation (`vlm_jax.decoding`) uses `decode_memory(images)` and `decode_logits(ids, memory, decode=…)`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.decoder import TextDecoder, decoder_kwargs
from vlm_jax.models.transformer import Attention, layer_norm
from vlm_jax.models.two_tower import MAX_LOG_LOGIT_SCALE, _projection, l2_normalize

Dtype = Any


class AttentionalPooler(nn.Module):
  """CoCa's attentional pooler (Yu et al. 2022, §3.2; Lee et al. 2019's set-transformer pooling): n_queries
  learned queries attend over the image tokens in one multi-head attention layer, followed by a LayerNorm.
  Output [B, n_queries, width]."""
  n_queries: int
  width: int
  num_heads: int
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    queries = self.param("queries", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                         (self.n_queries, self.width), self.param_dtype)
    q = jnp.broadcast_to(queries.astype(self.dtype)[None], (tokens.shape[0], self.n_queries, self.width))
    y = Attention(self.num_heads, name="attn", **kw)(q, layer_norm(name="ln_kv", eps=self.norm_eps, **kw)(tokens))
    return layer_norm(name="ln_out", eps=self.norm_eps, **kw)(y)


class CoCa(nn.Module):
  """CoCa around a ViT `img` and a `TextDecoder` `decoder` (cls_token=True); see the module docstring."""
  img: nn.Module
  decoder: TextDecoder
  embed_dim: int = 512
  n_queries: int = 256
  pooler_heads: int = 8
  logit_scale_init: float = math.log(1 / 0.07)
  max_log_logit_scale: float | None = MAX_LOG_LOGIT_SCALE
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = self.decoder.width
    self.contrastive_pool = AttentionalPooler(1, width, self.pooler_heads, name="contrastive_pool", **kw)
    self.caption_pool = AttentionalPooler(self.n_queries, width, self.pooler_heads, name="caption_pool", **kw)
    self.img_proj = _projection(self.embed_dim, "img_proj", self.dtype, self.param_dtype)
    self.txt_proj = _projection(self.embed_dim, "txt_proj", self.dtype, self.param_dtype)
    self.log_logit_scale = self.param("log_logit_scale", nn.initializers.constant(self.logit_scale_init), (),
                                      jnp.float32)

  def logit_scale(self):
    """t = exp(min(log_logit_scale, ln 100)) (the learned temperature of CLIP/CoCa)."""
    if self.max_log_logit_scale is None:
      return jnp.exp(self.log_logit_scale)
    return jnp.exp(jnp.minimum(self.log_logit_scale, self.max_log_logit_scale))

  def _zimg(self, tokens):
    return l2_normalize(self.img_proj(self.contrastive_pool(tokens)[:, 0]))

  def encode_image(self, images, *, train: bool = False):
    """L2-normalised image embeddings zimg [B, embed_dim] (contrastive pooler, projection)."""
    return self._zimg(self.img(images, train=train)["tokens"])

  def encode_text(self, ids, *, train: bool = False):
    """L2-normalised text embeddings ztxt [B, embed_dim]: the unimodal decoder's [CLS] output on ids[:, :-1]
    (the same input as training, where the last position is only ever a target)."""
    _, cls_out = self.decoder.unimodal(ids[:, :-1], train=train)
    return l2_normalize(self.txt_proj(cls_out))

  def decode_memory(self, images, *, train: bool = False):
    """Cross-attention memory for captioning: the captioning pooler's outputs [B, n_queries, width]."""
    return self.caption_pool(self.img(images, train=train)["tokens"])

  def decode_logits(self, ids, memory, *, decode: bool = False, train: bool = False):
    """Next-token logits [B, T, V] for input ids [B, T] (no [CLS]); decode=True uses/creates the KV cache."""
    x, _ = self.decoder.unimodal(ids, decode=decode, train=train)
    return self.decoder.multimodal(x, memory, decode=decode, train=train)

  def __call__(self, batch, *, train: bool = False):
    """batch {'image' [B,H,W,3], 'text' int [B,L]} -> outputs dict (module docstring)."""
    img = self.img(batch["image"], train=train)
    text = batch["text"]
    inputs, targets = text[:, :-1], text[:, 1:]
    dec = self.decoder(inputs, self.caption_pool(img["tokens"]), train=train)
    return {"zimg": self._zimg(img["tokens"]), "ztxt": l2_normalize(self.txt_proj(dec["cls"])),
            "logit_scale": self.logit_scale(), "img": img,
            "caption": {"logits": dec["logits"], "targets": targets, "mask": self.decoder.target_mask(text)}}


def build(cfg: dict) -> CoCa:
  """The 'coca' framework's builder. Keys: image (a ViT dict), text (decoder dict: variant, width, depth,
  unimodal_depth / multimodal_depth (default half each), mlp_dim, num_heads, vocab_size, max_len), embed_dim,
  n_queries (256), pooler_heads (the decoder's heads), logit_scale_init, max_log_logit_scale, dtype, ….
  """
  from vlm_jax.models import build_encoder, common_defaults  # noqa: PLC0415
  cfg = dict(cfg)
  defaults = common_defaults(cfg)
  if not cfg.get("image") or not cfg.get("text"):
    raise UserError("a 'coca' model config needs `image` (ViT) and `text` (decoder) dicts")
  image = build_encoder(cfg["image"], defaults, ("vit",))
  kw = decoder_kwargs(cfg["text"])
  if kw["unimodal_depth"] < 1 or kw["multimodal_depth"] < 1:
    raise UserError("CoCa needs at least one unimodal and one multimodal decoder layer")
  decoder = TextDecoder(cls_token=True, dtype=defaults["dtype"], param_dtype=defaults["param_dtype"], **kw)
  max_log = cfg.get("max_log_logit_scale", MAX_LOG_LOGIT_SCALE)
  known = {"framework", "image", "text", "embed_dim", "n_queries", "pooler_heads", "logit_scale_init",
           "max_log_logit_scale", "scan", "remat", "dtype", "param_dtype", "attention"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise UserError(f"unknown coca model option(s) {unknown}; valid: {sorted(known)}")
  return CoCa(img=image, decoder=decoder, embed_dim=int(cfg.get("embed_dim", 512)),
              n_queries=int(cfg.get("n_queries", 256)), pooler_heads=int(cfg.get("pooler_heads") or decoder.num_heads),
              logit_scale_init=float(cfg.get("logit_scale_init", math.log(1 / 0.07))),
              max_log_logit_scale=None if max_log is None else float(max_log),
              dtype=defaults["dtype"], param_dtype=defaults["param_dtype"])
