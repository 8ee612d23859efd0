"""Image-text matching (ITM): the binary matched / not-matched objective on a fusion encoder, with hard negatives.

ALBEF (Li et al. 2021, arXiv:2107.07651, §3.2) and BLIP (Li et al. 2022, arXiv:2201.12086) train a binary
classifier on the fused [CLS] feature of (image, text) pairs: the B positive pairs of the batch plus, for every
image, one negative text and, for every text, one negative image, mined from the in-batch contrastive similarity:

  p(j | image i) = softmax_j(t · z^I_i · z^T_j)  over j ≠ i,     p(i | text j) = softmax_i(t · z^I_i · z^T_j) over i ≠ j,

with the similarity taken under stop-gradient (t the learned logit scale). Texts whose token ids equal the positive
text's are excluded as well (BLIP masks same-image pairs for the same reason: they are not negatives). The loss is
the cross-entropy over the 3B pairs (the survey's L_IT):

  L_ITM = −(1/3B) Σ_{pairs} log p(y_pair | fused CLS),   y = 1 for the B positives, 0 for the 2B negatives.

The model (`vlm_jax.models.two_leg`) mines with `sample_hard_negatives` inside the jitted step and emits
outputs['itm'] = {'logits' [3B, 2] (or [3B] log-odds), 'labels' int [3B]}; batches are global arrays, so the
mining covers the global batch whatever the sharding (GSPMD gathers what the sampling needs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vlm_jax.errors import UserError


def sample_hard_negatives(rng: jax.Array, sim: jax.Array, exclude: jax.Array,
                          hard_fraction: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(negative text per image [B], negative image per text [B]) sampled ∝ softmax(sim) over allowed pairs.

  `sim` [B, B]: image i × text j (already scaled by the temperature; no gradient flows through it);
  `exclude` bool [B, B]: pairs that must not be drawn (at least the diagonal). A row with no allowed pair falls
  back to its neighbour (i + 1) mod B. `hard_fraction` in [0, 1]: each row is mined by similarity with this
  probability and otherwise drawn uniformly over its allowed pairs (1.0, the default, is ALBEF/BLIP's pure hard
  mining; 0.0 gives random in-batch negatives).
  """
  if not 0.0 <= hard_fraction <= 1.0:
    raise UserError(f"ITM hard_fraction must lie in [0, 1], got {hard_fraction}")
  sim = jax.lax.stop_gradient(sim.astype(jnp.float32))
  exclude = jnp.asarray(exclude, bool)
  b = sim.shape[0]
  fallback = (jnp.arange(b, dtype=jnp.int32) + 1) % b
  k_txt, k_img = jax.random.split(rng)

  def draw(key, logits, excl):
    if hard_fraction < 1.0:
      key, k_hard = jax.random.split(key)
      hard = jax.random.bernoulli(k_hard, hard_fraction, (logits.shape[0], 1))
      logits = jnp.where(hard, logits, 0.0)
    idx = jax.random.categorical(key, jnp.where(excl, -jnp.inf, logits), axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(~excl, axis=1), idx, fallback)

  return draw(k_txt, sim, exclude), draw(k_img, sim.T, exclude.T)


def itm_loss(outputs, batch, *, mesh_axes=None):
  """L_ITM (ALBEF/BLIP): cross-entropy of outputs['itm']['logits'] against outputs['itm']['labels'].

  Logits [P, 2] use the softmax cross-entropy; logits [P] are log-odds (sigmoid cross-entropy). Metrics:
  itm/loss, itm/accuracy (all pairs; with one positive per two negatives a constant 'no' scores 2/3),
  itm/pos_accuracy, itm/neg_accuracy and itm/balanced_accuracy (their mean; chance 1/2). `mesh_axes` is
  accepted for the common signature; the pairs are global arrays and need no constraint.
  """
  del batch, mesh_axes
  if "itm" not in outputs:
    raise UserError("objective 'itm' needs a model that emits outputs['itm'] (framework 'two_leg' with 'itm' "
                    "in model.tasks)")
  logits = outputs["itm"]["logits"].astype(jnp.float32)
  labels = outputs["itm"]["labels"].astype(jnp.int32)
  if logits.ndim == 1:
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))
    pred = (logits > 0).astype(jnp.int32)
  else:
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  correct = (pred == labels).astype(jnp.float32)
  pos = (labels == 1).astype(jnp.float32)
  pos_acc = jnp.sum(correct * pos) / jnp.maximum(jnp.sum(pos), 1.0)
  neg_acc = jnp.sum(correct * (1 - pos)) / jnp.maximum(jnp.sum(1 - pos), 1.0)
  return loss, {"itm/loss": loss, "itm/accuracy": jnp.mean(correct), "itm/pos_accuracy": pos_acc,
                "itm/neg_accuracy": neg_acc, "itm/balanced_accuracy": 0.5 * (pos_acc + neg_acc)}
