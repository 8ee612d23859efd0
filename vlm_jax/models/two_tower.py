"""Two-tower contrastive model: image and text encoders, projections, L2 norm, temperature (and bias).

One module serves CLIP (Radford et al. 2021), SigLIP (Zhai et al. 2023: adds the learned `logit_bias`), LiT
(Zhai et al. 2022: the image tower is frozen by the optimiser, not here), SLIP (Mu et al. 2022: a SimCLR MLP
head on two augmented views) and FLIP (Li et al. 2023: random patch dropping in training). The outputs dict is
the contract consumed by `vlm_jax.objectives`:
  zimg, ztxt [B, E] L2-normalised float32; logit_scale = exp(min(log_logit_scale, ln 100)); logit_bias (SigLIP);
  img, txt: the encoder dicts {'pooled', 'tokens'}; zview1, zview2 (SLIP, when the batch has the views);
  with `token_embeddings` (FILIP, Yao et al. 2021): zimg_tokens [B, N, E], ztxt_tokens [B, L, E] (every token through
  the same projection, L2-normalised) and txt_mask [B, L] (`models.tokens.text_token_mask`: the words, from the
  text tower's SOT/EOT/pad ids); with `region_features` and a
  batch carrying 'boxes' [B, K, 4] and 'phrases' [B, K, Lp] (GLIP-style region-word alignment, Li et al. 2022):
  zregion, zphrase [B, K, E] L2-normalised (see `TwoTower.encode_regions` / `encode_phrases`), region_logit_scale,
  region_logit_bias.

Extension points (transfer and distillation build on these; the image tower's own options pass straight through):
  encode_image(images, *, prompts=None, keep_mask=None, train=False) -> zimg [B, E]
      prompts: VPT/MaPLe prompt tokens [n, (B,) P, D] (Jia et al. 2022; Khattak et al. 2023), keep_mask bool
      [B, N] (patches to attend to); both need a ViT image tower.
  encode_text(ids=None, *, embeddings=None, eot_positions=None, prompts=None, train=False) -> ztxt [B, E]
      token ids, or token embeddings [B, L, D] plus EOT positions [B] (CoOp's learned context, Zhou et al. 2022;
      `text_token_embeddings(ids)` and `eot_positions(ids)` give the tower's own), deep text prompts (MaPLe).
  image_features(images, *, layers=None, prompts=None, keep_mask=None, train=False) -> dict
      the image tower's multi-level features for dense heads and detectors: {'zimg', 'pooled', 'tokens', …} plus,
      for a ViT, 'intermediates' (list of [B, N, D] patch tokens after the blocks `layers`, default every block;
      negative indices count from the end) and 'grid' (h, w); for a ModifiedResNet, 'stages' (list of NHWC maps,
      the stages `layers` of [C2, C3, C4, C5], default all four). Works with scanned ViTs.
  encode_dense(images) -> [B, h, w, E]: MaskCLIP dense embeddings (below).
The text layout (SOT/EOT/pad ids) is the text tower's (`models.tokens`), copied from the tokenizer.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models import tokens as token_layout
from vlm_jax.models.masking import random_keep_indices
from vlm_jax.models.roi_align import roi_align, token_grid
from vlm_jax.models.tokens import text_token_mask
from vlm_jax.models.transformer import layer_norm

Dtype = Any
MAX_LOG_LOGIT_SCALE = math.log(100.)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x||_2 along the last axis, computed in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _projection(features: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = False) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


class SimCLRHead(nn.Module):
  """SLIP's image SSL head (Mu et al. 2022; SimCLR, Chen et al. 2020): Linear-Norm-ReLU x2, then Linear.

  Deviation: SLIP uses (synchronised) BatchNorm; LayerNorm is used here so the model stays stateless.
  """
  hidden: int = 4096
  out: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(2):
      x = nn.Dense(self.hidden, name=f"fc{i + 1}", **kw,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
      x = nn.relu(layer_norm(name=f"norm{i + 1}", **kw)(x))
    return nn.Dense(self.out, name="fc3", **kw,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x)


class TwoTower(nn.Module):
  """CLIP/SigLIP/LiT/SLIP/FLIP two-tower model around an image encoder `img` and a text encoder `txt`.

  Both encoders return {'pooled', 'tokens'} and take `train=`; the image encoder must also accept
  `keep_idx=` and expose `num_patches(image_shape)` when `flip_mask_ratio > 0`. `project_image=False` skips
  the image projection (CLIP ResNets project inside their attention pool; SigLIP's image embedding is the MAP
  head's output). `text_proj_bias` gives the text projection a bias (SigLIP's text head, Zhai et al. 2023).
  `max_log_logit_scale` clamps log t (CLIP: ln 100, Radford et al. 2021); None leaves t unclamped, as SigLIP,
  whose trained t can exceed 100. `token_embeddings=True` adds FILIP's per-token embeddings to the outputs.
  """
  img: nn.Module
  txt: nn.Module
  embed_dim: int = 512
  logit_scale_init: float = math.log(1 / 0.07)
  logit_bias_init: float | None = None
  project_image: bool = True
  project_text: bool = True
  text_proj_bias: bool = False
  max_log_logit_scale: float | None = MAX_LOG_LOGIT_SCALE
  simclr_hidden: int = 0  # 0: no SimCLR head
  simclr_out: int = 0
  flip_mask_ratio: float = 0.0
  token_embeddings: bool = False  # FILIP: zimg_tokens, ztxt_tokens, txt_mask
  region_features: bool = False  # GLIP-style region-word alignment: zregion, zphrase (batches with boxes)
  roi_size: int = 2  # RoIAlign bins per side (each averaged over 2 × 2 bilinear samples)
  region_scale_init: float = math.log(10.)
  region_bias_init: float = -math.log(99.)  # prior π = 0.01 (RetinaNet, Lin et al. 2017)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.project_image:
      self.img_proj = _projection(self.embed_dim, "img_proj", self.dtype, self.param_dtype)
    if self.project_text:
      self.txt_proj = _projection(self.embed_dim, "txt_proj", self.dtype, self.param_dtype, self.text_proj_bias)
    self.log_logit_scale = self.param(
        "log_logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32)
    if self.logit_bias_init is not None:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), (), jnp.float32)
    if self.region_features:
      self.region_log_scale = self.param("region_log_scale", nn.initializers.constant(self.region_scale_init), (),
                                         jnp.float32)
      self.region_bias = self.param("region_bias", nn.initializers.constant(self.region_bias_init), (), jnp.float32)
    if self.simclr_hidden:
      self.simclr_head = SimCLRHead(self.simclr_hidden, self.simclr_out, self.dtype, self.param_dtype)

  def _embed_image(self, enc):
    z = self.img_proj(enc["pooled"]) if self.project_image else enc["pooled"]
    return l2_normalize(z)

  def _embed_text(self, enc):
    z = self.txt_proj(enc["pooled"]) if self.project_text else enc["pooled"]
    return l2_normalize(z)

  def _embed_image_tokens(self, tokens):
    """[B, N, E] L2-normalised image token embeddings through the pooled embedding's projection (FILIP)."""
    return l2_normalize(self.img_proj(tokens) if self.project_image else tokens)

  def _embed_text_tokens(self, tokens):
    """[B, L, E] L2-normalised text token embeddings through the pooled embedding's projection (FILIP)."""
    return l2_normalize(self.txt_proj(tokens) if self.project_text else tokens)

  def _image_tower(self, images, train: bool):
    """Image encoder; FLIP drops a random round(r N) patches per example in training (rng stream 'mask')."""
    if train and self.flip_mask_ratio > 0:
      if not hasattr(self.img, "num_patches"):
        raise UserError("flip_mask_ratio > 0 needs a ViT image tower")
      keep_idx = random_keep_indices(self.make_rng("mask"), images.shape[0], self.img.num_patches(images.shape),
                                     self.flip_mask_ratio)
      return self.img(images, keep_idx=keep_idx, train=train)
    return self.img(images, train=train)

  def _image_options(self, prompts, keep_mask) -> dict:
    """The ViT-only options that were given (a ResNet tower takes neither)."""
    options = {k: v for k, v in (("prompts", prompts), ("keep_mask", keep_mask)) if v is not None}
    if options and not hasattr(self.img, "num_patches"):
      raise UserError(f"image {' and '.join(options)} need a ViT image tower (kind='vit'), not "
                      f"{type(self.img).__name__}")
    return options

  def encode_image(self, images, *, prompts=None, keep_mask=None, train: bool = False):
    """L2-normalised image embeddings zimg [B, embed_dim] (float32); `prompts` (VPT/MaPLe) and `keep_mask`
    pass through to the ViT (module docstring)."""
    return self._embed_image(self.img(images, train=train, **self._image_options(prompts, keep_mask)))

  def encode_text(self, ids=None, *, embeddings=None, eot_positions=None, prompts=None, train: bool = False):
    """L2-normalised text embeddings ztxt [B, embed_dim] (float32) for token ids [B, L], or for token embeddings
    [B, L, D] with `eot_positions` [B] (CoOp); `prompts` are MaPLe's deep text prompts [n, (B,) P, D]."""
    return self._embed_text(self.txt(ids, embeddings=embeddings, eot_positions=eot_positions, prompts=prompts,
                                     train=train))

  def text_token_embeddings(self, ids):
    """The text tower's token embeddings [B, L, D] of ids [B, L] (no positions): what `encode_text(embeddings=…)`
    reads, so learned context vectors can replace some of them (CoOp, Zhou et al. 2022)."""
    return self.txt.embed(ids)

  def eot_positions(self, ids):
    """int32 [B]: where the text tower pools each row of ids (its EOT, from the tokenizer's layout)."""
    return token_layout.eot_positions(ids, getattr(self.txt, "eot_id", None))

  def image_features(self, images, *, layers=None, prompts=None, keep_mask=None, train: bool = False) -> dict:
    """Multi-level image features for dense heads and detectors (module docstring): the image tower's dict plus
    'zimg' and, for a ViT, 'intermediates' (after blocks `layers`, default all) and 'grid'; for a ResNet,
    'stages' (the stages `layers` of [C2, C3, C4, C5], default all four)."""
    options = self._image_options(prompts, keep_mask)
    if hasattr(self.img, "num_patches"):
      depth = self.img.depth
      enc = self.img(images, train=train, intermediates=tuple(range(depth)) if layers is None else tuple(layers),
                     **options)
      enc["grid"] = tuple(self.img.grid_size(images.shape[1:3]))
    else:
      enc = self.img(images, train=train, stages=True)
      picked = range(4) if layers is None else layers
      for i in picked:
        if not -4 <= int(i) < 4:
          raise UserError(f"ResNet stage index {i} is out of range: a ModifiedResNet has 4 stages (0..3)")
      enc["stages"] = [enc["stages"][int(i)] for i in picked]
    return {**enc, "zimg": self._embed_image(enc)}

  def encode_image_tokens(self, images, *, train: bool = False):
    """L2-normalised per-token image embeddings [B, N, embed_dim] (FILIP, Yao et al. 2021)."""
    return self._embed_image_tokens(self.img(images, train=train)["tokens"])

  def encode_text_tokens(self, ids, *, train: bool = False):
    """L2-normalised per-token text embeddings [B, L, embed_dim] (FILIP); `text_token_mask` marks the words."""
    return self._embed_text_tokens(self.txt(ids, train=train)["tokens"])

  def _region_embeddings(self, tokens, image_hw, boxes):
    """RoIAlign (He et al. 2017) of the image tokens on their patch grid at `boxes` [B, K, 4] (normalised x0, y0,
    x1, y1), bins averaged, then the token projection and L2 norm: [B, K, embed_dim]."""
    pooled = roi_align(token_grid(tokens, image_hw), boxes, self.roi_size).mean(axis=(2, 3))
    return self._embed_image_tokens(pooled.astype(tokens.dtype))

  def encode_regions(self, images, boxes, *, train: bool = False):
    """L2-normalised region embeddings [B, K, embed_dim] of `boxes` [B, K, 4] (see `_region_embeddings`)."""
    return self._region_embeddings(self.img(images, train=train)["tokens"], images.shape[1:3], boxes)

  def encode_phrases(self, phrases, *, train: bool = False):
    """L2-normalised phrase embeddings [..., embed_dim] of token ids [..., Lp]: each phrase ("crimson disk") is
    encoded alone by the text tower and pooled like a caption (ztxt of the phrase)."""
    lead = phrases.shape[:-1]
    z = self.encode_text(phrases.reshape(-1, phrases.shape[-1]), train=train)
    return z.reshape(*lead, z.shape[-1])

  def region_logit_params(self):
    """(t_rw, b_rw): the region-word logit scale exp(region_log_scale) (clamped at 100) and bias."""
    return jnp.exp(jnp.minimum(self.region_log_scale, MAX_LOG_LOGIT_SCALE)), self.region_bias

  def encode_dense(self, images, *, train: bool = False):
    """L2-normalised dense image embeddings [B, h, w, embed_dim] (float32), MaskCLIP-style (Zhou et al. 2022).

    The image tower's dense tokens (`dense=True`: the value path of the last attention, see `ViT` and
    `ModifiedResNet`) pass through the same image projection as the pooled embedding, so each location can be
    scored against text embeddings. (h, w) is the token grid, row-major, with the image's aspect ratio.
    """
    tokens = self.img(images, train=train, dense=True)["tokens"]
    z = l2_normalize(self.img_proj(tokens) if self.project_image else tokens)
    b, n, e = z.shape
    h = max(1, int(round(math.sqrt(n * images.shape[1] / images.shape[2]))))
    if n % h:
      raise ValueError(f"cannot arrange {n} dense tokens into a grid for images of shape {images.shape}")
    return z.reshape(b, h, n // h, e)

  def logit_scale(self):
    """Temperature t = exp(min(log_logit_scale, ln 100)) (CLIP clamps the learned scale at 100; see
    `max_log_logit_scale`)."""
    if self.max_log_logit_scale is None:
      return jnp.exp(self.log_logit_scale)
    return jnp.exp(jnp.minimum(self.log_logit_scale, self.max_log_logit_scale))

  def __call__(self, batch, *, train: bool = False):
    """batch: {'image' [B,H,W,3], 'text' int [B,L], optional 'image_view1'/'image_view2'} -> outputs dict."""
    img = self._image_tower(batch["image"], train)
    txt = self.txt(batch["text"], train=train)
    out = {"zimg": self._embed_image(img), "ztxt": self._embed_text(txt),
           "logit_scale": self.logit_scale(), "img": img, "txt": txt}
    if self.logit_bias_init is not None:
      out["logit_bias"] = self.logit_bias
    if self.token_embeddings:
      out["zimg_tokens"] = self._embed_image_tokens(img["tokens"])
      out["ztxt_tokens"] = self._embed_text_tokens(txt["tokens"])
      out["txt_mask"] = text_token_mask(batch["text"], **token_layout.layout_of(self.txt))
    if self.region_features and "boxes" in batch and "phrases" in batch:
      out["zregion"] = self._region_embeddings(img["tokens"], batch["image"].shape[1:3], batch["boxes"])
      out["zphrase"] = self.encode_phrases(batch["phrases"], train=train)
      out["region_logit_scale"], out["region_logit_bias"] = self.region_logit_params()
    if self.simclr_hidden and "image_view1" in batch and "image_view2" in batch:
      for k in ("1", "2"):
        pooled = self.img(batch["image_view" + k], train=train)["pooled"]
        out["zview" + k] = l2_normalize(self.simclr_head(pooled))
    return out


def build(cfg: dict) -> TwoTower:
  """The 'two_tower' framework's builder (`vlm_jax.models.FRAMEWORKS`)."""
  from vlm_jax.models import build_two_tower  # noqa: PLC0415 (models/__init__ imports this module lazily)
  return build_two_tower(cfg)
