"""Shape rasters, background textures and anti-aliased compositing shared by the procedural datasets.

`synthetic.SyntheticShapes` (the pre-training data), `synthetic_shift` (distribution-shift classification tasks)
and `synthetic_scenes` (open-vocabulary detection/segmentation scenes) all draw with these functions:

    shape_mask(shape)              bool raster of a filled shape over [-1, 1]² (128² samples inside a margin)
    outline_mask(shape, width)     its outline: the filled raster minus the raster eroded by `width` (of [-1, 1])
    texture_bank(seed, size)       N_TEXTURES unit textures [N, S, S] in [-1, 1] (noise, stripes, checks, waves)
    subpixels(size, supersample)   supersampling coordinates of the pixels of one image axis
    paint(img, raster, centre, diameter, rgb, …)   composites one object onto a float image in place (alpha =
                                   fraction of the supersampled points inside the raster) and returns its
                                   window and alpha, from which instance masks are taken (alpha ≥ 0.5)

Coordinates are pixels, pixel i covering [i, i + 1); a shape of diameter d at (cx, cy) spans [-1, 1]² scaled to
[cx − d/2, cx + d/2] × [cy − d/2, cy + d/2].
"""

from __future__ import annotations

import numpy as np

N_TEXTURES = 256  # background textures per source (each scene adds its own grey level, tint and contrast)


def _polygon(n: int, radius: float = 1.0, phase: float = -np.pi / 2, inner: float | None = None):
  """Vertices of a regular n-gon (or a 2n-point star when `inner` is set), first vertex at `phase`."""
  if inner is None:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], -1)
  a = phase + np.pi * np.arange(2 * n) / n
  r = np.where(np.arange(2 * n) % 2 == 0, radius, inner)
  return np.stack([r * np.cos(a), r * np.sin(a)], -1)


_STAR = _polygon(5, 1.0, inner=0.45)
_STAR[:, 1] += 0.1
_HEXAGON = _polygon(6, 0.97, phase=0.0)


def _in_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
  """Even-odd crossing test of points (u, v) against a closed polygon [E, 2]."""
  inside = np.zeros(u.shape, bool)
  x0, y0 = poly[:, 0], poly[:, 1]
  x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
  for a, b, c, d in zip(x0, y0, x1, y1):
    crosses = (b > v) != (d > v)
    xint = a + (v - b) * (c - a) / (d - b + 1e-12)
    inside ^= crosses & (u < xint)
  return inside


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside-test of a named shape on normalised coordinates u (right), v (down) in [-1, 1]."""
  r2 = u * u + v * v
  if shape == "circle":
    return r2 <= 0.92 ** 2
  if shape == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.78
  if shape == "triangle":
    return (v <= 0.75) & (np.abs(u) <= (v + 0.95) * 0.57)
  if shape == "diamond":
    return np.abs(u) * 1.05 + np.abs(v) * 0.95 <= 1.0
  if shape == "star":
    return _in_polygon(u, v, _STAR)
  if shape == "cross":
    return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
  if shape == "heart":
    x, y = u * 1.2, -v * 1.2 + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
  if shape == "ring":
    return (r2 <= 0.95 ** 2) & (r2 >= 0.5 ** 2)
  if shape == "crescent":
    return (r2 <= 0.95 ** 2) & ((u - 0.45) ** 2 + (v + 0.15) ** 2 >= 0.75 ** 2)
  if shape == "hexagon":
    return _in_polygon(u, v, _HEXAGON)
  raise ValueError(f"unknown shape {shape!r}")


MASK_RES = 128  # raster samples across [-1, 1]
MASK_OFF = 96  # raster index of u = -1: a wide margin of "outside" so lookups never need clipping
MASK_MID = MASK_OFF + MASK_RES // 2  # raster index of the shape centre (u = 0)
_MASKS: dict[tuple[str, float], np.ndarray] = {}


def shape_mask(shape: str) -> np.ndarray:
  """bool raster of a shape: [-1, 1]² sampled at 128², inside a margin of `False`; computed once."""
  key = (shape, 0.0)
  if key not in _MASKS:
    n = MASK_RES + 2 * MASK_OFF
    g = ((np.arange(n, dtype=np.float32) - MASK_OFF) + 0.5) / MASK_RES * 2 - 1
    u, v = np.meshgrid(g, g)
    _MASKS[key] = _inside(shape, u, v)
  return _MASKS[key]


def outline_mask(shape: str, width: float) -> np.ndarray:
  """The shape's outline raster: inside points within `width` (a fraction of the half-size 1) of the outside,
  i.e. the filled raster minus its erosion by a disk of that radius; computed once per (shape, width)."""
  key = (shape, float(width))
  if key not in _MASKS:
    from scipy import ndimage  # noqa: PLC0415 (only the outline renderer needs it)
    fill = shape_mask(shape)
    r = max(1, int(round(width * MASK_RES / 2)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    eroded = ndimage.binary_erosion(fill, structure=(xx * xx + yy * yy) <= r * r)
    _MASKS[key] = fill & ~eroded
  return _MASKS[key]


def texture_bank(seed: int, size: int, n: int = N_TEXTURES) -> np.ndarray:
  """`n` unit textures [n, S, S] float32 in [-1, 1], a pure function of (seed, size): smooth noise, stripes,
  checkerboards and concentric waves of random scale, angle and phase (kind = index mod 4)."""
  s = int(size)
  rng = np.random.default_rng((int(seed), 7919, s))
  y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
  bank = np.empty((n, s, s), np.float32)
  for t in range(n):
    kind, freq, angle, phase = t % 4, rng.uniform(2.0, 6.0), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    if kind == 0:  # smooth noise: a coarse random grid, bilinearly upsampled
      g = rng.uniform(-1, 1, (6, 6)).astype(np.float32)
      gx, gy = x * 5, y * 5
      i, j = gy.astype(np.int32), gx.astype(np.int32)
      fy, fx = gy - i, gx - j
      bank[t] = (g[i, j] * (1 - fy) * (1 - fx) + g[i + 1, j] * fy * (1 - fx) + g[i, j + 1] * (1 - fy) * fx
                 + g[i + 1, j + 1] * fy * fx)
    elif kind == 1:  # stripes
      bank[t] = np.sin((2 * np.pi * freq) * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    elif kind == 2:  # checkerboard
      p = max(2, int(s / (2 * freq)))
      bank[t] = (((x * s).astype(np.int32) // p + (y * s).astype(np.int32) // p) % 2) * 2 - 1
    else:  # concentric waves
      bank[t] = np.sin((4 * np.pi * freq) * np.hypot(x - 0.5, y - 0.5) + phase)
  return bank


def subpixels(size: int, supersample: int) -> np.ndarray:
  """x (or y) coordinates of the supersampling points, [S * supersample], pixel i covering [i, i + 1)."""
  ss = int(supersample)
  return ((np.arange(int(size), dtype=np.float32)[:, None] + (np.arange(ss, dtype=np.float32) + 0.5) / ss)
          .reshape(-1))


def paint(img: np.ndarray, raster: np.ndarray, centre: tuple[float, float], diameter: float, rgb,
          coords: np.ndarray, supersample: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
  """Composites one object onto `img` (float32 [S, S, 3] in [0, 1], in place): colour `rgb` (0–255) with alpha =
  the fraction of the object's supersampled points (`coords` = `subpixels(S, supersample)`) inside `raster`.

  Returns ((y0, y1, x0, x1), alpha float32 [y1 − y0, x1 − x0]): the window the object touches and its alpha there.
  """
  s, ss = img.shape[0], int(supersample)
  cx, cy = centre
  r = diameter / 2
  x0, x1 = max(0, int(cx - r)), min(s, int(np.ceil(cx + r)))
  y0, y1 = max(0, int(cy - r)), min(s, int(np.ceil(cy + r)))
  # supersampled pixel centres -> indices into the shape's padded raster (the pad is outside the shape)
  scale = MASK_RES / (2 * r)
  iu = ((coords[x0 * ss:x1 * ss] - cx) * scale + MASK_MID).astype(np.int32)
  iv = ((coords[y0 * ss:y1 * ss] - cy) * scale + MASK_MID).astype(np.int32)
  inside = raster[iv[:, None], iu[None, :]]
  alpha = inside.reshape(y1 - y0, ss, x1 - x0, ss).sum(axis=(1, 3), dtype=np.float32)[..., None]
  alpha *= np.float32(1.0 / (ss * ss))
  col = np.asarray(rgb, np.float32) / 255.0
  img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + alpha * col
  return (y0, y1, x0, x1), alpha[..., 0]


def instance_annotations(inst: np.ndarray, classes, max_objects: int) -> dict[str, np.ndarray]:
  """Padded per-object annotations from an instance map (0 = background, k + 1 = object k of `classes`):
  'classes' int32 [K] (−1 = padding), 'boxes' float32 [K, 4] xyxy pixels (the tight box of the object's visible
  pixels; zeros for an object fully covered by others), 'semantic_mask' int32 [H, W] (class + 1, 0 background)."""
  out = np.full((max_objects,), -1, np.int32)
  out[:len(classes)] = classes
  boxes = np.zeros((max_objects, 4), np.float32)
  for k in range(len(classes)):
    ys, xs = np.nonzero(inst == k + 1)
    if len(xs):
      boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
  semantic = np.where(inst > 0, out[np.maximum(inst - 1, 0)] + 1, 0).astype(np.int32)
  return {"classes": out, "boxes": boxes, "semantic_mask": semantic}
