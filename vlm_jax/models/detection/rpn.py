"""Region Proposal Network (Ren et al. 2015, "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal
Networks", arXiv 1506.01497, §3.1), on every level of a feature pyramid (Lin et al. 2017, FPN §4.1).

Head: a 3×3 conv (+ ReLU) shared by all levels, then two sibling 1×1 convs: one objectness logit and 4 box deltas
per anchor (class-agnostic, sigmoid objectness as Detectron2 rather than the paper's 2-way softmax). Outputs are
flattened level by level, cells row-major, anchors innermost — the order of `anchors.anchors`.

Training targets (§3.1.2): anchors matched to ground truth by IoU (`matching.match`: positive ≥ 0.7, or the best
anchor of a ground-truth box; negative < 0.3; ignored between), a minibatch of `batch_per_image` = 256 anchors per
image with up to half positives (`matching.subsample`), regression targets t* = encode(gt, anchor) (eq. 2, weights
1). Loss (eq. 1):

    L = 1/N Σ_i BCE(p_i, p*_i) + λ/N Σ_i p*_i ℓ(t_i − t*_i),   λ = 1,

summed over the sampled anchors i with N = the number of sampled anchors in the batch (the paper's N_cls = 256 per
image; Detectron2 likewise normalises both terms by the minibatch size), ℓ = smooth-L1 with transition β (β = 0,
the default, is L1 — Detectron2's RPN default; the paper's σ = 3 is β = 1/9), summed over the 4 coordinates.

Proposals (§3.3 with FPN's per-level selection, Detectron2 `find_top_rpn_proposals`): per level the `pre_nms`
top-scoring anchors, decoded and clipped to the image, boxes narrower or lower than `min_size` dropped; NMS at IoU
`iou` within each level; the `post_nms` best over all levels. The result is a constant to the rest of the network
(stop_gradient: the paper's approximate joint training, §3.2).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.detection import matching
from vlm_jax.models.detection.boxes import RPN_WEIGHTS, clip_boxes, decode, encode, smooth_l1
from vlm_jax.models.detection.fpn import conv
from vlm_jax.models.detection.nms import batched_nms

Dtype = Any


class RPNHead(nn.Module):
  """Shared 3×3 conv + objectness / box-delta 1×1 convs over pyramid maps (module docstring).

  `__call__(maps)` with maps [B, h_l, w_l, C] -> (logits [B, A_total], deltas [B, A_total, 4]) float32, where
  A_total = Σ_l h_l w_l `num_anchors`. Init: normal(0.01) kernels, zero biases (Detectron2).
  """
  num_anchors: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    a = self.num_anchors
    hidden = conv(maps[0].shape[-1], 3, "conv", std=0.01, **kw)
    objectness = conv(a, 1, "objectness", std=0.01, **kw)
    box = conv(4 * a, 1, "deltas", std=0.01, **kw)
    logits, deltas = [], []
    for m in maps:
      t = nn.relu(hidden(m.astype(self.dtype)))
      b = m.shape[0]
      logits.append(objectness(t).astype(jnp.float32).reshape(b, -1))
      deltas.append(box(t).astype(jnp.float32).reshape(b, -1, 4))
    return jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1)


def rpn_targets(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, *, rng: jax.Array,
                pos_iou: float = 0.7, neg_iou: float = 0.3, batch_per_image: int = 256,
                positive_fraction: float = 0.5, weights: Sequence[float] = RPN_WEIGHTS) -> dict:
  """Sampled RPN training targets (module docstring). anchors [A, 4], gt_boxes [B, G, 4], gt_valid bool [B, G] ->
  {'labels' int32 [B, A]: 1 sampled positive, 0 sampled negative, −1 not in the minibatch;
   'target_deltas' [B, A, 4]: encode(matched gt, anchor) (meaningful where labels == 1);
   'gt_index' int32 [B, A]: the matched ground-truth slot}."""
  b = gt_boxes.shape[0]
  anchors_b = jnp.broadcast_to(jnp.asarray(anchors, jnp.float32), (b,) + tuple(anchors.shape))
  m = matching.match(anchors_b, gt_boxes, gt_valid, high=pos_iou, low=neg_iou, allow_low_quality=True)
  pos, neg = matching.subsample(m["labels"], batch_per_image, positive_fraction, rng)
  labels = jnp.where(pos, 1, jnp.where(neg, 0, -1)).astype(jnp.int32)
  matched = jnp.take_along_axis(gt_boxes, m["gt_index"][..., None], axis=1)
  targets = encode(matched, anchors_b, weights)
  targets = jnp.where((labels == 1)[..., None], targets, 0.0)
  return {"labels": labels, "target_deltas": jax.lax.stop_gradient(targets), "gt_index": m["gt_index"]}


def rpn_loss(logits: jax.Array, deltas: jax.Array, targets: dict, *, beta: float = 0.0,
             box_weight: float = 1.0) -> tuple[jax.Array, dict]:
  """RPN loss (module docstring, eq. 1) of logits [B, A] and deltas [B, A, 4] against `rpn_targets` ->
  (objectness + box_weight · box, {'rpn_objectness', 'rpn_box', 'rpn_num_pos'})."""
  labels = targets["labels"]
  sampled = (labels >= 0).astype(jnp.float32)
  pos = (labels == 1).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(sampled), 1.0)
  logits = logits.astype(jnp.float32)
  bce = jnp.maximum(logits, 0) - logits * pos + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  obj = jnp.sum(bce * sampled) / n
  reg = smooth_l1(deltas.astype(jnp.float32) - targets["target_deltas"], beta).sum(-1)
  box = jnp.sum(reg * pos) / n
  return obj + box_weight * box, {"rpn_objectness": obj, "rpn_box": box, "rpn_num_pos": jnp.sum(pos)}


def proposals(anchors: jax.Array, logits: jax.Array, deltas: jax.Array, image_hw: tuple[int, int], *,
              pre_nms: int, post_nms: int, iou: float = 0.7, level_counts: Sequence[int] | None = None,
              min_size: float = 0.0, weights: Sequence[float] = RPN_WEIGHTS):
  """Object proposals (module docstring). anchors [A, 4], logits [B, A], deltas [B, A, 4], image_hw (h, w);
  `level_counts` anchors per level in order (None: one level) ->
  (boxes [B, P, 4] clipped xyxy, scores [B, P] objectness logits (−inf in unused slots), valid bool [B, P]),
  P = post_nms, best first; all three carry no gradient."""
  logits, deltas = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas)
  counts = list(level_counts) if level_counts is not None else [int(anchors.shape[0])]
  if sum(counts) != anchors.shape[0]:
    raise ValueError(f"level_counts {counts} do not add up to {anchors.shape[0]} anchors")
  boxes, scores, levels = [], [], []
  start = 0
  for level, n in enumerate(counts):
    k = min(int(pre_nms), n)
    s, idx = jax.lax.top_k(logits[:, start:start + n], k)  # [B, k]
    d = jnp.take_along_axis(deltas[:, start:start + n], idx[..., None], axis=1)
    a = jnp.asarray(anchors, jnp.float32)[start:start + n][idx]
    boxes.append(clip_boxes(decode(d, a, weights), image_hw))
    scores.append(s)
    levels.append(jnp.full(idx.shape, level, jnp.int32))
    start += n
  boxes, scores, levels = (jnp.concatenate(x, axis=1) for x in (boxes, scores, levels))
  wh = boxes[..., 2:] - boxes[..., :2]
  keep = jnp.all(wh > min_size, axis=-1) & jnp.isfinite(scores)
  scores = jnp.where(keep, scores, -jnp.inf)
  idx, valid = batched_nms(boxes, scores, levels, iou_threshold=iou, max_out=int(post_nms))
  out_boxes = jnp.take_along_axis(boxes, idx[..., None], axis=1)
  out_scores = jnp.take_along_axis(scores, idx, axis=1)
  return (jnp.where(valid[..., None], out_boxes, 0.0), jnp.where(valid, out_scores, -jnp.inf), valid)
