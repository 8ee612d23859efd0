"""Anchor boxes of a feature pyramid (Ren et al. 2015, "Faster R-CNN" §3.1.1; Lin et al. 2017, "Feature Pyramid
Networks for Object Detection", arXiv 1612.03144, §4.1).

FPN convention: level l (stride s_l) carries anchors of one area (size_l², e.g. 32² on P2 … 512² on P6) at several
aspect ratios r = h / w (0.5, 1, 2): w = size / √r, h = size · √r. Cell (i, j) of an h × w map centres its anchors
at ((j + ½) s_l, (i + ½) s_l) in pixels (the cell's centre; Detectron2's `offset=0.5`). Order: level by level,
then cells row-major (i, then j), then the A = len(sizes_l) · len(ratios) cell anchors (sizes outer, ratios inner)
— the order in which `RPNHead` flattens its per-level outputs. Computed in numpy: the result is a constant for
static feature sizes, and folds into a jit-compiled program.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vlm_jax.errors import UserError

FPN_SIZES = (32, 64, 128, 256, 512)  # P2..P6 (Lin et al. 2017, §4.1)
FPN_RATIOS = (0.5, 1.0, 2.0)


def _per_level(sizes, levels: int) -> list[tuple[float, ...]]:
  if len(sizes) != levels:
    raise UserError(f"anchor sizes give {len(sizes)} levels but the pyramid has {levels}")
  return [tuple(float(v) for v in (s if isinstance(s, (tuple, list)) else (s,))) for s in sizes]


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
  """[len(sizes)·len(ratios), 4] xyxy anchors centred at (0, 0): area size², h / w = ratio."""
  out = []
  for size in sizes:
    for r in ratios:
      w = size / np.sqrt(r)
      h = size * np.sqrt(r)
      out.append((-w / 2, -h / 2, w / 2, h / 2))
  return np.asarray(out, np.float32)


def num_cell_anchors(sizes, ratios) -> int:
  """Anchors per feature-map cell (the same on every level): len(sizes_l) · len(ratios)."""
  counts = {len(s) for s in _per_level(sizes, len(sizes))}
  if len(counts) != 1:
    raise UserError(f"every pyramid level needs the same number of anchor sizes, got {sizes}")
  return counts.pop() * len(ratios)


def anchors(feature_hw: Sequence[tuple[int, int]], strides: Sequence[float], sizes=FPN_SIZES,
            ratios: Sequence[float] = FPN_RATIOS) -> np.ndarray:
  """All anchors [A, 4] (float32 xyxy pixels) of maps of sizes `feature_hw` [(h, w) per level] with `strides`;
  `sizes` one size (or a tuple of sizes) per level; order and centres as the module docstring."""
  if len(feature_hw) != len(strides):
    raise UserError(f"{len(feature_hw)} feature maps but {len(strides)} strides")
  out = []
  for (h, w), stride, level_sizes in zip(feature_hw, strides, _per_level(sizes, len(feature_hw))):
    cells = cell_anchors(level_sizes, ratios)  # [a, 4]
    ys, xs = np.meshgrid((np.arange(h) + 0.5) * stride, (np.arange(w) + 0.5) * stride, indexing="ij")
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
    out.append((shifts + cells[None]).reshape(-1, 4))
  return np.concatenate(out, axis=0).astype(np.float32)


def level_counts(feature_hw: Sequence[tuple[int, int]], per_cell: int) -> list[int]:
  """Anchors per level (h · w · per_cell), in `anchors` order: how to split the concatenated [A] axis by level."""
  return [int(h) * int(w) * int(per_cell) for h, w in feature_hw]
