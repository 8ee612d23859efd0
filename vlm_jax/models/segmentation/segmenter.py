"""A dense segmenter for open-vocabulary distillation: backbone → feature pyramid → semantic-FPN head → per-pixel
embeddings → class logits against (frozen) text embeddings, or a closed-set classifier.

    images ─ backbone ─ [C2..C5] (ResNet) / last block's tokens (ViT) ─ FPN / simple pyramid ─ [P2..P5]
           ─ semantic-FPN head (Kirillov et al. 2019, "Panoptic Feature Pyramid Networks", §3: every level
             3×3 conv + ReLU, bilinear to P2's stride-4 grid, summed, 3×3 conv + ReLU) ─ 1×1 conv → f(x) ∈ R^E

Classifiers (`classifier`):
  'text'        the open-vocabulary students. f(x) is L2-normalised and scored against the fixed, normalised class
                text embeddings t_c (the 'constants' collection, written from the teacher at init) and a learned
                background embedding t_bg (ViLD's learned background, Gu et al. 2022):
                    logits(x) = [cos(f(x), t_bg), cos(f(x), t_1), …, cos(f(x), t_C)] / τ            (1)
                LSeg (Li et al. 2022, "Language-driven Semantic Segmentation", Eq. 1–2) trains (1) with a per-pixel
                softmax over the labelled classes; MaskCLIP+ (Zhou et al. 2022, §3.3) uses the text embeddings as
                the segmenter's 1×1 classifier.
  'closed_set'  the baseline: a learned 1×1 linear layer over background + C classes on f(x).
Classes outside `mask` (training: `train_mask`, test: `test_mask`) get logit −1e9, so a closed-set head trained on
base classes (test_mask = base) never predicts a novel class: novel IoU 0 by construction.

`__call__(batch, train)` → {'logits' [B, H/4, W/4, 1 + C] over the training classes, 'embeddings' [B, H/4, W/4, E]};
`segment(images)` → logits over the test classes at the same stride. Labels: 0 = background, c + 1 = class c.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.detection.fpn import FPN, SimpleFeaturePyramid, conv

Dtype = Any
CLASSIFIERS = ("text", "closed_set")
NEG = -1e9


def text_logits(emb: jax.Array, class_emb: jax.Array, background: jax.Array, temperature: float) -> jax.Array:
  """Eq. (1): [cos(f(x), t_bg), cos(f(x), t_c)] / τ of embeddings [..., E], class embeddings [C, E], t_bg [E]."""
  f = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True).clip(1e-6)
  t = class_emb / jnp.linalg.norm(class_emb, axis=-1, keepdims=True).clip(1e-6)
  bg = background / jnp.linalg.norm(background).clip(1e-6)
  return jnp.concatenate([f @ bg[:, None], f @ t.T], axis=-1) / temperature


def masked(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Label logits [..., 1 + C] with the classes outside `mask` [C] at −1e9 (background always kept)."""
  keep = jnp.concatenate([jnp.ones((1,), bool), mask])
  return jnp.where(keep, logits, NEG)


class SemanticFPNHead(nn.Module):
  """Kirillov et al. 2019's semantic branch, simplified (one conv per level): maps [P2, …] → [B, h2, w2, out]."""
  channels: int = 64
  out_dim: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w = maps[0].shape[:3]
    total = 0.0
    for i, m in enumerate(maps):
      y = nn.relu(conv(self.channels, 3, f"level{i + 2}", **kw)(m))
      if y.shape[1:3] != (h, w):
        y = jax.image.resize(y, (b, h, w, y.shape[-1]), method="bilinear", antialias=False)
      total = total + y
    y = nn.relu(conv(self.channels, 3, "fuse", **kw)(total))
    return conv(self.out_dim, 1, "embed", **kw)(y)


class DenseSegmenter(nn.Module):
  """Backbone + pyramid + head + classifier (module docstring)."""
  backbone: nn.Module
  pyramid: nn.Module
  head: nn.Module
  num_classes: int
  embed_dim: int
  classifier: str = "text"
  temperature: float = 0.07

  def setup(self):
    c, e = self.num_classes, self.embed_dim
    self.class_embeddings = self.variable("constants", "class_embeddings", lambda: jnp.zeros((c, e), jnp.float32))
    self.train_mask = self.variable("constants", "train_mask", lambda: jnp.ones((c,), bool))
    self.test_mask = self.variable("constants", "test_mask", lambda: jnp.ones((c,), bool))
    if self.classifier == "text":
      self.background = self.param("background", nn.initializers.normal(1.0), (e,), jnp.float32)
    elif self.classifier == "closed_set":
      self.cls_score = nn.Dense(c + 1, name="cls_score", kernel_init=nn.initializers.normal(0.01))
    else:
      raise ValueError(f"unknown classifier {self.classifier!r}; use one of {CLASSIFIERS}")

  def embed(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Per-pixel embeddings f(x) [B, H/4, W/4, E] (not normalised)."""
    bb = self.backbone
    if hasattr(bb, "num_patches"):  # a ViT tower: its last block's tokens on the patch grid
      enc = bb(images, train=train, intermediates=(-1,))
      gh, gw = bb.grid_size(images.shape[1:3])
      tokens = enc["intermediates"][-1]
      maps = self.pyramid(tokens.reshape(tokens.shape[0], gh, gw, tokens.shape[-1]))
    else:  # CLIP's ModifiedResNet: C2..C5
      maps = self.pyramid(bb(images, train=train, stages=True)["stages"])
    return self.head(list(maps)[:4]).astype(jnp.float32)

  def logits(self, emb: jax.Array, mask: jax.Array) -> jax.Array:
    """[..., 1 + C] label logits of embeddings [..., E]; classes outside `mask` get −1e9 (module docstring)."""
    if self.classifier == "text":
      out = text_logits(emb, self.class_embeddings.value, self.background, self.temperature)
    else:
      out = self.cls_score(emb)
    return masked(out, mask)

  def __call__(self, batch: Mapping, *, train: bool = False) -> dict:
    emb = self.embed(batch["image"], train=train)
    return {"logits": self.logits(emb, self.train_mask.value), "embeddings": emb}

  def segment(self, images: jax.Array) -> jax.Array:
    """Logits [B, H/4, W/4, 1 + C] over background + the test classes."""
    return self.logits(self.embed(images), self.test_mask.value)


def build(cfg: Mapping[str, Any]) -> DenseSegmenter:
  """`DenseSegmenter` from a model config: image (encoder dict {'kind': 'resnet'|'vit', …}), pyramid_channels,
  head_channels, embed_dim (the teacher's joint space), num_classes, classifier ('text' | 'closed_set'),
  temperature τ, dtype / param_dtype. Unknown keys raise `UserError`."""
  from vlm_jax import models  # noqa: PLC0415

  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  cfg.pop("framework", None)
  known = {"image", "pyramid_channels", "head_channels", "embed_dim", "num_classes", "classifier", "temperature",
           "dtype", "param_dtype", "scan", "remat"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise UserError(f"unknown segmenter option(s) {unknown}; valid: {sorted(known)}")
  if cfg.get("classifier", "text") not in CLASSIFIERS:
    raise UserError(f"unknown segmenter classifier {cfg.get('classifier')!r}; use one of {CLASSIFIERS}")
  defaults = models.common_defaults(cfg)
  kw = dict(dtype=defaults["dtype"], param_dtype=defaults["param_dtype"])
  image_cfg = models._plain(cfg["image"])
  kind = image_cfg.get("kind")
  image_defaults = dict(defaults, remat=defaults["remat"] != "none") if kind == "resnet" else defaults
  backbone = models.build_encoder(image_cfg, image_defaults, models.IMAGE_KINDS)
  ch = int(cfg.get("pyramid_channels", 64))
  pyramid = FPN(ch, top_pool=False, **kw) if kind == "resnet" else SimpleFeaturePyramid(ch, top_pool=False, **kw)
  e = int(cfg.get("embed_dim", 512))
  head = SemanticFPNHead(int(cfg.get("head_channels", ch)), e, **kw)
  return DenseSegmenter(backbone=backbone, pyramid=pyramid, head=head, num_classes=int(cfg["num_classes"]),
                        embed_dim=e, classifier=cfg.get("classifier", "text"),
                        temperature=float(cfg.get("temperature", 0.07)))
