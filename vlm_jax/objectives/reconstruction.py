"""Masked per-position losses shared by the generative objectives (MAE/MIM, MLM/MCM, captioning).

Both reduce over the positions that carry loss only, as the papers define them:

  masked_mse(pred, target, m)            = Σ_{b,n} m_bn · mean_d (pred_bnd − target_bnd)² / Σ_{b,n} m_bn
  masked_cross_entropy(logits, y, m)     = Σ_{b,l} m_bl · (−log softmax(logits_bl)[y_bl]) / Σ_{b,l} m_bl

(MAE, He et al. 2022: "the loss is computed only on masked patches"; BERT, Devlin et al. 2019: cross-entropy on
the masked tokens; captioning: on the non-padding next tokens.) Inputs are global arrays (inside `jit` the sums run
over the whole global batch, whatever the sharding); everything is computed in float32. An all-zero mask gives 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _mean_over(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over masked positions of the per-position mean squared error; pred/target [..., D], mask [...]."""
  err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  return _mean_over(err, mask)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                         label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(mean token cross-entropy, token accuracy) over the positions where `mask` is set; logits [..., V].

  `label_smoothing` ε > 0 uses the target distribution (1 − ε) one_hot(y) + ε / V (Szegedy et al. 2016, §7).
  """
  logits = logits.astype(jnp.float32)
  if label_smoothing:
    labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), label_smoothing)
    ce = optax.softmax_cross_entropy(logits, labels)
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return _mean_over(ce, mask), _mean_over(correct, mask)
