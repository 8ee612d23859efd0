"""Anchor / proposal matching to ground truth by IoU, and the random fg/bg minibatch sampling of R-CNN training.

Matching (Ren et al. 2015, "Faster R-CNN", §3.1.2): every reference box (anchor or proposal) takes the valid
ground-truth box of highest IoU; it is foreground (label 1) when that IoU ≥ `high`, background (0) when < `low`,
ignored (−1) in between. With `allow_low_quality` (the RPN's second positive rule), for every valid ground-truth
box the reference boxes of maximal IoU with it are foreground too, even below `high` (only where that IoU > 0, so a
box no reference touches creates no positives); they keep their own best-IoU match (Detectron2's Matcher).
Images without a valid ground-truth box have IoU −1 everywhere: all background.

Sampling (§3.1.3; Fast R-CNN §2.3): per image, up to ⌊num · positive_fraction⌋ foreground boxes chosen uniformly at
random, then background boxes fill the minibatch up to `num`; everything else is left out of the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.models.detection.boxes import box_iou


def match(boxes: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, *, high: float, low: float,
          allow_low_quality: bool = False):
  """boxes [B, N, 4], gt_boxes [B, G, 4], gt_valid bool [B, G] -> dict of
  'gt_index' int32 [B, N] (best ground truth, 0 when none is valid), 'iou' [B, N] (its IoU, −1 when none),
  'labels' int32 [B, N] (1 foreground, 0 background, −1 ignored; module docstring)."""
  iou = box_iou(boxes, gt_boxes)  # [B, N, G]
  iou = jnp.where(gt_valid[..., None, :], iou, -1.0)
  best = jnp.max(iou, axis=-1) if iou.shape[-1] else jnp.full(iou.shape[:-1], -1.0)
  gt_index = (jnp.argmax(iou, axis=-1) if iou.shape[-1] else jnp.zeros(iou.shape[:-1], jnp.int32)).astype(jnp.int32)
  labels = jnp.where(best >= high, 1, jnp.where(best < low, 0, -1)).astype(jnp.int32)
  if allow_low_quality and iou.shape[-1]:
    per_gt = jnp.max(iou, axis=-2, keepdims=True)  # [B, 1, G]
    lowq = jnp.any((iou == per_gt) & (per_gt > 0) & gt_valid[..., None, :], axis=-1)
    labels = jnp.where(lowq, 1, labels)
  return {"gt_index": gt_index, "iou": best, "labels": labels}


def _random_rank(mask: jax.Array, rng: jax.Array) -> jax.Array:
  """Rank [..., N] of each True entry in a uniformly random order of the True entries (False entries rank after)."""
  prio = jnp.where(mask, jax.random.uniform(rng, mask.shape), 2.0)
  return jnp.argsort(jnp.argsort(prio, axis=-1), axis=-1)


def subsample(labels: jax.Array, num: int, positive_fraction: float, rng: jax.Array):
  """labels int [..., N] (1 / 0 / −1) -> (positive, negative) bool [..., N]: the sampled minibatch (module
  docstring): min(#pos, ⌊num · fraction⌋) positives, then min(#neg, num − #positives taken) negatives."""
  k_pos, k_neg = jax.random.split(rng)
  pos, neg = labels == 1, labels == 0
  max_pos = int(num * positive_fraction)
  take_pos = pos & (_random_rank(pos, k_pos) < max_pos)
  num_neg = num - jnp.sum(take_pos, axis=-1, keepdims=True)
  take_neg = neg & (_random_rank(neg, k_neg) < num_neg)
  return take_pos, take_neg
