"""GLIP-style region-word alignment loss L_RW: region features against phrase features, sigmoid focal loss.

GLIP (Li et al. 2022, "Grounded Language-Image Pre-training", arXiv 2112.03857, §3.1 eq. 2–3) turns detection's
classification into alignment: the scores S = O Pᵀ between region features O and word/phrase features P replace
the class logits, and are trained with the detector's binary sigmoid focal loss (Lin et al. 2017, RetinaNet). Here
the regions are the ground-truth boxes of the batch (RoIAlign-pooled image tokens, `TwoTower.encode_regions`), and
every region is scored against every phrase of the GLOBAL batch (the phrases of other images are negatives, as in
contrastive pre-training):

    logit_rp = t_rw · <ô_r, p̂_p> + b_rw            (ô, p̂ L2-normalised; t_rw, b_rw learned, b_rw init −ln 99)
    y_rp     = 1 if region r and phrase p name the same class (batch['region_class'], when given), else [r = p]
    FL(x, y) = −α_y (1 − q_y)^γ log q_y,   q_1 = σ(x), q_0 = 1 − σ(x), α_1 = α, α_0 = 1 − α
    L_RW     = Σ_{r, p valid} FL(logit_rp, y_rp) / max(1, #positive pairs)

with α = 0.25, γ = 2 (RetinaNet's values, used by GLIP) and the RetinaNet normalisation by the number of
positives. Deviations: GLIP scores the regions of a detector's anchors against the word tokens of the whole prompt
after deep vision-language fusion; here boxes are given, each object's phrase is encoded alone by the text tower
(pooled, see `TwoTower.encode_phrases`), and the same-class rule keeps two "red circle" objects of one batch from
being each other's negatives.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.objectives.contrastive import constrain_rows, top1_hits

Metrics = dict[str, jax.Array]
_HIGHEST = jax.lax.Precision.HIGHEST


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """Element-wise binary focal loss FL (Lin et al. 2017; formula in the module docstring), numerically stable;
  alpha < 0 disables the class weighting."""
  targets = targets.astype(jnp.float32)
  ce = -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
  p = jax.nn.sigmoid(logits)
  q = targets * p + (1.0 - targets) * (1.0 - p)
  loss = ce * (1.0 - q) ** gamma
  if alpha >= 0:
    loss = loss * (targets * alpha + (1.0 - targets) * (1.0 - alpha))
  return loss


def region_word_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                     mesh_axes: str | Sequence[str] | None = None, alpha: float = 0.25,
                     gamma: float = 2.0) -> tuple[jax.Array, Metrics]:
  """GLIP-style region-word alignment (formula in the module docstring).

  Needs outputs['zregion'], ['zphrase'] [B, K, E] (`model.region_features=True`, a batch with 'boxes' and
  'phrases': `data.regions=K`), ['region_logit_scale'], ['region_logit_bias'], and batch['region_valid'] [B, K];
  optional batch['region_class'] [B, K] (−1 unknown). Metrics: region_word/loss, region_word/accuracy (the share of
  valid regions whose best positive phrase scores strictly above every other valid phrase: ties are wrong, the
  rule of `contrastive.top1_hits`), region_word/regions (valid regions in the batch).
  """
  if "zregion" not in outputs or "zphrase" not in outputs:
    raise UserError("the 'region_word' objective needs region features: set model.region_features=True and "
                    "data.regions=K (> 0) so batches carry boxes and phrases")
  zr, zp = outputs["zregion"], outputs["zphrase"]
  b, k, e = zr.shape
  zr, zp = zr.reshape(b * k, e).astype(jnp.float32), zp.reshape(b * k, e).astype(jnp.float32)
  valid = jnp.asarray(batch["region_valid"]).reshape(b * k).astype(bool)
  ids = jnp.arange(b * k)
  positive = ids[:, None] == ids[None, :]
  if "region_class" in batch:
    cls = jnp.asarray(batch["region_class"]).reshape(b * k)
    positive = positive | ((cls[:, None] == cls[None, :]) & (cls[:, None] >= 0))
  pair_valid = constrain_rows(valid[:, None] & valid[None, :], mesh_axes)
  positive = constrain_rows(positive, mesh_axes) & pair_valid
  scale = outputs["region_logit_scale"].astype(jnp.float32)
  bias = outputs["region_logit_bias"].astype(jnp.float32)
  logits = constrain_rows(scale * jnp.matmul(zr, zp.T, precision=_HIGHEST) + bias, mesh_axes)
  fl = jnp.where(pair_valid, sigmoid_focal_loss(logits, positive, alpha, gamma), 0.0)
  n_pos = jnp.sum(positive.astype(jnp.float32))
  loss = jnp.sum(fl) / jnp.maximum(n_pos, 1.0)
  best_positive = jnp.max(jnp.where(positive, logits, -jnp.inf), axis=1)
  best_negative = jnp.max(jnp.where(pair_valid & ~positive, logits, -jnp.inf), axis=1)
  hit = top1_hits(best_positive, best_negative) * valid
  n_valid = jnp.sum(valid.astype(jnp.float32))
  accuracy = jnp.sum(hit) / jnp.maximum(n_valid, 1.0)
  metrics = {"region_word/loss": loss,
             "region_word/accuracy": jax.lax.stop_gradient(accuracy),
             "region_word/regions": n_valid,
             "region_word/logit_scale": jax.lax.stop_gradient(scale)}
  return loss, metrics
