"""Image <-> patch-sequence rearrangements and MAE's normalised-pixel target: the one implementation of each.

A ViT with patch size p reads an image [B, H, W, C] as the row-major sequence of its (H/p)·(W/p) patches; patch n's
pixels, flattened in (row, column, channel) order inside the patch, form x_n ∈ R^{p·p·C} (`patchify`). Masked image
modelling regresses them, normalised per patch when `norm_pix_loss` (He et al. 2022, "Masked Autoencoders Are
Scalable Vision Learners", arXiv:2111.06377, §3 "normalized pixels"; used by `models.mae` and the two-leg model's
MIM/MCM heads):

    x̂_n = (x_n − μ_n) / sqrt(σ²_n + ε),   μ_n = (1/D) Σ_d x_nd,   σ²_n = 1/(D − 1) Σ_d (x_nd − μ_n)²,   ε = 1e-6.

Variance convention: ddof = 1 (Bessel's correction), because MAE's released code computes `target.var(dim=-1)` with
PyTorch, whose `Tensor.var` is the unbiased estimator by default; the paper's formula leaves it implicit. With
D = p²·3 ≥ 48 values per patch the two conventions differ by a factor sqrt(D/(D−1)) ≤ 1.011 in scale only.

An image whose sides are not multiples of p is a `UserError` (nothing is cropped silently).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError

NORM_PIX_EPS = 1e-6


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)·(W/p), p·p·C]: row-major patches, pixels (row, column, channel) inside each patch."""
  _, h, w, _ = images.shape
  if h % patch or w % patch:
    raise UserError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
  return einops.rearrange(images, "b (gh ph) (gw pw) c -> b (gh gw) (ph pw c)", ph=patch, pw=patch)


def unpatchify(patches: jax.Array, grid: tuple[int, int], patch: int, channels: int = 3) -> jax.Array:
  """Inverse of `patchify`: [B, gh·gw, p·p·C] -> [B, gh·p, gw·p, C] for the patch grid `grid` = (gh, gw)."""
  gh, gw = grid
  return einops.rearrange(patches, "b (gh gw) (ph pw c) -> b (gh ph) (gw pw) c", gh=gh, gw=gw, ph=patch, pw=patch,
                          c=channels)


def normalize_patches(patches: jax.Array, eps: float = NORM_PIX_EPS) -> jax.Array:
  """x̂_n = (x_n − μ_n) / sqrt(σ²_n + ε) over each patch's values, σ² with ddof 1 (module docstring); float32."""
  x = patches.astype(jnp.float32)
  mean = x.mean(axis=-1, keepdims=True)
  var = x.var(axis=-1, keepdims=True, ddof=1)
  return (x - mean) / jnp.sqrt(var + eps)


def pixel_targets(images: jax.Array, patch: int, *, normalize: bool = True) -> jax.Array:
  """MIM pixel targets [B, N, p·p·C] (float32): `patchify`, then `normalize_patches` when `normalize`."""
  x = patchify(images.astype(jnp.float32), patch)
  return normalize_patches(x) if normalize else x
