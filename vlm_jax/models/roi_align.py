"""RoIAlign (He et al. 2017, "Mask R-CNN", arXiv 1703.06870 §3): box features by bilinear sampling of a grid.

A box is split into out × out bins; each bin is sampled at s × s regularly spaced points (bin-relative offsets
(a + ½)/s, a = 0..s−1), every point is read from the feature grid by bilinear interpolation, and the bin's value is
the mean of its points — no rounding of the box or of the bins (RoIPool's quantisation), which is the paper's fix.

Coordinates: boxes are (x0, y0, x1, y1) in normalised image coordinates [0, 1] (x right, y down). Feature cell
(i, j) of an H × W grid covers [j/W, (j+1)/W) × [i/H, (i+1)/H) and holds the value at its centre, so a point at
continuous grid position (u, v) = (x·W − ½, y·H − ½) (torchvision's `aligned=True`) interpolates between the
four cells around it; points beyond the outer cell centres are clamped to the border cells (torchvision returns 0 only
more than one cell outside the grid, which a box inside the image never reaches).

Bilinear sampling is written as two sparse interpolation matrices, value = Wy · F · Wxᵀ per channel, so the
whole operation is one einsum: exact, differentiable in the features (the boxes are data) and shardable over the
batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _interp_matrix(pos: jax.Array, size: int) -> jax.Array:
  """[..., P, size] bilinear weights of continuous grid positions pos [..., P] (cell centres at 0..size−1)."""
  pos = jnp.clip(pos, 0.0, size - 1.0)
  lo = jnp.floor(pos)
  frac = pos - lo
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, size - 1)
  cells = jnp.arange(size)
  return ((cells == lo[..., None]) * (1.0 - frac)[..., None]
          + (cells == hi[..., None]) * frac[..., None]).astype(jnp.float32)


def _sample_positions(lo: jax.Array, hi: jax.Array, size: int, out: int, sampling: int) -> jax.Array:
  """[..., out·sampling] grid positions of the sampling points of boxes spanning [lo, hi] (normalised)."""
  offsets = (jnp.arange(out * sampling, dtype=jnp.float32) + 0.5) / (out * sampling)
  return (lo[..., None] + (hi - lo)[..., None] * offsets) * size - 0.5


def roi_align(features: jax.Array, boxes: jax.Array, output_size: int = 2, sampling_ratio: int = 2) -> jax.Array:
  """RoIAlign of features [B, H, W, C] at boxes [B, K, 4] (normalised x0, y0, x1, y1) -> [B, K, out, out, C].

  Each of the out × out bins averages `sampling_ratio`² bilinear samples (module docstring). float32 output.
  """
  b, h, w, c = features.shape
  boxes = jnp.asarray(boxes, jnp.float32)
  s = int(sampling_ratio)
  wy = _interp_matrix(_sample_positions(boxes[..., 1], boxes[..., 3], h, output_size, s), h)  # [B, K, P, H]
  wx = _interp_matrix(_sample_positions(boxes[..., 0], boxes[..., 2], w, output_size, s), w)  # [B, K, Q, W]
  points = jnp.einsum("bkph,bkqw,bhwc->bkpqc", wy, wx, features.astype(jnp.float32), precision=_HIGHEST)
  points = points.reshape(b, boxes.shape[1], output_size, s, output_size, s, c)
  return points.mean(axis=(3, 5))


def token_grid(tokens: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
  """Patch tokens [B, N, C] (row-major) -> grid [B, h, w, C] with the image's aspect ratio."""
  b, n, c = tokens.shape
  height, width = image_hw
  h = max(1, int(round((n * height / width) ** 0.5)))
  if n % h:
    raise ValueError(f"cannot arrange {n} tokens into a grid for an image of {height}×{width}")
  return tokens.reshape(b, h, n // h, c)
