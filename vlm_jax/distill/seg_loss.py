"""The per-pixel loss of the segmentation students (MaskCLIP+ and LSeg).

LSeg (Li et al. 2022, "Language-driven Semantic Segmentation", §3, Eq. 2) and MaskCLIP+ (Zhou et al. 2022, §3.3,
DeepLab's cross-entropy on the pseudo-labels) both minimise the pixel-wise softmax cross-entropy of the label
logits ℓ(x) = [cos(f(x), t_bg), cos(f(x), t_c)]/τ against a label map y:

    L = − 1/|P| Σ_{x ∈ P} log softmax(ℓ(x))_{y(x)},     P = pixels with y(x) ≥ 0 (−1: ignored)

The logits come at stride 4 and are upsampled bilinearly to the label map (half-pixel centres, as the evaluator);
classes outside the training set carry logit −1e9 (the model's mask), so the softmax runs over background + the
training classes only (LSeg: the labelled base classes; MaskCLIP+: every target class the pseudo-labels name).
Multi-teacher MaskCLIP+ sums this per-pixel term over teachers' heads with weights w_k(x)
(`multi_teacher_cross_entropy`; the method and its weights: `distill.multi_teacher`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pixel_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(−log softmax(ℓ(x))_{y(x)} [B, H, W], valid y ≥ 0, ℓ upsampled to [B, H, W, K]) of logits [B, h, w, K]."""
  labels = labels.astype(jnp.int32)
  b, h, w = labels.shape
  logits = jax.image.resize(logits, (b, h, w, logits.shape[-1]), method="bilinear", antialias=False)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return nll, labels >= 0, logits


def pixel_cross_entropy(outputs: dict, batch: dict) -> tuple[jax.Array, dict]:
  """(L, {'pixel_accuracy'}) of `outputs['logits']` [B, h, w, K] against `batch['labels']` int [B, H, W]."""
  labels = batch["labels"].astype(jnp.int32)
  nll, valid, logits = pixel_nll(outputs["logits"], labels)
  count = jnp.maximum(valid.sum(), 1)
  loss = jnp.where(valid, nll, 0.0).sum() / count
  acc = jnp.where(valid, logits.argmax(-1) == labels, False).sum() / count
  return loss, {"pixel_ce": loss, "pixel_accuracy": acc}


def multi_teacher_cross_entropy(outputs: dict, batch: dict, *, prior, rule: str = "fixed",
                                temperature: float = 1.0) -> tuple[jax.Array, dict]:
  """Multi-teacher MaskCLIP+ (`distill.multi_teacher`): L = 1/|P| Σ_x Σ_k w_k(x) · CE(ℓ_k(x), ŷ_k(x)) of the heads'
  logits `outputs['teacher_logits']` (K × [B, h, w, 1 + C]) against the teachers' labels `batch['labels']`
  int [B, H, W, K], weights w from `models.segmentation.multi_teacher.teacher_weights` (rule 'confidence': of the
  teachers' confidences `batch['teacher_confidence']` [B, H, W, K]); P = pixels with some label ≥ 0. A one-hot
  prior with rule 'fixed' is `pixel_cross_entropy` on that teacher's head, bit for bit."""
  from vlm_jax.models.segmentation.multi_teacher import teacher_weights  # noqa: PLC0415
  labels = batch["labels"].astype(jnp.int32)
  conf = batch.get("teacher_confidence")
  conf = jnp.zeros(labels.shape, jnp.float32) if conf is None else conf
  w = teacher_weights(conf, prior, rule, temperature)
  total, metrics, any_valid = 0.0, {}, False
  for k, logits in enumerate(outputs["teacher_logits"]):
    nll, valid, _ = pixel_nll(logits, labels[..., k])
    total = total + jnp.where(valid, w[..., k] * nll, 0.0)
    any_valid = any_valid | valid
    metrics[f"pixel_ce/teacher{k + 1}"] = jnp.where(valid, nll, 0.0).sum() / jnp.maximum(valid.sum(), 1)
    metrics[f"weight/teacher{k + 1}"] = w[..., k].mean()
  loss = jnp.where(any_valid, total, 0.0).sum() / jnp.maximum(any_valid.sum(), 1)
  return loss, {"pixel_ce": loss, **metrics}
