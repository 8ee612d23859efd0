"""One-tower contrastive models (framework 'one_tower'): one transformer encodes both images and text.

mode='clippo' — CLIPPO (Tschannen et al. 2023, "CLIPPO: Image-and-Language Understanding from Pixels Only",
  arXiv:2212.08045): one ViT, every parameter shared, encodes photos and text rendered as images (the 'render'
  tokenizer, `vlm_jax.data.render_text`, so batch['text'] is a float image [B, h, w, 3]); one shared linear head
  maps the pooled feature to the joint space, as CLIPPO. The ViT takes both image shapes (learned position tables
  are resized to each input's patch grid; fixed sin-cos embeddings are computed for it).
mode='shared' — one transformer with shared blocks (and final LayerNorm) over image patches and text tokens, with
  modality-specific input embeddings (patch embedding + position table for images; token embedding + position
  table for text) and separate linear heads: the "1T-CLIP" baseline of Tschannen et al. 2023 and the
  modality-agnostic shared backbone of VATT (Akbari et al. 2021). Text attends bidirectionally over its
  tokens up to and including EOT and is pooled at the EOT token (`models.tokens`: from the tokenizer's
  `sot_id`/`eot_id`/`pad_id` in model.text; without them the old convention, keys ids ≠ 0 and EOT = argmax);
  images are pooled by the encoder's `pool_type` ('gap' or 'cls').

Both return the two-tower outputs (zimg, ztxt L2-normalised; logit_scale = exp(min(log t, ln 100)); logit_bias
when `logit_bias_init` is set; img/txt encoder dicts), so the 'clip' and 'siglip' objectives and the zero-shot /
retrieval evaluators (`encode_image`, `encode_text`) apply unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models import tokens
from vlm_jax.models.transformer import Encoder
from vlm_jax.models.two_tower import MAX_LOG_LOGIT_SCALE, _projection, l2_normalize
from vlm_jax.models.vit import posemb_sincos_2d, resize_posemb

Dtype = Any
MODES = ("clippo", "shared")


class SharedTower(nn.Module):
  """The 'shared' mode's encoder: modality-specific embeddings, one shared pre-LN transformer (module docstring).

  `image(images)` / `text(ids)` return {'pooled', 'tokens'} like the separate encoders.
  """
  vocab_size: int
  max_len: int
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  patch_size: int = 16
  image_size: int = 224
  posemb: str = "learn"
  pool_type: str = "gap"
  sot_id: int | None = None
  eot_id: int | None = None
  pad_id: int | None = None
  scan: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"        # 'xla' | 'cudnn' (transformer.attention_implementation)

  def setup(self):
    if self.pool_type not in ("gap", "cls"):
      raise UserError(f"one_tower shared mode pools images by 'gap' or 'cls', got {self.pool_type!r}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, p = self.width, self.patch_size
    self.patch_embedding = nn.Conv(
        d, (p, p), strides=(p, p), padding="VALID", name="patch_embedding", **kw,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    g = self.image_size // p
    if self.posemb == "learn":
      self.image_pos = self.param("image_pos", nn.with_logical_partitioning(
          nn.initializers.normal(1 / math.sqrt(d)), (None, None, "embed")), (1, g * g, d), self.param_dtype)
    if self.pool_type == "cls":
      self.cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                            (1, 1, d), self.param_dtype)
    self.token_embedding = nn.Embed(self.vocab_size, d, name="token_embedding", **kw,
                                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                                ("vocab", "embed")))
    self.text_pos = self.param("text_pos", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, "embed")), (self.max_len, d), self.param_dtype)
    self.encoder = Encoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim, scan=self.scan,
                           remat=self.remat, attention=self.attention, name="Transformer", **kw)

  def image(self, images, *, train: bool = False):
    x = self.patch_embedding(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    if self.posemb == "learn":
      g = self.image_size // self.patch_size
      pe = resize_posemb(self.image_pos, (g, g), (gh, gw))
    else:
      pe = posemb_sincos_2d(gh, gw, d)
    x = x + pe.astype(x.dtype)
    if self.pool_type == "cls":
      x = jnp.concatenate([jnp.broadcast_to(self.cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = self.encoder(x, train=train)
    tokens = x[:, 1:] if self.pool_type == "cls" else x
    pooled = x[:, 0] if self.pool_type == "cls" else tokens.mean(axis=1)
    return {"pooled": pooled, "tokens": tokens}

  def text(self, ids, *, train: bool = False):
    b, length = ids.shape
    if length > self.max_len:
      raise UserError(f"text length {length} exceeds the model's max_len {self.max_len}")
    x = self.token_embedding(ids) + self.text_pos[:length].astype(self.dtype)[None]
    keys = tokens.valid_tokens(ids, eot_id=self.eot_id, pad_id=self.pad_id)[:, None, None, :]
    x = self.encoder(x, keys, train=train)
    pooled = x[jnp.arange(b), tokens.eot_positions(ids, self.eot_id)]
    return {"pooled": pooled, "tokens": x}


class OneTower(nn.Module):
  """CLIPPO / shared-weights one-tower model (module docstring). `tower` is a ViT (clippo) or `SharedTower`."""
  tower: nn.Module
  mode: str = "clippo"
  embed_dim: int = 512
  logit_scale_init: float = math.log(1 / 0.07)
  logit_bias_init: float | None = None
  max_log_logit_scale: float | None = MAX_LOG_LOGIT_SCALE
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.mode not in MODES:
      raise UserError(f"unknown one_tower mode {self.mode!r}; valid choices: {', '.join(MODES)}")
    if self.mode == "clippo":
      self.proj = _projection(self.embed_dim, "proj", self.dtype, self.param_dtype)
    else:
      self.img_proj = _projection(self.embed_dim, "img_proj", self.dtype, self.param_dtype)
      self.txt_proj = _projection(self.embed_dim, "txt_proj", self.dtype, self.param_dtype)
    self.log_logit_scale = self.param(
        "log_logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32)
    if self.logit_bias_init is not None:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), (), jnp.float32)

  def _image(self, images, train: bool) -> dict:
    return self.tower(images, train=train) if self.mode == "clippo" else self.tower.image(images, train=train)

  def _text(self, text, train: bool) -> dict:
    if self.mode == "clippo":
      if text.ndim != 4:
        raise UserError(f"one_tower mode 'clippo' reads text rendered as images [B, h, w, 3] (tokenizer "
                        f"name='render'); got text of shape {tuple(text.shape)}")
      return self.tower(text, train=train)
    if text.ndim != 2:
      raise UserError(f"one_tower mode 'shared' reads token ids [B, L]; got text of shape {tuple(text.shape)}")
    return self.tower.text(text, train=train)

  def _embed(self, enc: dict, head: str):
    proj = self.proj if self.mode == "clippo" else getattr(self, head)
    return l2_normalize(proj(enc["pooled"]))

  def encode_image(self, images, *, train: bool = False):
    """L2-normalised image embeddings zimg [B, embed_dim] (float32)."""
    return self._embed(self._image(images, train), "img_proj")

  def encode_text(self, text, *, train: bool = False):
    """L2-normalised text embeddings ztxt [B, embed_dim] (float32): rendered text (clippo) or ids (shared)."""
    return self._embed(self._text(text, train), "txt_proj")

  def logit_scale(self):
    """t = exp(min(log_logit_scale, ln 100)) (None `max_log_logit_scale`: unclamped)."""
    if self.max_log_logit_scale is None:
      return jnp.exp(self.log_logit_scale)
    return jnp.exp(jnp.minimum(self.log_logit_scale, self.max_log_logit_scale))

  def __call__(self, batch, *, train: bool = False):
    """batch {'image' [B,H,W,3], 'text' (rendered [B,h,w,3] or ids [B,L])} -> two-tower outputs dict."""
    img = self._image(batch["image"], train)
    txt = self._text(batch["text"], train)
    out = {"zimg": self._embed(img, "img_proj"), "ztxt": self._embed(txt, "txt_proj"),
           "logit_scale": self.logit_scale(), "img": img, "txt": txt}
    if self.logit_bias_init is not None:
      out["logit_bias"] = self.logit_bias
    return out


TEXT_LAYOUT = ("sot_id", "eot_id", "pad_id")
SHARED_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size", "posemb", "pool_type")


def build(cfg: dict) -> OneTower:
  """The 'one_tower' framework's builder. Keys: mode ('clippo' | 'shared'), image (a ViT dict: kind 'vit',
  variant, image_size, posemb, pool_type, …; in 'shared' mode only the fields in `SHARED_FIELDS` apply), text
  (shared mode: {vocab_size, max_len, sot_id, eot_id, pad_id}, filled from the tokenizer by the runner), embed_dim,
  logit_scale_init, logit_bias_init, max_log_logit_scale, scan, remat, dtype, param_dtype."""
  from vlm_jax.models import _plain, build_encoder, common_defaults, variants  # noqa: PLC0415

  cfg = dict(cfg)
  cfg.pop("framework", None)
  mode = cfg.get("mode", "clippo")
  if mode not in MODES:
    raise UserError(f"unknown one_tower mode {mode!r}; valid choices: {', '.join(MODES)}")
  defaults = common_defaults(cfg)
  image_cfg = _plain(cfg.get("image"))
  if mode == "clippo":
    if "text" in cfg:
      raise UserError("one_tower mode 'clippo' has no text tower: drop model.text (text is rendered as images "
                      "by the 'render' tokenizer)")
    tower = build_encoder(image_cfg, defaults, ("vit",))
  else:
    if image_cfg.pop("kind", "vit") != "vit":
      raise UserError("one_tower mode 'shared' takes its size from a ViT dict (image.kind='vit')")
    fields = variants.vit_variant(image_cfg.pop("variant")) if "variant" in image_cfg else {}
    fields.update(image_cfg)
    unknown = sorted(set(fields) - set(SHARED_FIELDS))
    if unknown:
      raise UserError(f"one_tower shared mode: unknown image option(s) {unknown}; valid: {list(SHARED_FIELDS)}")
    text = _plain(cfg.get("text"))
    if not {"vocab_size", "max_len"} <= set(text):
      raise UserError("one_tower mode 'shared' needs model.text.vocab_size and model.text.max_len (the runner "
                      "fills them from the tokenizer)")
    layout = {k: None if text.get(k) is None else int(text[k]) for k in TEXT_LAYOUT}
    tower = SharedTower(vocab_size=int(text["vocab_size"]), max_len=int(text["max_len"]), **layout, **fields,
                        **defaults)
  bias = cfg.get("logit_bias_init")
  max_log = cfg.get("max_log_logit_scale", MAX_LOG_LOGIT_SCALE)
  return OneTower(tower=tower, mode=mode, embed_dim=int(cfg.get("embed_dim", 512)),
                  logit_scale_init=float(cfg.get("logit_scale_init", math.log(1 / 0.07))),
                  logit_bias_init=None if bias is None else float(bias),
                  max_log_logit_scale=None if max_log is None else float(max_log),
                  dtype=defaults["dtype"], param_dtype=defaults["param_dtype"])
