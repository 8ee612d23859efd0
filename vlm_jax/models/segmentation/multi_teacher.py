"""A dense segmenter with one projection head per teacher: the student of multi-teacher distillation.

One shared student (`segmenter.DenseSegmenter`: backbone → pyramid → semantic-FPN head → f(x) ∈ R^{E_1}) and, for
every teacher k = 1..K, a head mapping f(x) into teacher k's joint embedding space, scored against teacher k's fixed
class text embeddings t^k_c and a learned background embedding t^k_bg (the segmenter's text classifier, Eq. 1 of
`segmenter`):

    ℓ_k(x) = [cos(P_k f(x), t^k_bg), cos(P_k f(x), t^k_1), …, cos(P_k f(x), t^k_C)] / τ                    (1)

P_1 is the identity: f(x) is already the first teacher's space, exactly MaskCLIP+'s student (its 1 × 1 `embed` conv
is the projection), so head 1 *is* `DenseSegmenter.logits` and a run whose weights are one-hot on teacher 1 is the
single-teacher MaskCLIP+ student (tested bit for bit). P_k (k ≥ 2) is a learned 1 × 1 conv (Dense) E_1 → E_k;
composed with the linear `embed` conv it spans the same family of maps as P_1, so no head is favoured in capacity.

Teacher weights (`teacher_weights`), over teachers k with prior π (the configured `weights`, normalised):

    fixed       w_k = π_k                                                                                    (2)
    confidence  w_k(x) = π_k exp(c_k(x)/T) / Σ_j π_j exp(c_j(x)/T),   c_k(x) = max_c p^k_c(x)                 (3)

Eq. (3) is a per-pixel, per-sample softmax over teachers of a confidence c_k(x) (training: teacher k's own MaskCLIP
max class probability; `distill.multi_teacher`); T → ∞ gives (2). Prediction (`segment`) is the weighted mean of the
heads' class probabilities, p(x) = Σ_k w_k(x) softmax(ℓ_k(x)), returned as log p (classes outside the test mask at
−1e9): with 'fixed' the configured w_k; with 'confidence' Eq. (3) with c_k(x) = max_c softmax(ℓ_k(x))_c, the head's
own confidence (head k is trained to reproduce teacher k, and no teacher runs at test time).

`__call__` → {'logits': ℓ_1 (training classes), 'teacher_logits': (ℓ_1, …, ℓ_K), 'embeddings': f(x)}.
Constants: teacher 1's class embeddings are the segmenter's `class_embeddings`; teacher k ≥ 2's are
`constants/teacher<k>/class_embeddings`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.segmentation import segmenter
from vlm_jax.models.segmentation.segmenter import DenseSegmenter

WEIGHTINGS = ("fixed", "confidence")


def teacher_weights(confidence: jax.Array, prior: Sequence[float], rule: str, temperature: float = 1.0) -> jax.Array:
  """w [..., K] of Eq. (2) / (3) from confidences c [..., K] (ignored by 'fixed') and the prior π (normalised here)."""
  pi = jnp.asarray(prior, jnp.float32)
  pi = pi / pi.sum()
  if rule == "fixed":
    return jnp.broadcast_to(pi, confidence.shape)
  if rule != "confidence":
    raise ValueError(f"unknown teacher weighting {rule!r}; use one of {WEIGHTINGS}")
  z = confidence.astype(jnp.float32) / temperature
  e = pi * jnp.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


class TeacherHead(nn.Module):
  """Head k ≥ 2 of Eq. (1): P_k (1 × 1 conv E_1 → E_k), teacher k's fixed class embeddings, a learned background."""
  dim: int
  num_classes: int
  temperature: float

  def setup(self):
    c, e = self.num_classes, self.dim
    self.class_embeddings = self.variable("constants", "class_embeddings", lambda: jnp.zeros((c, e), jnp.float32))
    self.projection = nn.Dense(e, name="projection")
    self.background = self.param("background", nn.initializers.normal(1.0), (e,), jnp.float32)

  def __call__(self, emb: jax.Array) -> jax.Array:
    return segmenter.text_logits(self.projection(emb), self.class_embeddings.value, self.background,
                                 self.temperature)


class MultiTeacherSegmenter(DenseSegmenter):
  """`DenseSegmenter` + one head per further teacher + the weighted prediction (module docstring)."""
  teacher_dims: tuple = ()        # E_2, …, E_K
  weights: tuple = ()             # π_1, …, π_K
  weighting: str = "fixed"
  weight_temperature: float = 1.0

  def setup(self):
    super().setup()
    self.heads = [TeacherHead(int(d), self.num_classes, self.temperature, name=f"teacher{k + 2}")
                  for k, d in enumerate(self.teacher_dims)]

  def teacher_logits(self, emb: jax.Array, mask: jax.Array) -> tuple:
    return (self.logits(emb, mask),) + tuple(segmenter.masked(h(emb), mask) for h in self.heads)

  def __call__(self, batch: Mapping, *, train: bool = False) -> dict:
    emb = self.embed(batch["image"], train=train)
    logits = self.teacher_logits(emb, self.train_mask.value)
    return {"logits": logits[0], "teacher_logits": logits, "embeddings": emb}

  def segment(self, images: jax.Array) -> jax.Array:
    """log p(x) [B, H/4, W/4, 1 + C], p the weighted mean of the heads' probabilities (module docstring)."""
    mask = self.test_mask.value
    probs = jnp.stack([jax.nn.softmax(z, axis=-1) for z in self.teacher_logits(self.embed(images), mask)], -2)
    w = teacher_weights(probs.max(axis=-1), self.weights, self.weighting, self.weight_temperature)
    p = (w[..., None] * probs).sum(axis=-2)
    return segmenter.masked(jnp.log(jnp.maximum(p, 1e-30)), mask)


def build(cfg: Mapping[str, Any]) -> MultiTeacherSegmenter:
  """The student from a segmenter config (`segmenter.build`'s keys) plus `teachers`: {'embed_dims' (E_1, …, E_K;
  E_1 = embed_dim), 'weights' (π), 'weighting' ('fixed' | 'confidence'), 'temperature' (T)}."""
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  t = dict(cfg.pop("teachers", None) or {})
  dims, weights = tuple(int(d) for d in t.get("embed_dims", ())), tuple(float(w) for w in t.get("weights", ()))
  if len(dims) < 2 or len(weights) != len(dims):
    raise UserError(f"model.teachers needs ≥ 2 embed_dims and one weight each, got {dims} / {weights}")
  if t.get("weighting") not in WEIGHTINGS:
    raise UserError(f"unknown teacher weighting {t.get('weighting')!r}; use one of {WEIGHTINGS}")
  base = segmenter.build({**cfg, "embed_dim": dims[0], "classifier": "text"})
  return MultiTeacherSegmenter(backbone=base.backbone, pyramid=base.pyramid, head=base.head,
                               num_classes=base.num_classes, embed_dim=base.embed_dim, classifier="text",
                               temperature=base.temperature, teacher_dims=dims[1:], weights=weights,
                               weighting=str(t["weighting"]), weight_temperature=float(t.get("temperature", 1.0)))
