"""ViLD objectives and inference (Gu et al. 2022, "Open-vocabulary Object Detection via Vision and Language
Knowledge Distillation", ICLR, arXiv 2104.13921), as pure functions of region embeddings.

Notation: r a region (a proposal matched to a base ground-truth box, or background), e_r its L2-normalised region
embedding from the student detector, t_c the frozen L2-normalised text embedding of class c (the teacher's prompt
ensemble), e_bg a learned background embedding (normalised), τ the temperature, y_r ∈ {bg} ∪ C_B the label.

ViLD-text (§3.2, eq. 1–2): cosine logits over the background and the base classes only (novel classes are
unknown in training: their columns are masked out),

    z(r) = [cos(e_r, e_bg), cos(e_r, t_1), …, cos(e_r, t_|C_B|)],
    L_ViLD-text = (1/N) Σ_r CE(softmax(z(r) / τ), y_r).

ViLD-image (§3.2, eq. 3): the region embeddings ẽ_r of M fixed proposals (computed from the same box features by
a second head in ViLD-ensemble) regress the teacher's image embeddings of the proposals' crops, e^T_r
(`teacher_cache`: the normalised sum of the 1× and 1.5× crop embeddings),

    L_ViLD-image = (1/M) Σ_r || ẽ_r − e^T_r ||_1 ,

which is where novel objects (cropped by class-agnostic proposals, never labelled) enter. The total loss adds
w · L_ViLD-image (w = `image_weight`, the paper's 0.5 on LVIS) and the detector's RPN and box-regression losses.

Inference (§3.4, ViLD-ensemble): with all class names added (base and novel), p_text = softmax(z_text / τ) and
p_image = softmax(z_image / τ) over {bg} ∪ C_B ∪ C_N; the class score is the weighted geometric mean

    s_c = p_text,c^λ · p_image,c^(1−λ)   for c ∈ C_B,       s_c = p_text,c^(1−λ) · p_image,c^λ   for c ∈ C_N,

λ = 2/3 (the paper's default): the text head is trusted on base classes, the image head (distilled from the
teacher) on novel ones.

The scoring functions, z(r) (`cosine_logits`) and the ensemble (`ensemble_scores`), belong to the student model,
`vlm_jax.models.detection.open_vocab` (which `python -m vlm_jax.evaluate` rebuilds without this package); they
are imported here, not redefined.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.models.detection.open_vocab import cosine_logits  # z(r): the student model's, one definition
from vlm_jax.models.two_tower import l2_normalize


def softmax_ce(logits: jax.Array, labels: jax.Array, weights: jax.Array):
  """(weighted mean of −log softmax(logits)[y], weighted accuracy) over regions; logits [B, R, 1 + C], labels int
  [B, R] (0 = background), weights [B, R]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == labels) * w).sum() / denom
  return (nll * w).sum() / denom, acc


def vild_text_loss(region: jax.Array, labels: jax.Array, weights: jax.Array, class_emb: jax.Array,
                   background: jax.Array, *, temperature: float, class_mask: jax.Array | None = None):
  """L_ViLD-text (module docstring): mean over regions with weight > 0 of CE(softmax(z/τ), y).

  region [B, R, E]; labels int [B, R] with 0 = background and c + 1 = class c (an index into `class_emb`);
  weights [B, R] (0 for padded / unsampled regions). Returns (loss, accuracy over the weighted regions)."""
  return softmax_ce(cosine_logits(region, class_emb, background, class_mask) / temperature, labels, weights)


def teacher_targets(crops: jax.Array) -> jax.Array:
  """e^T [..., E]: the normalised sum of the normalised teacher embeddings of a proposal's crops [..., S, E]."""
  return l2_normalize(l2_normalize(crops).sum(axis=-2))


def vild_image_loss(region: jax.Array, teacher: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """L_ViLD-image: (1/M) Σ_r || normalise(ẽ_r) − e^T_r ||_1 over region [B, M, E], teacher [B, M, E]."""
  l1 = jnp.abs(l2_normalize(region) - l2_normalize(teacher)).sum(axis=-1)
  if weights is None:
    return l1.mean()
  w = weights.astype(jnp.float32)
  return (l1 * w).sum() / jnp.maximum(w.sum(), 1.0)


def make_loss_fn(*, text_weight: float = 1.0, image_weight: float = 0.0):
  """`loss_fn(outputs, batch) -> (loss, metrics)` of a student (the outputs of
  `models.detection.open_vocab.OpenVocabDetector`):

      L = L_RPN + L_box + text_weight · L_cls + image_weight · L_ViLD-image,

  L_cls = CE of the student's class logits (ViLD-text's cosine logits / τ, or the closed-set baseline's linear
  logits) on the detector's sampled regions; L_ViLD-image on the cached proposals when `image_weight` > 0."""

  def loss_fn(outputs: dict, batch: dict):
    cls, acc = softmax_ce(outputs["class_logits"], outputs["labels"], outputs["label_weights"])
    loss = outputs["rpn_loss"] + outputs["box_loss"] + text_weight * cls
    metrics = {"rpn_loss": outputs["rpn_loss"], "box_loss": outputs["box_loss"], "cls_loss": cls,
               "cls_accuracy": acc}
    if image_weight > 0:
      img = vild_image_loss(outputs["image_embeddings"], teacher_targets(batch["teacher_crops"]))
      loss = loss + image_weight * img
      metrics["image_loss"] = img
    return loss, metrics

  return loss_fn
