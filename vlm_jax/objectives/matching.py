"""Image-text matching (ITM): the binary matched / not-matched objective on a fusion encoder, with hard negatives.

ALBEF (Li et al. 2021, arXiv:2107.07651, §3.2) and BLIP (Li et al. 2022, arXiv:2201.12086) train a binary
classifier on the fused [CLS] feature of (image, text) pairs: the B positive pairs of the batch plus, for every
image, one negative text and, for every text, one negative image, mined from the in-batch contrastive similarity:

  p(j | image i) = softmax_j(t · z^I_i · z^T_j)  over j ≠ i,     p(i | text j) = softmax_i(t · z^I_i · z^T_j) over i ≠ j,

with the similarity taken under stop-gradient (t the learned logit scale). Texts whose token ids equal the positive
text's are excluded as well (BLIP masks same-image pairs for the same reason: they are not negatives). The loss is
the cross-entropy over the 3B pairs (the survey's L_IT):

  L_ITM = −(1/3B) Σ_{pairs} log p(y_pair | fused CLS),   y = 1 for the B positives, 0 for the 2B negatives.

The model mines the negatives itself (`vlm_jax.models.hard_negatives.sample_hard_negatives`, called by
`vlm_jax.models.two_leg` inside the jitted step) and emits outputs['itm'] = {'logits' [3B, 2] (or [3B] log-odds),
'labels' int [3B]}; this objective only consumes them. Batches are global arrays, so the mining covers the global
batch whatever the sharding (GSPMD gathers what the sampling needs).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from vlm_jax.errors import UserError


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
