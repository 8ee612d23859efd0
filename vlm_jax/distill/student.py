"""The student: a two-stage detector (`vlm_jax.models.detection.TwoStageDetector`) with an open-vocabulary classifier
(ViLD) or a closed-set one (the baseline), and its detection post-processing.

  classifier='vild'        region embeddings e_r (the detector's box head projection into the teacher's joint
                           space) scored by cosine against the frozen text embeddings t_c of the vocabulary and a
                           learned background embedding e_bg (`vild.cosine_logits`, Gu et al. 2022 eq. 1); with
                           `image_head` a second projection ẽ_r of the same region features is distilled from the
                           teacher's crop embeddings (ViLD-image) and ensembled at test time (ViLD-ensemble, §3.4).
  classifier='closed_set'  a learned linear layer over the base classes + background on the region features
                           (Faster R-CNN's classifier, Ren et al. 2015): a novel class has no output, so its AP is 0
                           by construction — the reference point of open-vocabulary detection.

The text embeddings are the teacher's (prompt ensemble over the vocabulary, base and novel names), held in the
'constants' collection (`class_embeddings` [C, E], `train_mask` [C]: the classes training may score — base, plus
caption classes with pseudo boxes —, `test_mask` [C]: the classes scored at test time, `novel` [C]); they are written at initialisation (`run.py`), stored with the
checkpoint and never updated, so a run evaluates without its teacher. Training scores only `train_mask` classes;
at test time every class, novel ones included, is scored ("the novel class names are simply added").

Detections (`detect`): the detector's refined boxes (class-agnostic) for its test-time proposals, class scores s_rc
(softmax over {bg} ∪ classes; the ViLD ensemble with an image head), the `top_k` highest (r, c) pairs, then NMS
per class (IoU `nms_iou`) keeping `max_detections` per image.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.distill import vild
from vlm_jax.models.detection.nms import batched_nms

CLASSIFIERS = ("vild", "closed_set")


class OpenVocabDetector(nn.Module):
  detector: nn.Module
  num_classes: int
  embed_dim: int
  classifier: str = "vild"
  image_head: bool = False
  temperature: float = 0.01
  ensemble_weight: float = 2 / 3
  top_k: int = 300
  max_detections: int = 100
  nms_iou: float = 0.5

  def setup(self):
    c, e = self.num_classes, self.embed_dim
    self.class_embeddings = self.variable("constants", "class_embeddings", lambda: jnp.zeros((c, e), jnp.float32))
    self.train_mask = self.variable("constants", "train_mask", lambda: jnp.zeros((c,), bool))
    self.novel = self.variable("constants", "novel", lambda: jnp.zeros((c,), bool))
    self.test_mask = self.variable("constants", "test_mask", lambda: jnp.ones((c,), bool))
    if self.classifier == "vild":
      self.background = self.param("background", nn.initializers.normal(1.0), (e,), jnp.float32)
      if self.image_head:
        self.image_proj = nn.Dense(e, name="image_proj", kernel_init=nn.initializers.normal(0.01))
    elif self.classifier == "closed_set":
      self.cls_score = nn.Dense(c + 1, name="cls_score", kernel_init=nn.initializers.normal(0.01))
    else:
      raise ValueError(f"unknown classifier {self.classifier!r}; use one of {CLASSIFIERS}")

  def __call__(self, batch: dict, *, train: bool = False) -> dict:
    """Training outputs: the detector's dict plus 'class_logits' [B, R, 1 + C] of its sampled regions (training
    classes only), 'labels' [B, R] (0 = background, c + 1), 'label_weights', and with cached proposals in the
    batch 'image_embeddings' [B, M, E] (ViLD-image's ẽ_r)."""
    gt = None
    if "gt_boxes" in batch:
      gt = {"boxes": batch["gt_boxes"], "classes": jnp.maximum(batch["gt_classes"], 0),
            "valid": batch["gt_classes"] >= 0}
    extra = batch.get("proposals") if self.classifier == "vild" and self.image_head else None
    out = dict(self.detector(batch["image"], gt=gt, train=train, boxes=extra))
    out["class_logits"] = self.logits(out["region_embeddings"], out["region_features"],
                                      mask=self.train_mask.value)
    if "targets" in out:
      out["labels"] = out["targets"]["classes"] + 1
      out["label_weights"] = out["targets"]["weights"]
    if extra is not None:  # (the detector's init returns no extra_* outputs: the head is built on its features)
      out["image_embeddings"] = self.image_proj(out.get("extra_region_features", out["region_features"]))
    return out

  def logits(self, embeddings, features, *, mask=None):
    """[..., 1 + C] classification logits (background first); classes where `mask` is False excluded."""
    if self.classifier == "closed_set":
      logits = self.cls_score(features)
      if mask is not None:
        logits = jnp.concatenate([logits[..., :1], jnp.where(mask, logits[..., 1:], vild.NEG)], -1)
      return logits
    return vild.cosine_logits(embeddings, self.class_embeddings.value, self.background, mask) / self.temperature

  def class_scores(self, out: dict) -> jax.Array:
    """[B, R, C] test-time class scores of the detector's regions over the whole vocabulary (novel included for
    'vild'; the closed-set head only ever scores the classes it was trained on)."""
    if self.classifier == "closed_set":
      p = jax.nn.softmax(self.logits(None, out["region_features"], mask=self.train_mask.value), -1)
      return p[..., 1:]
    p_text = jax.nn.softmax(self.logits(out["region_embeddings"], None), -1)
    p_image = None
    if self.image_head:
      p_image = jax.nn.softmax(self.logits(self.image_proj(out["region_features"]), None), -1)
    return vild.ensemble_scores(p_text, p_image, self.novel.value, weight=self.ensemble_weight)

  def detect(self, images: jax.Array) -> dict:
    """{'boxes' [B, D, 4] pixels, 'scores' [B, D], 'classes' int32 [B, D], 'valid' [B, D]}, D = max_detections."""
    out = self.detector(images, train=False)
    scores = self.class_scores(out)
    scores = jnp.where(out["proposal_valid"][..., None] & self.test_mask.value, scores, 0.0)
    b, r, c = scores.shape
    k = min(self.top_k, r * c)
    top, flat = jax.lax.top_k(scores.reshape(b, r * c), k)
    region, cls = flat // c, flat % c
    boxes = jnp.take_along_axis(out["boxes"], region[..., None], axis=1)
    keep, valid = batched_nms(boxes, top, cls, iou_threshold=self.nms_iou, max_out=self.max_detections)
    take = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    return {"boxes": take(boxes), "scores": jnp.where(valid, take(top), 0.0), "classes": take(cls),
            "valid": valid & (take(top) > 0)}


def build(detector: nn.Module, method_config, num_classes: int, embed_dim: int, *,
          closed_set: bool = False) -> OpenVocabDetector:
  """The student of a distillation config's `method` (or the closed-set baseline)."""
  m = dict(method_config)
  return OpenVocabDetector(
      detector=detector, num_classes=int(num_classes), embed_dim=int(embed_dim),
      classifier="closed_set" if closed_set else "vild",
      image_head=(not closed_set) and float(m.get("image_weight", 0.0)) > 0,
      temperature=float(m.get("temperature", 0.01)), ensemble_weight=float(m.get("ensemble_weight", 2 / 3)),
      top_k=int(m.get("top_k", 300)), max_detections=int(m.get("max_detections", 100)),
      nms_iou=float(m.get("nms_iou", 0.5)))
