"""A two-stage detector (Faster R-CNN, Ren et al. 2015, with an FPN, Lin et al. 2017, or ViTDet's simple pyramid,
Li et al. 2022) whose box head embeds regions into a VLM's joint space (ViLD, Gu et al. 2022).

    images ─ backbone ─ pyramid [P2, …] ─┬─ RPN → objectness, deltas per anchor → proposals (NMS, top-k)
                                         └─ RoIAlign(P2..P5, boxes) → BoxHead → region_embeddings, box_deltas

Backbone: an image tower (ViT or CLIP ModifiedResNet) or a whole `TwoTower` (its `image_features`): a ResNet gives
[C2..C5] to `FPN`; a ViT gives its last block's patch tokens, arranged on the patch grid, to
`SimpleFeaturePyramid`. Strides are image size / map size (images must be divisible by the coarsest stride).

`__call__(images, *, gt=None, train=False, boxes=None, rng=None)` returns a dict:
    anchors [A, 4]; rpn_logits [B, A]; rpn_deltas [B, A, 4]
    rpn_proposals [B, P, 4], rpn_scores [B, P] (objectness logits, −inf unused), rpn_valid [B, P]: the RPN output
    proposals [B, R, 4], proposal_valid [B, R]: the boxes the box head ran on — the RPN proposals at test time, the
        sampled minibatch (`heads.proposal_targets`, gt boxes added) in training with `gt`
    proposal_scores [B, R] (test time: = rpn_scores)
    region_features [B, R, fc], region_embeddings [B, R, E] (not normalised), box_deltas [B, R, 4]
    boxes [B, R, 4]: decode(box_deltas, proposals, (10, 10, 5, 5)) clipped to the image (class-agnostic refinement)
    with `boxes` [B, K, 4] given (e.g. ViLD-image's cached proposals): extra_region_embeddings [B, K, E],
        extra_region_features [B, K, fc], extra_box_deltas [B, K, 4] from the same features
    in training with gt = {'boxes' [B, G, 4] xyxy pixels, 'classes' int [B, G], 'valid' bool [B, G]}:
        rpn_targets, targets (proposal_targets dict: classes with −1 background, target_deltas, fg, weights, …),
        rpn_loss, box_loss (scalars), losses {'rpn_objectness', 'rpn_box', 'box_reg', 'rpn_num_pos'}
A pure loss takes out['rpn_loss'] + out['box_loss'] + its classification loss on region_embeddings against
out['targets']['classes'] / ['weights']. Random choices (anchor and RoI sampling) use `rng` or else the 'mask'
rng stream that the training loop provides. `init` skips proposals, sampling and losses (parameters only), so it
compiles quickly; its output has only anchors, rpn_logits, rpn_deltas and the box head's outputs for one box.

`build(cfg)` with `cfg['open_vocab']` returns the detector wrapped in `open_vocab.OpenVocabDetector` (region
classification against text embeddings, ViLD, or a closed-set head; `detect` gives final detections).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.detection import anchors as anchor_lib
from vlm_jax.models.detection import heads, open_vocab, rpn as rpn_lib
from vlm_jax.models.detection.boxes import ROI_WEIGHTS, clip_boxes, decode
from vlm_jax.models.detection.fpn import FPN, SimpleFeaturePyramid

Dtype = Any


class TwoStageDetector(nn.Module):
  """Faster R-CNN-style detector with region embeddings (module docstring).

  Fields: backbone, pyramid (FPN or SimpleFeaturePyramid), rpn (RPNHead), box_head (BoxHead);
  backbone_layers: ViT block / ResNet stages to read (None: last block / all four stages);
  anchor_sizes: one size per pyramid level (None: 8 × stride, i.e. FPN's 32 … 512 on strides 4 … 64),
  anchor_ratios (h / w); rpn_*: matching, sampling and loss settings (`rpn.rpn_targets`, `rpn.rpn_loss`);
  pre_nms_* / post_nms_*: proposals per level before NMS / in total after it, in training and at test time;
  rpn_nms_iou, min_size; roi_levels: how many of the finest pyramid levels RoIAlign reads (4: P2..P5);
  roi_*: box-head sampling (`heads.proposal_targets`); box_beta: its smooth-L1 β.
  """
  backbone: nn.Module
  pyramid: nn.Module
  rpn: rpn_lib.RPNHead
  box_head: heads.BoxHead
  backbone_layers: Sequence[int] | None = None
  anchor_sizes: Sequence[Any] | None = None
  anchor_ratios: Sequence[float] = anchor_lib.FPN_RATIOS
  rpn_pos_iou: float = 0.7
  rpn_neg_iou: float = 0.3
  rpn_batch_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_beta: float = 0.0
  pre_nms_train: int = 2000
  post_nms_train: int = 1000
  pre_nms_test: int = 1000
  post_nms_test: int = 1000
  rpn_nms_iou: float = 0.7
  min_size: float = 0.0
  roi_levels: int = 4
  roi_batch_per_image: int = 512
  roi_fg_fraction: float = 0.25
  roi_fg_iou: float = 0.5
  roi_bg_iou: float = 0.5
  box_beta: float = 0.0

  def features(self, images: jax.Array, *, train: bool = False) -> list[jax.Array]:
    """Pyramid maps [P2, …] (NHWC) of images [B, H, W, 3]."""
    bb = self.backbone
    layers = None if self.backbone_layers is None else tuple(self.backbone_layers)
    if hasattr(bb, "image_features"):  # a TwoTower
      is_vit = hasattr(bb.img, "num_patches")
      if is_vit and layers is None:
        layers = (-1,)
      enc = bb.image_features(images, layers=layers, train=train)
    elif hasattr(bb, "num_patches"):  # a ViT tower
      is_vit = True
      enc = bb(images, train=train, intermediates=layers or (-1,))
      enc["grid"] = tuple(bb.grid_size(images.shape[1:3]))
    else:  # a ModifiedResNet tower
      is_vit = False
      enc = bb(images, train=train, stages=True)
      if layers is not None:
        enc["stages"] = [enc["stages"][int(i)] for i in layers]
    if is_vit:
      h, w = enc["grid"]
      tokens = enc["intermediates"][-1]
      return self.pyramid(tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]))
    return self.pyramid(enc["stages"])

  def _anchors(self, maps, image_hw):
    hw = [tuple(int(d) for d in m.shape[1:3]) for m in maps]
    strides = [image_hw[0] / h for h, _ in hw]
    for (h, w), s in zip(hw, strides):
      if h * s != image_hw[0] or abs(w * s - image_hw[1]) > 1e-6:
        raise UserError(f"image size {tuple(image_hw)} is not divisible by the pyramid strides {strides}")
    sizes = self.anchor_sizes if self.anchor_sizes is not None else [8 * s for s in strides]
    return anchor_lib.anchors(hw, strides, sizes, self.anchor_ratios), hw, strides, sizes

  def _heads(self, maps, strides, boxes, image_hw) -> dict:
    n = self.roi_levels
    return self.box_head(maps[:n], strides[:n], boxes, image_hw)

  def __call__(self, images: jax.Array, *, gt: Mapping[str, jax.Array] | None = None, train: bool = False,
               boxes: jax.Array | None = None, rng: jax.Array | None = None) -> dict:
    image_hw = tuple(int(d) for d in images.shape[1:3])
    maps = self.features(images, train=train)
    anchors, hw, strides, sizes = self._anchors(maps, image_hw)
    per_cell = anchor_lib.num_cell_anchors(sizes, self.anchor_ratios)
    if per_cell != self.rpn.num_anchors:
      raise UserError(f"the RPN head predicts {self.rpn.num_anchors} anchors per cell but the anchor sizes and "
                      f"ratios give {per_cell}")
    logits, deltas = self.rpn(maps)
    if self.is_initializing():  # parameters only: one box per image creates the box head's (cheap to compile)
      head = self._heads(maps, strides, jnp.tile(jnp.asarray([[[0.0, 0.0, *image_hw[::-1]]]]),
                                                 (images.shape[0], 1, 1)), image_hw)
      return {"anchors": anchors, "rpn_logits": logits, "rpn_deltas": deltas, **head}
    training = train and gt is not None
    props, scores, valid = rpn_lib.proposals(
        anchors, logits, deltas, image_hw, pre_nms=self.pre_nms_train if training else self.pre_nms_test,
        post_nms=self.post_nms_train if training else self.post_nms_test, iou=self.rpn_nms_iou,
        level_counts=anchor_lib.level_counts(hw, per_cell), min_size=self.min_size)
    out = {"anchors": anchors, "rpn_logits": logits, "rpn_deltas": deltas, "rpn_proposals": props,
           "rpn_scores": scores, "rpn_valid": valid}
    rois, roi_valid, roi_scores = props, valid, scores
    if training:
      if rng is None:
        rng = self.make_rng("mask")
      k_rpn, k_roi = jax.random.split(rng)
      gt_boxes, gt_valid = jnp.asarray(gt["boxes"], jnp.float32), jnp.asarray(gt["valid"], bool)
      rpn_t = rpn_lib.rpn_targets(anchors, gt_boxes, gt_valid, rng=k_rpn, pos_iou=self.rpn_pos_iou,
                                  neg_iou=self.rpn_neg_iou, batch_per_image=self.rpn_batch_per_image,
                                  positive_fraction=self.rpn_positive_fraction)
      rpn_loss, rpn_metrics = rpn_lib.rpn_loss(logits, deltas, rpn_t, beta=self.rpn_beta)
      targets = heads.proposal_targets(props, gt_boxes, gt["classes"], gt_valid, rng=k_roi, proposal_valid=valid,
                                       batch_per_image=self.roi_batch_per_image, fg_fraction=self.roi_fg_fraction,
                                       fg_iou=self.roi_fg_iou, bg_iou=self.roi_bg_iou)
      rois, roi_valid = targets["boxes"], targets["weights"] > 0
      roi_scores = jnp.zeros(roi_valid.shape, jnp.float32)
      out.update(rpn_targets=rpn_t, targets=targets, rpn_loss=rpn_loss)
    head = self._heads(maps, strides, rois, image_hw)
    refined = clip_boxes(decode(head["box_deltas"], rois, ROI_WEIGHTS), image_hw)
    out.update(proposals=rois, proposal_valid=roi_valid, proposal_scores=roi_scores, boxes=refined, **head)
    if training:
      box = heads.box_loss(head["box_deltas"], out["targets"], beta=self.box_beta)
      out.update(box_loss=box, losses={**rpn_metrics, "box_reg": box})
    if boxes is not None:
      extra = self._heads(maps, strides, jnp.asarray(boxes, jnp.float32), image_hw)
      out.update({f"extra_{k}": v for k, v in extra.items()})
    return out

  def embed_boxes(self, images: jax.Array, boxes: jax.Array, *, train: bool = False) -> dict:
    """Box-head outputs {'region_features', 'region_embeddings', 'box_deltas'} for given pixel boxes [B, K, 4]
    (no RPN): what ViLD-image distils on its precomputed proposals."""
    image_hw = tuple(int(d) for d in images.shape[1:3])
    maps = self.features(images, train=train)
    _, _, strides, _ = self._anchors(maps, image_hw)
    return self._heads(maps, strides, jnp.asarray(boxes, jnp.float32), image_hw)


# ---- factory --------------------------------------------------------------------------------------------------

_HEAD_KEYS = ("fc_dim", "num_fc", "roi_size", "sampling_ratio", "canonical_size", "canonical_level")
_OWN_KEYS = ("image", "two_tower", "pyramid", "pyramid_channels", "embed_dim", "dtype", "param_dtype", "attention",
             "scan", "remat", "open_vocab")


def build(cfg: Mapping[str, Any]) -> nn.Module:
  """`TwoStageDetector` from a model config (framework 'detector'), wrapped in an `open_vocab.OpenVocabDetector`
  when the config has `open_vocab` (its classifier settings: `open_vocab.build`), so a distillation student
  is rebuilt from its run's saved config:
    image: encoder dict {'kind': 'resnet'|'vit', 'variant', …} (a bare image tower: params['backbone'] is a CLIP
        checkpoint's params['img']), or two_tower: a whole two-tower model config (params['backbone'] is a CLIP
        model's params; only the image side is created);
    pyramid: 'fpn' (default for a ResNet) | 'simple' (ViTDet, default for a ViT); pyramid_channels (256);
    embed_dim (region embedding size: the teacher's joint space, default 512); box head: fc_dim (1024), num_fc,
    roi_size (7), sampling_ratio, canonical_size (224), canonical_level (4); dtype, param_dtype, scan, remat;
    every `TwoStageDetector` field (anchor_sizes, rpn_*, pre_nms_*, roi_*, …) by name.
  Unknown keys raise `UserError`."""
  from vlm_jax import models  # noqa: PLC0415 (vlm_jax.models imports this module lazily)

  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  cfg.pop("framework", None)
  fields = {f.name for f in dataclasses.fields(TwoStageDetector)} - {"parent", "name", "backbone", "pyramid",
                                                                      "rpn", "box_head"}
  unknown = sorted(set(cfg) - fields - set(_HEAD_KEYS) - set(_OWN_KEYS))
  if unknown:
    raise UserError(f"unknown detector option(s) {unknown}; valid: {sorted(fields | set(_HEAD_KEYS) | set(_OWN_KEYS))}")
  defaults = models.common_defaults(cfg)
  kw = dict(dtype=defaults["dtype"], param_dtype=defaults["param_dtype"])
  if ("image" in cfg) == ("two_tower" in cfg):
    raise UserError("a detector config needs exactly one of `image` (an encoder dict) or `two_tower`")
  if "image" in cfg:
    image_cfg = models._plain(cfg["image"])
    kind = image_cfg.get("kind")
    image_defaults = dict(defaults, remat=defaults["remat"] != "none") if kind == "resnet" else defaults
    backbone = models.build_encoder(image_cfg, image_defaults, models.IMAGE_KINDS)
  else:
    tt = models._plain(cfg["two_tower"])
    kind = models._plain(tt.get("image")).get("kind")
    backbone = models.build_two_tower(tt)
  pyramid_kind = cfg.get("pyramid") or ("fpn" if kind == "resnet" else "simple")
  channels = int(cfg.get("pyramid_channels", 256))
  if pyramid_kind == "fpn":
    if kind != "resnet":
      raise UserError("pyramid='fpn' needs a ResNet backbone (its C2..C5 stages); use 'simple' for a ViT")
    pyramid = FPN(channels, **kw)
    levels = 5
  elif pyramid_kind == "simple":
    if kind != "vit":
      raise UserError("pyramid='simple' (ViTDet) needs a ViT backbone; use 'fpn' for a ResNet")
    pyramid = SimpleFeaturePyramid(channels, top_pool=True, **kw)
    levels = 5
  else:
    raise UserError(f"unknown pyramid {pyramid_kind!r}; valid choices: fpn, simple")
  det = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in fields}
  sizes = det.get("anchor_sizes")
  ratios = det.get("anchor_ratios", anchor_lib.FPN_RATIOS)
  per_cell = anchor_lib.num_cell_anchors(sizes, ratios) if sizes is not None else len(ratios)
  if sizes is not None and len(sizes) != levels:
    raise UserError(f"anchor_sizes needs one entry per pyramid level ({levels}), got {len(sizes)}")
  head = heads.BoxHead(int(cfg.get("embed_dim", 512)), **{k: cfg[k] for k in _HEAD_KEYS if k in cfg}, **kw)
  detector = TwoStageDetector(backbone=backbone, pyramid=pyramid, rpn=rpn_lib.RPNHead(per_cell, **kw),
                              box_head=head, **det)
  if cfg.get("open_vocab"):
    return open_vocab.build(detector, models._plain(cfg["open_vocab"]), int(cfg.get("embed_dim", 512)))
  return detector
