"""Masked image modelling model (framework 'mae'): a ViT encoder on the visible patches and a light decoder.

MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377): per example a uniform
random subset of round(r·N) of the N patches is masked (r = `mask_ratio`, 0.75), the encoder sees only the
visible ones, and a narrow decoder — a projection to its own width, a learned mask token at every masked
position, fixed 2-D sin-cos position embeddings, its own transformer blocks and a linear head — predicts every
patch. The target of patch n is its pixels x_n ∈ R^{p²·3} (raster order (row, column, channel) inside the
patch), normalised per patch when `norm_pix_loss` (MAE §3, "normalized pixels"):

    x̂_n = (x_n − mean(x_n)) / sqrt(var(x_n) + 1e-6)          (var with Bessel's correction, as MAE's code)

(`models.patches`: `patchify` and `pixel_targets`, shared with the two-leg model's MIM/MCM heads).

Feature targets (`teacher` given): the target of patch n is the frozen teacher's feature at n (its 'tokens' on
the unmasked image, bilinearly resized to the student's patch grid when the grids differ), regressed with
`objectives.masked_image.mim_feature_loss` — EVA (Fang et al. 2022, arXiv:2211.07636) and MVP (Wei et al. 2022)
regress CLIP image features. Deviation: EVA and MVP feed mask tokens through the encoder (BEiT style); here the
MAE encoder-decoder is kept (encoder on visible patches only, as MILAN, Hou et al. 2022, does with CLIP targets).

Outputs: 'mim' = {'pred' [B,N,D], 'target' [B,N,D], 'mask' [B,N] (1 = masked, carries the loss)}, 'img' = the
encoder dict on the visible patches, 'keep_idx' [B,K]. `encode_image(images)` = the encoder's pooled features on
the whole, unmasked image (linear probe).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.masking import masked_from_keep, random_keep_indices
from vlm_jax.models.patches import pixel_targets
from vlm_jax.models.transformer import Encoder
from vlm_jax.models.vit import posemb_sincos_2d

Dtype = Any


def resize_tokens(tokens: jax.Array, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> jax.Array:
  """Bilinearly resizes [B, h·w, D] token maps from `src_grid` to `dst_grid` (identity when equal)."""
  if tuple(src_grid) == tuple(dst_grid):
    return tokens
  b, _, d = tokens.shape
  x = tokens.reshape(b, *src_grid, d).astype(jnp.float32)
  x = jax.image.resize(x, (b, *dst_grid, d), method="bilinear")
  return x.reshape(b, dst_grid[0] * dst_grid[1], d)


def token_grid(n: int, image_hw: tuple[int, int]) -> tuple[int, int]:
  """The (h, w) grid of n row-major tokens of an image of size (H, W) (h/w ≈ H/W)."""
  h = max(1, int(round(math.sqrt(n * image_hw[0] / image_hw[1]))))
  if n % h:
    raise UserError(f"cannot arrange {n} teacher tokens into a grid for {image_hw[0]}x{image_hw[1]} images")
  return h, n // h


class MAE(nn.Module):
  """Masked autoencoder around a ViT `encoder` (module docstring). `teacher`: frozen image encoder whose
  patch features are the targets (EVA/MVP); None: pixel targets. `target_dim` is the teacher's feature width
  (ignored for pixels, whose width is patch_size²·channels)."""
  encoder: nn.Module
  mask_ratio: float = 0.75
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int = 2048
  norm_pix_loss: bool = True
  channels: int = 3
  teacher: nn.Module | None = None
  target_dim: int = 0
  scan: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if not 0.0 < self.mask_ratio < 1.0:
      raise UserError(f"mae mask_ratio must be in (0, 1), got {self.mask_ratio}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.decoder_embed = nn.Dense(
        self.decoder_width, name="decoder_embed", **kw,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
    self.mask_token = self.param("mask_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "mlp")), (1, 1, self.decoder_width), self.param_dtype)
    self.decoder = Encoder(depth=self.decoder_depth, num_heads=self.decoder_heads, mlp_dim=self.decoder_mlp_dim,
                           scan=self.scan, remat=self.remat, name="decoder", **kw)
    out = self.target_dim if self.teacher is not None else self.encoder.patch_size ** 2 * self.channels
    self.decoder_pred = nn.Dense(
        out, name="decoder_pred", **kw,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("mlp", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))

  def encode_image(self, images, *, train: bool = False):
    """Pooled encoder features [B, D_enc] (float32) of the whole, unmasked image (linear probe)."""
    return self.encoder(images, train=train)["pooled"].astype(jnp.float32)

  def decode(self, enc: dict, keep_idx: jax.Array, grid: tuple[int, int], *, train: bool = False) -> jax.Array:
    """Decoder predictions [B, N, D_out] for every patch from the encoder dict of the visible patches.

    Token 0 of the decoder input is the encoder's pooled feature (MAE keeps the [CLS] token), then the N
    patch slots: the projected visible tokens at their positions, the mask token elsewhere, each plus the
    decoder's fixed sin-cos position embedding. The pooled slot is dropped from the output.
    """
    b, n = keep_idx.shape[0], grid[0] * grid[1]
    vis = self.decoder_embed(enc["tokens"])
    pooled = self.decoder_embed(enc["pooled"])[:, None]
    full = jnp.broadcast_to(self.mask_token.astype(vis.dtype), (b, n, self.decoder_width))
    full = full.at[jnp.arange(b)[:, None], keep_idx].set(vis)
    full = full + posemb_sincos_2d(grid[0], grid[1], self.decoder_width).astype(vis.dtype)
    x = self.decoder(jnp.concatenate([pooled, full], axis=1), train=train)
    return self.decoder_pred(x[:, 1:]).astype(jnp.float32)

  def targets(self, images: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Per-patch targets [B, N, D_out]: (normalised) pixels, or the frozen teacher's features."""
    if self.teacher is None:
      return pixel_targets(images, self.encoder.patch_size, normalize=self.norm_pix_loss)
    tokens = self.teacher(images, train=False)["tokens"].astype(jnp.float32)
    tokens = resize_tokens(tokens, token_grid(tokens.shape[1], images.shape[1:3]), grid)
    return jax.lax.stop_gradient(tokens)

  def __call__(self, batch, *, train: bool = False):
    """batch {'image' [B,H,W,C], …} -> {'mim': {'pred','target','mask'}, 'img', 'keep_idx'}.

    Masking always happens (it is the task), with the rng stream 'mask'.
    """
    images = batch["image"]
    grid = self.encoder.grid_size(images.shape[1:3])
    n = grid[0] * grid[1]
    keep_idx = random_keep_indices(self.make_rng("mask"), images.shape[0], n, self.mask_ratio)
    enc = self.encoder(images, keep_idx=keep_idx, train=train)
    pred = self.decode(enc, keep_idx, grid, train=train)
    return {"mim": {"pred": pred, "target": self.targets(images, grid), "mask": masked_from_keep(keep_idx, n)},
            "img": enc, "keep_idx": keep_idx}


DECODER_KEYS = ("width", "depth", "num_heads", "mlp_dim")


def build(cfg: dict) -> MAE:
  """The 'mae' framework's builder. Keys: image (a ViT: kind 'vit', variant, …), mask_ratio (0.75),
  decoder (dict width 512, depth 8, num_heads 16, mlp_dim 2048 — MAE's), norm_pix_loss (True), teacher (None
  or a ViT encoder dict: feature targets), scan, remat, dtype, param_dtype."""
  from vlm_jax.models import IMAGE_KINDS, _plain, build_encoder, common_defaults  # noqa: PLC0415

  cfg = dict(cfg)
  cfg.pop("framework", None)
  defaults = common_defaults(cfg)
  image_cfg = _plain(cfg.get("image"))
  if image_cfg.get("kind") != "vit":
    raise UserError(f"the 'mae' framework needs a ViT image encoder (image.kind='vit'), got "
                    f"{image_cfg.get('kind')!r}; image kinds elsewhere: {', '.join(IMAGE_KINDS)}")
  encoder = build_encoder(image_cfg, defaults, ("vit",))
  dec = {"width": 512, "depth": 8, "num_heads": 16, "mlp_dim": 2048, **_plain(cfg.get("decoder"))}
  unknown = sorted(set(dec) - set(DECODER_KEYS))
  if unknown:
    raise UserError(f"unknown mae decoder option(s) {unknown}; valid: {list(DECODER_KEYS)}")
  teacher_cfg = _plain(cfg.get("teacher"))
  teacher = build_encoder(teacher_cfg, defaults, ("vit",)) if teacher_cfg else None
  known = {"image", "decoder", "teacher", "mask_ratio", "norm_pix_loss", "scan", "remat", "dtype", "param_dtype",
           "attention"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise UserError(f"unknown mae model option(s) {unknown}; valid: {sorted(known)}")
  return MAE(encoder=encoder, mask_ratio=float(cfg.get("mask_ratio", 0.75)), decoder_width=int(dec["width"]),
             decoder_depth=int(dec["depth"]), decoder_heads=int(dec["num_heads"]),
             decoder_mlp_dim=int(dec["mlp_dim"]), norm_pix_loss=bool(cfg.get("norm_pix_loss", True)),
             teacher=teacher, target_dim=int(teacher.width) if teacher is not None else 0,
             scan=defaults["scan"], remat=defaults["remat"], dtype=defaults["dtype"],
             param_dtype=defaults["param_dtype"])
