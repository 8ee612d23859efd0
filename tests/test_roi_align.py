"""RoIAlign on a patch grid: hand-computed cases and a loop-by-loop numpy reference of He et al.'s bilinear
sampling (torchvision's aligned=True convention, border clamping)."""

from __future__ import annotations

import numpy as np

from vlm_jax.models.roi_align import roi_align, token_grid


def _bilinear(f: np.ndarray, y: float, x: float) -> np.ndarray:
  h, w, _ = f.shape
  y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
  y0, x0 = int(np.floor(y)), int(np.floor(x))
  y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
  ly, lx = y - y0, x - x0
  return ((1 - ly) * (1 - lx) * f[y0, x0] + (1 - ly) * lx * f[y0, x1] + ly * (1 - lx) * f[y1, x0]
          + ly * lx * f[y1, x1])


def _reference(f: np.ndarray, box, out: int, s: int) -> np.ndarray:
  """One box on one [H, W, C] grid, point by point."""
  h, w, c = f.shape
  x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
  bw, bh = (x1 - x0) / out, (y1 - y0) / out
  res = np.zeros((out, out, c))
  for i in range(out):
    for j in range(out):
      for a in range(s):
        for b in range(s):
          y = y0 + i * bh + (a + 0.5) * bh / s - 0.5
          x = x0 + j * bw + (b + 0.5) * bw / s - 0.5
          res[i, j] += _bilinear(f, y, x) / (s * s)
  return res


def test_matches_pointwise_reference():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  boxes = np.array([[[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.55, 0.9], [0.6, 0.05, 0.95, 0.4]],
                    [[0.3, 0.3, 0.35, 0.32], [0.0, 0.5, 0.5, 1.0], [0.25, 0.25, 0.75, 0.75]]], np.float32)
  got = np.asarray(roi_align(f, boxes, output_size=2, sampling_ratio=2))
  assert got.shape == (2, 3, 2, 2, 3)
  for bi in range(2):
    for k in range(3):
      np.testing.assert_allclose(got[bi, k], _reference(f[bi], boxes[bi, k], 2, 2), rtol=1e-5, atol=1e-6)


def test_hand_computed_cases():
  """A linear ramp f = column index is reproduced exactly inside the grid; a whole-cell box reads its cell."""
  ramp = np.tile(np.arange(4, dtype=np.float32)[None, :, None], (4, 1, 1))[None]  # [1, 4, 4, 1], f(i, j) = j
  # box x ∈ [0.25, 0.75] -> grid x ∈ [1, 3]: sample positions 1 + (b + ½)/2 · 2 − ½ = 1, 2 (1 bin, 2 samples)
  out = roi_align(ramp, np.array([[[0.25, 0.25, 0.75, 0.75]]]), output_size=1, sampling_ratio=2)
  np.testing.assert_allclose(np.asarray(out).reshape(()), 1.5, rtol=1e-6)
  cell = np.zeros((1, 4, 4, 1), np.float32)
  cell[0, 2, 1, 0] = 7.0  # the box of cell (row 2, column 1) samples its centre only
  out = roi_align(cell, np.array([[[0.25, 0.5, 0.5, 0.75]]]), output_size=1, sampling_ratio=1)
  np.testing.assert_allclose(np.asarray(out).reshape(()), 7.0, rtol=1e-6)


def test_token_grid_is_row_major():
  tokens = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
  grid = np.asarray(token_grid(tokens, (20, 30)))  # 2 rows × 3 columns
  assert grid.shape == (2, 2, 3, 1) and grid[0, 1, 0, 0] == 3
