"""CLIPSeg training (Lüddecke & Ecker 2022, "Image Segmentation Using Text and Image Prompts", §3–4): per training
image K queries drawn from the labelled BASE classes (the base-class phrases; novel classes are only ever queried at
test time), each with its binary target mask, and the per-pixel binary cross-entropy of the decoder's mask logits:

    L = −1/(B K H W) Σ_{b,k,x} [ y_bk(x) log σ(m_bk(x)) + (1 − y_bk(x)) log(1 − σ(m_bk(x))) ],   y_bk = 1[label_b = q_bk]

Queries: the base classes present in the image (in random order, at most K) and, for the remaining slots, base
classes absent from it (negative queries, target all zero), drawn with a generator seeded by (seed, image index).
The model is `vlm_jax.models.segmentation.clipseg` (frozen ViT + FiLM-conditioned decoder); evaluation is the shared
base / novel / harmonic mIoU of `seg_evaluation` on its `segment` logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError


def check(config) -> None:
  k = int(config.method.get("queries", 0))
  if k < 1:
    raise UserError(f"method.queries (CLIPSeg's queries per training image) must be >= 1, got {k}")


def with_queries(make_row, base: np.ndarray, k: int, seed: int):
  """make_row(i) -> {'image', 'labels'} turned into {'image', 'queries' int32 [K], 'targets' uint8 [K, H, W]}.
  `base` are the base class ids (vocabulary ids; labels hold class id + 1)."""
  base = np.asarray(base, np.int64)

  def row(i: int) -> dict:
    r = make_row(i)
    labels = np.asarray(r["labels"])
    rng = np.random.default_rng((int(seed), 7919, int(i)))
    present = np.intersect1d(np.unique(labels) - 1, base)
    absent = np.setdiff1d(base, present)
    q = rng.permutation(present)[:k]
    if len(q) < k:
      q = np.concatenate([q, rng.choice(absent, k - len(q), replace=False)])
    targets = (labels[None] == (q[:, None, None] + 1)).astype(np.uint8)
    return {"image": r["image"], "queries": q.astype(np.int32), "targets": targets}
  return row


def binary_mask_loss(outputs: dict, batch: dict) -> tuple[jax.Array, dict]:
  """(L, metrics) of the module docstring; mask logits resized bilinearly to the targets' size when they differ."""
  y = batch["targets"].astype(jnp.float32)
  m = outputs["mask_logits"]
  if m.shape != y.shape:
    m = jax.image.resize(m, y.shape, method="bilinear", antialias=False)
  loss = jnp.mean(jnp.maximum(m, 0) - m * y + jnp.log1p(jnp.exp(-jnp.abs(m))))
  pred = m > 0
  inter = jnp.sum(pred & (y > 0.5))
  union = jnp.maximum(jnp.sum(pred | (y > 0.5)), 1)
  return loss, {"mask_bce": loss, "mask_iou": inter / union}
