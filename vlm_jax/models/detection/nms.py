"""Non-maximum suppression in JAX with a fixed output size (jit-able, vmap-able, shardable over the batch).

Greedy NMS (Felzenszwalb et al. 2010; as used by Faster R-CNN, Ren et al. 2015 §3.3): repeatedly keep the
highest-scoring remaining box and discard every remaining box whose IoU with it exceeds `iou_threshold`
(IoU > t is suppressed, IoU = t survives: torchvision's rule). Ties in score are broken by the lower index (a
stable descending sort), so the kept list equals the numpy reference `order = argsort(-scores, stable)`; for i in
order: keep i unless suppressed; suppress j with IoU(i, j) > t.

Fixed shapes: `nms` returns `max_out` slots — the kept indices in decreasing score order — plus a `valid` mask;
unused slots hold index 0 and valid False. Boxes with score −inf (or NaN) are never kept: padding. The loop runs
at most `max_out` steps and stops early once no box remains; each step costs O(N) (one IoU row), so memory is
linear in N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.models.detection.boxes import box_iou


def _nms_single(boxes: jax.Array, scores: jax.Array, iou_threshold: float, max_out: int):
  n = boxes.shape[0]
  alive = scores > -jnp.inf  # False for -inf and NaN
  arange = jnp.arange(n)

  def cond(carry):
    k, alive, _, _ = carry
    return (k < max_out) & jnp.any(alive)

  def body(carry):
    k, alive, idx, valid = carry
    i = jnp.argmax(jnp.where(alive, scores, -jnp.inf))
    iou = box_iou(boxes[i][None], boxes)[0]
    alive = alive & (iou <= iou_threshold) & (arange != i)
    return k + 1, alive, idx.at[k].set(i.astype(jnp.int32)), valid.at[k].set(True)

  init = (jnp.int32(0), alive, jnp.zeros((max_out,), jnp.int32), jnp.zeros((max_out,), bool))
  _, _, idx, valid = jax.lax.while_loop(cond, body, init)
  return idx, valid


def nms(boxes: jax.Array, scores: jax.Array, *, iou_threshold: float, max_out: int):
  """Greedy NMS of boxes [..., N, 4] (xyxy) with scores [..., N] -> (indices int32 [..., max_out], valid bool
  [..., max_out]): the kept boxes in decreasing score order, padded (module docstring). Leading dims are mapped."""
  boxes, scores = jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32)
  fn = lambda b, s: _nms_single(b, s, float(iou_threshold), int(max_out))  # noqa: E731
  for _ in range(scores.ndim - 1):
    fn = jax.vmap(fn)
  return fn(boxes, scores)


def batched_nms(boxes: jax.Array, scores: jax.Array, groups: jax.Array, *, iou_threshold: float, max_out: int):
  """NMS within each group (class or pyramid level) independently, one ranked output: the offset trick (boxes of
  group g shifted by g · (extent + 1), so boxes of different groups never overlap), then `nms`.
  boxes [..., N, 4], scores [..., N], groups int [..., N] >= 0 -> (indices [..., max_out], valid [..., max_out])."""
  boxes = jnp.asarray(boxes, jnp.float32)
  lo = jnp.min(boxes, axis=(-2, -1), keepdims=True)
  span = jnp.max(boxes, axis=(-2, -1), keepdims=True) - lo + 1.0
  shifted = boxes - lo + groups[..., None].astype(jnp.float32) * span
  return nms(jax.lax.stop_gradient(shifted), scores, iou_threshold=iou_threshold, max_out=max_out)
