"""An open-vocabulary detector: a `TwoStageDetector` whose regions are classified against text embeddings (ViLD,
Gu et al. 2022, "Open-vocabulary Object Detection via Vision and Language Knowledge Distillation", ICLR,
arXiv 2104.13921), or by a closed-set linear classifier (the baseline), with its detection post-processing.

Notation: r a region, e_r its region embedding (the box head's projection into the teacher's joint space), t_c the
frozen text embedding of class c (the teacher's prompt ensemble), e_bg a learned background embedding, τ the
temperature; every embedding is L2-normalised before the cosine.

ViLD-text scoring (§3.2, eq. 1): cosine logits over the background and the classes,

    z(r) = [cos(e_r, e_bg), cos(e_r, t_1), …, cos(e_r, t_C)],      p(r) = softmax(z(r) / τ),

where a class excluded by a mask (the novel classes in training) gets the logit −1e9 (`NEG`): it drops out of the
softmax. ViLD-ensemble (§3.4): with an image head, a second projection ẽ_r of the same region features (distilled
from the teacher's crop embeddings, ViLD-image) gives p_image = softmax(z_image / τ) and the class score is the
weighted geometric mean

    s_c = p_text,c^λ · p_image,c^(1−λ)   for c ∈ C_B,       s_c = p_text,c^(1−λ) · p_image,c^λ   for c ∈ C_N,

λ = 2/3 (the paper's default): the text head is trusted on base classes, the image head on novel ones. Without an
image head s_c = p_text,c.

`OpenVocabDetector` fields: detector (the `TwoStageDetector`), num_classes C, embed_dim E, classifier
  'vild'        cosine logits of e_r against t_c and e_bg (above); `image_head` adds ẽ_r and the ensemble;
  'closed_set'  a learned linear layer over the region features to {bg} ∪ classes (Faster R-CNN's classifier,
                Ren et al. 2015): a class it was not trained on has no output, so its AP is 0 by construction;
temperature τ, ensemble_weight λ, top_k, max_detections, nms_iou. The text embeddings live in the 'constants'
collection (`class_embeddings` [C, E], `train_mask` [C]: the classes training may score, `test_mask` [C]: the
classes scored at test time, `novel` [C]); they are written once when the model is created for training and stored
with every checkpoint, so the model evaluates without its teacher. Training scores only `train_mask` classes; at
test time every `test_mask` class, novel ones included, is scored ("the novel class names are simply added").

`detect(images)`: the detector's refined boxes (class-agnostic) for its test-time proposals, class scores s_rc
(`class_scores`), the `top_k` highest (r, c) pairs, then NMS per class (IoU `nms_iou`, `nms.batched_nms`)
keeping `max_detections` per image.

`build(detector, cfg, embed_dim)` wraps a detector from a model config's `open_vocab` dict (what
`detector.build` does when `config.model.open_vocab` is present, so `vlm_jax.models.build_model` rebuilds the
whole model from a run's saved config).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.detection.nms import batched_nms
from vlm_jax.models.two_tower import l2_normalize

NEG = -1e9  # the logit of an excluded class
CLASSIFIERS = ("vild", "closed_set")


def cosine_logits(region: jax.Array, class_emb: jax.Array, background: jax.Array,
                  class_mask: jax.Array | None = None) -> jax.Array:
  """z(r) [..., 1 + C] (module docstring): cosine of the normalised region embeddings [..., E] with the
  background embedding [E] (column 0) and the class embeddings [C, E]; classes where `class_mask` [C] is False
  get `NEG` (excluded)."""
  e = l2_normalize(region)
  sims = jnp.einsum("...e,ce->...c", e, l2_normalize(class_emb))
  if class_mask is not None:
    sims = jnp.where(class_mask, sims, NEG)
  bg = jnp.einsum("...e,e->...", e, l2_normalize(background))[..., None]
  return jnp.concatenate([bg, sims], axis=-1)


def ensemble_scores(p_text: jax.Array, p_image: jax.Array | None, novel: jax.Array, *,
                    weight: float = 2 / 3) -> jax.Array:
  """ViLD-ensemble class scores s [..., C] (module docstring) from probabilities over {bg} ∪ classes
  [..., 1 + C]; `novel` bool [C], `weight` λ. Without an image head (`p_image` None) the text probabilities of
  the classes."""
  pt = p_text[..., 1:]
  if p_image is None:
    return pt
  pi = p_image[..., 1:]
  lam = jnp.where(novel, 1.0 - weight, weight)
  return jnp.power(pt, lam) * jnp.power(pi, 1.0 - lam)


class OpenVocabDetector(nn.Module):
  """A detector with an open-vocabulary (ViLD) or closed-set classifier (module docstring)."""
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
    classes only), 'labels' [B, R] (0 = background, c + 1), 'label_weights', and with extra proposals in the
    batch ('proposals' [B, M, 4], read with an image head) 'image_embeddings' [B, M, E] (ViLD-image's ẽ_r)."""
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
    """[..., 1 + C] classification logits (background first); classes where `mask` is False get `NEG`."""
    if self.classifier == "closed_set":
      logits = self.cls_score(features)
      if mask is not None:
        logits = jnp.concatenate([logits[..., :1], jnp.where(mask, logits[..., 1:], NEG)], -1)
      return logits
    return cosine_logits(embeddings, self.class_embeddings.value, self.background, mask) / self.temperature

  def class_scores(self, out: dict) -> jax.Array:
    """[B, R, C] test-time class scores s_rc of the detector's regions over the whole vocabulary (novel included
    for 'vild'; the closed-set head only ever scores the classes it was trained on)."""
    if self.classifier == "closed_set":
      p = jax.nn.softmax(self.logits(None, out["region_features"], mask=self.train_mask.value), -1)
      return p[..., 1:]
    p_text = jax.nn.softmax(self.logits(out["region_embeddings"], None), -1)
    p_image = None
    if self.image_head:
      p_image = jax.nn.softmax(self.logits(self.image_proj(out["region_features"]), None), -1)
    return ensemble_scores(p_text, p_image, self.novel.value, weight=self.ensemble_weight)

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


# ---- factory --------------------------------------------------------------------------------------------------

DEFAULTS = {"classifier": "vild", "image_head": False, "temperature": 0.01, "ensemble_weight": 2 / 3, "top_k": 300,
            "max_detections": 100, "nms_iou": 0.5}
_TYPES = {"classifier": str, "image_head": bool, "temperature": float, "ensemble_weight": float, "top_k": int,
          "max_detections": int, "nms_iou": float, "num_classes": int}


def build(detector: nn.Module, cfg: Mapping[str, Any], embed_dim: int) -> OpenVocabDetector:
  """`OpenVocabDetector` around `detector` from a model config's `open_vocab` dict: num_classes (required),
  classifier ('vild' | 'closed_set'), image_head, temperature, ensemble_weight, top_k, max_detections, nms_iou
  (defaults: `DEFAULTS`); `embed_dim` is the detector's region embedding size (`model.embed_dim`). Unknown keys,
  a missing num_classes or an unknown classifier raise `UserError`."""
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  unknown = sorted(set(cfg) - set(_TYPES))
  if unknown:
    raise UserError(f"unknown open_vocab option(s) {unknown}; valid: {sorted(_TYPES)}")
  if "num_classes" not in cfg:
    raise UserError("model.open_vocab needs num_classes (the size of the vocabulary it scores)")
  o = {**DEFAULTS, **cfg}
  if o["classifier"] not in CLASSIFIERS:
    raise UserError(f"unknown open_vocab.classifier {o['classifier']!r}; use one of {CLASSIFIERS}")
  return OpenVocabDetector(detector=detector, embed_dim=int(embed_dim), **{k: _TYPES[k](v) for k, v in o.items()})
