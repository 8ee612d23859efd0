"""The second stage: RoIAlign over the pyramid, a 2-fc box head, region embeddings and class-agnostic regression.

Level assignment (Lin et al. 2017, FPN, eq. 1): a box of width w and height h is pooled from level

    k = ⌊k0 + log2(√(wh) / 224)⌋,   k0 = 4,

clamped to the levels present (P2..P5 by default); `canonical_size` (224) and `canonical_level` (k0) are fields,
since small synthetic images want a smaller canonical size. Level k is the map of stride 2^k (strides that are not
powers of two — ViTDet with patch 14 — are rounded in log2). Pooling: RoIAlign (He et al. 2017,
`models.roi_align`), `roi_size`² bins of `sampling_ratio`² bilinear samples each.

Head (Lin et al. 2017 §4.2 "2fc MLP head"; Detectron2 FastRCNNConvFCHead): flatten → `num_fc` × (fc + ReLU) of
width `fc_dim` → region_features. Two linear outputs: region_embeddings [B, P, embed_dim], the projection into the
teacher's joint image–text space (ViLD, Gu et al. 2022, arXiv 2104.13921, §3.2: e_r = P(R(φ(I), r)); the caller
L2-normalises and scores it against text embeddings, so classification is not here), and box_deltas [B, P, 4],
class-agnostic (ViLD §3.1; weights (10, 10, 5, 5), `boxes.ROI_WEIGHTS`; init normal(0.001) as Detectron2).

Training targets (Girshick 2015, "Fast R-CNN" §2.3; Ren et al. 2015): the ground-truth boxes are added to the
proposals, every candidate is matched to the valid ground truth of highest IoU: foreground when IoU ≥ `fg_iou`
(0.5), background below `bg_iou` (0.5); a minibatch of S = min(batch_per_image, #candidates) boxes per image
with up to `fg_fraction` (25 %) foreground. The box loss is smooth-L1 (β = 0: L1, Detectron2's default) of the
deltas against encode(gt, box, (10, 10, 5, 5)) over the foreground, divided by the number of sampled boxes
(Fast R-CNN eq. 1 with λ = 1, [u ≥ 1] selecting foreground; Detectron2's normalisation).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.detection import matching
from vlm_jax.models.detection.boxes import ROI_WEIGHTS, box_area, encode, smooth_l1
from vlm_jax.models.roi_align import roi_align

Dtype = Any


def level_of(boxes: jax.Array, strides: Sequence[float], canonical_size: float = 224.0,
             canonical_level: int = 4) -> jax.Array:
  """int32 [...]: index into `strides` (consecutive pyramid levels, finest first) of the map each box [..., 4] is
  pooled from (FPN eq. 1, module docstring)."""
  logs = [int(round(math.log2(s))) for s in strides]
  if logs != list(range(logs[0], logs[0] + len(logs))):
    raise ValueError(f"RoI levels must be consecutive powers of two, got strides {tuple(strides)}")
  size = jnp.sqrt(jnp.maximum(box_area(boxes), 1e-6))
  k = jnp.floor(canonical_level + jnp.log2(size / canonical_size + 1e-8))
  return (jnp.clip(k, logs[0], logs[-1]) - logs[0]).astype(jnp.int32)


def multilevel_roi_align(maps: Sequence[jax.Array], strides: Sequence[float], boxes: jax.Array,
                         image_hw: tuple[int, int], *, output_size: int = 7, sampling_ratio: int = 2,
                         canonical_size: float = 224.0, canonical_level: int = 4) -> jax.Array:
  """RoIAlign of pixel boxes [B, P, 4] from the level `level_of` picks -> [B, P, out, out, C] float32."""
  h, w = image_hw
  scale = jnp.asarray([w, h, w, h], jnp.float32)
  norm = jax.lax.stop_gradient(boxes.astype(jnp.float32)) / scale
  level = level_of(boxes, strides, canonical_size, canonical_level)
  out = 0.0
  for i, m in enumerate(maps):
    pooled = roi_align(m, norm, output_size, sampling_ratio)
    out = out + jnp.where((level == i)[..., None, None, None], pooled, 0.0)
  return out


class BoxHead(nn.Module):
  """RoI box head (module docstring): `__call__(maps, strides, boxes, image_hw)` -> {'region_features' [B, P, fc_dim],
  'region_embeddings' [B, P, embed_dim], 'box_deltas' [B, P, 4]} (float32)."""
  embed_dim: int
  fc_dim: int = 1024
  num_fc: int = 2
  roi_size: int = 7
  sampling_ratio: int = 2
  canonical_size: float = 224.0
  canonical_level: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], strides: Sequence[float], boxes: jax.Array,
               image_hw: tuple[int, int]) -> dict:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = multilevel_roi_align(maps, strides, boxes, image_hw, output_size=self.roi_size,
                                 sampling_ratio=self.sampling_ratio, canonical_size=self.canonical_size,
                                 canonical_level=self.canonical_level)
    b, p = boxes.shape[:2]
    x = feats.reshape(b, p, -1).astype(self.dtype)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", None))
    axes = [(None, "mlp")] + [("mlp", "embed") if i % 2 else ("embed", "mlp") for i in range(1, self.num_fc)]
    for i in range(self.num_fc):
      x = nn.relu(nn.Dense(self.fc_dim, name=f"fc{i + 1}", kernel_init=nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), axes[i]),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[i][1],)), **kw)(x))
    last = axes[-1][1]
    emb = nn.Dense(self.embed_dim, name="region_proj", kernel_init=nn.with_logical_partitioning(
        nn.initializers.normal(self.fc_dim ** -0.5), (last, None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)), **kw)(x)
    deltas = nn.Dense(4, name="box_deltas", kernel_init=nn.with_logical_partitioning(
        nn.initializers.normal(0.001), (last, None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)), **kw)(x)
    return {"region_features": x.astype(jnp.float32), "region_embeddings": emb.astype(jnp.float32),
            "box_deltas": deltas.astype(jnp.float32)}


def proposal_targets(proposals: jax.Array, gt_boxes: jax.Array, gt_classes: jax.Array, gt_valid: jax.Array, *,
                     rng: jax.Array, proposal_valid: jax.Array | None = None, batch_per_image: int = 512,
                     fg_fraction: float = 0.25, fg_iou: float = 0.5, bg_iou: float = 0.5, add_gt: bool = True,
                     weights: Sequence[float] = ROI_WEIGHTS) -> dict:
  """Sampled box-head training targets (module docstring). proposals [B, P, 4] (+ proposal_valid [B, P]),
  gt_boxes [B, G, 4], gt_classes int [B, G], gt_valid bool [B, G] -> dict of [B, S] arrays,
  S = min(batch_per_image, P + G if add_gt else P), foreground first:
    'boxes' [B, S, 4]       the sampled boxes (run the box head on these)
    'classes' int32         matched class, −1 = background (also −1 in unused slots)
    'target_deltas' [B, S, 4]  encode(matched gt, box, weights) (0 for background)
    'fg' bool, 'weights' f32 (1 for sampled boxes, 0 for unused slots: fewer candidates than S),
    'gt_index' int32, 'iou' f32 (best IoU with a valid gt, −1 when the image has none).
  Nothing here carries a gradient."""
  proposals = jax.lax.stop_gradient(proposals.astype(jnp.float32))
  b, p = proposals.shape[:2]
  valid = jnp.ones((b, p), bool) if proposal_valid is None else proposal_valid.astype(bool)
  if add_gt:
    cand = jnp.concatenate([proposals, gt_boxes.astype(jnp.float32)], axis=1)
    valid = jnp.concatenate([valid, gt_valid.astype(bool)], axis=1)
  else:
    cand = proposals
  s = min(int(batch_per_image), cand.shape[1])
  m = matching.match(cand, gt_boxes, gt_valid, high=fg_iou, low=bg_iou)
  labels = jnp.where(valid, m["labels"], -1)
  pos, neg = matching.subsample(labels, s, fg_fraction, rng)
  priority = 2 * pos.astype(jnp.int32) + neg.astype(jnp.int32)
  _, idx = jax.lax.top_k(priority, s)  # foreground, then background, then unused

  def take(x):
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  boxes, fg, sampled, gt_index = take(cand), take(pos), take(pos | neg), take(m["gt_index"])
  matched = jnp.take_along_axis(gt_boxes.astype(jnp.float32), gt_index[..., None], axis=1)
  classes = jnp.where(fg, jnp.take_along_axis(gt_classes.astype(jnp.int32), gt_index, axis=1), -1)
  deltas = jnp.where(fg[..., None], encode(matched, boxes, weights), 0.0)
  return {"boxes": boxes, "classes": classes, "target_deltas": deltas, "fg": fg,
          "weights": sampled.astype(jnp.float32), "gt_index": gt_index, "iou": take(m["iou"])}


def box_loss(box_deltas: jax.Array, targets: dict, *, beta: float = 0.0) -> jax.Array:
  """Class-agnostic box regression loss (module docstring): Σ_fg Σ_xywh smooth-L1_β(d − t) / max(#sampled, 1)."""
  reg = smooth_l1(box_deltas.astype(jnp.float32) - targets["target_deltas"], beta).sum(-1)
  n = jnp.maximum(jnp.sum(targets["weights"]), 1.0)
  return jnp.sum(reg * targets["fg"].astype(jnp.float32)) / n
