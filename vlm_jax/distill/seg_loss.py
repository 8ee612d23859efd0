"""The per-pixel loss of the segmentation students (MaskCLIP+ and LSeg).

LSeg (Li et al. 2022, "Language-driven Semantic Segmentation", §3, Eq. 2) and MaskCLIP+ (Zhou et al. 2022, §3.3,
DeepLab's cross-entropy on the pseudo-labels) both minimise the pixel-wise softmax cross-entropy of the label
logits ℓ(x) = [cos(f(x), t_bg), cos(f(x), t_c)]/τ against a label map y:

    L = − 1/|P| Σ_{x ∈ P} log softmax(ℓ(x))_{y(x)},     P = pixels with y(x) ≥ 0 (−1: ignored)

The logits come at stride 4 and are upsampled bilinearly to the label map (half-pixel centres, as the evaluator);
classes outside the training set carry logit −1e9 (the model's mask), so the softmax runs over background + the
training classes only (LSeg: the labelled base classes; MaskCLIP+: every target class the pseudo-labels name).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pixel_cross_entropy(outputs: dict, batch: dict) -> tuple[jax.Array, dict]:
  """(L, {'pixel_accuracy'}) of `outputs['logits']` [B, h, w, K] against `batch['labels']` int [B, H, W]."""
  labels = batch["labels"].astype(jnp.int32)
  b, h, w = labels.shape
  logits = outputs["logits"]
  logits = jax.image.resize(logits, (b, h, w, logits.shape[-1]), method="bilinear", antialias=False)
  valid = labels >= 0
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  count = jnp.maximum(valid.sum(), 1)
  loss = jnp.where(valid, nll, 0.0).sum() / count
  acc = jnp.where(valid, logits.argmax(-1) == labels, False).sum() / count
  return loss, {"pixel_ce": loss, "pixel_accuracy": acc}
