"""Box arithmetic for detectors: IoU, the Faster R-CNN box parameterisation, clipping.

Convention everywhere in `vlm_jax.models.detection`: boxes are (x0, y0, x1, y1) in pixels of the (resized) input
image, x right, y down, continuous coordinates (width = x1 − x0, no "+1" — Detectron2 / torchvision), float32.
Every function is jit-able and broadcasts over leading dims (…, N, 4).

Box parameterisation (Ren et al. 2015, "Faster R-CNN", arXiv 1506.01497, eq. 2; Girshick et al. 2014, R-CNN
appendix C): for a reference box (anchor or proposal) with centre (x_a, y_a) and size (w_a, h_a) and a target box
(x, y, w, h),

    t_x = w_x (x − x_a) / w_a,   t_y = w_y (y − y_a) / h_a,   t_w = w_w log(w / w_a),   t_h = w_h log(h / h_a)

with weights (w_x, w_y, w_w, w_h): (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the Fast R-CNN box head
(Detectron's normalisation of the regression targets). `decode` inverts it and clamps t_w / w_w and t_h / w_h at
log(1000 / 16) so exp() cannot overflow on a wild prediction (Detectron2's `scale_clamp`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

SCALE_CLAMP = math.log(1000.0 / 16)
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def box_area(boxes: jax.Array) -> jax.Array:
  """[..., N] area of xyxy boxes (0 for degenerate ones)."""
  return jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Intersection over union [..., N, M] of boxes a [..., N, 4] and b [..., M, 4]: |a ∩ b| / |a ∪ b|, 0 where the
  union is empty."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def _centre_size(boxes: jax.Array):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes: jax.Array, anchors: jax.Array, weights: Sequence[float] = RPN_WEIGHTS) -> jax.Array:
  """Regression targets t [..., 4] of `boxes` relative to `anchors` (both [..., 4] xyxy; module docstring, eq. 2).
  Reference boxes must have positive size; target sizes are floored at 1e-6 pixels before the log."""
  wx, wy, ww, wh = (float(w) for w in weights)
  boxes, anchors = jnp.asarray(boxes, jnp.float32), jnp.asarray(anchors, jnp.float32)
  ax, ay, aw, ah = _centre_size(anchors)
  gx, gy, gw, gh = _centre_size(boxes)
  return jnp.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                    ww * jnp.log(jnp.maximum(gw, 1e-6) / aw), wh * jnp.log(jnp.maximum(gh, 1e-6) / ah)], axis=-1)


def decode(deltas: jax.Array, anchors: jax.Array, weights: Sequence[float] = RPN_WEIGHTS) -> jax.Array:
  """Boxes [..., 4] xyxy from regression deltas [..., 4] and reference boxes [..., 4]: the inverse of `encode`,
  x = x_a + w_a t_x / w_x, w = w_a exp(min(t_w / w_w, log(1000/16))) (same for y, h)."""
  wx, wy, ww, wh = (float(w) for w in weights)
  deltas, anchors = jnp.asarray(deltas, jnp.float32), jnp.asarray(anchors, jnp.float32)
  ax, ay, aw, ah = _centre_size(anchors)
  cx = ax + aw * deltas[..., 0] / wx
  cy = ay + ah * deltas[..., 1] / wy
  w = aw * jnp.exp(jnp.minimum(deltas[..., 2] / ww, SCALE_CLAMP))
  h = ah * jnp.exp(jnp.minimum(deltas[..., 3] / wh, SCALE_CLAMP))
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def clip_boxes(boxes: jax.Array, hw) -> jax.Array:
  """Boxes [..., 4] clipped to the image [0, w] × [0, h]; `hw` = (height, width), numbers or arrays broadcasting
  against the boxes' leading dims (e.g. [..., 1] per-image sizes)."""
  h, w = hw
  x = jnp.clip(boxes[..., 0::2], 0.0, jnp.asarray(w, jnp.float32)[..., None])
  y = jnp.clip(boxes[..., 1::2], 0.0, jnp.asarray(h, jnp.float32)[..., None])
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Elementwise smooth-L1 (Girshick 2015, "Fast R-CNN", eq. 3, with Detectron2's transition point β):
  0.5 x² / β for |x| < β, else |x| − 0.5 β; β = 0 is plain L1."""
  ax = jnp.abs(x)
  if beta <= 0:
    return ax
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)
