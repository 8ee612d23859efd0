"""ITM hard-negative mining (ALBEF, Li et al. 2021, arXiv:2107.07651, §3.2; BLIP, Li et al. 2022, arXiv:2201.12086).

For every image one negative text and for every text one negative image are drawn from the in-batch contrastive
similarity under stop-gradient (t the learned logit scale):

  p(j | image i) = softmax_j(t · z^I_i · z^T_j)  over allowed j,
  p(i | text j)  = softmax_i(t · z^I_i · z^T_j)  over allowed i,

where the pair itself and texts whose token ids equal the positive text's are not allowed (BLIP masks same-image
pairs for the same reason: they are not negatives). The two-leg model (`models.two_leg`) mines inside the jitted
step on global arrays, so the mining covers the global batch whatever the sharding; the 'itm' objective
(`objectives.matching`) only reads the pairs' logits and labels the model emits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError


def text_hash(ids: jax.Array) -> jax.Array:
  """uint32 [B] polynomial hash of each row of token ids (equal rows, equal hashes; collisions are rare)."""
  weights = jnp.asarray([pow(1_000_003, i, 1 << 32) for i in range(ids.shape[-1])], jnp.uint32)
  return jnp.sum(ids.astype(jnp.uint32) * weights[None], axis=-1, dtype=jnp.uint32)


def same_text_pairs(ids: jax.Array) -> jax.Array:
  """bool [B, B]: pairs (i, j) with equal texts (by `text_hash`, keeping this [B, B], not [B, B, L]) or i = j."""
  h = text_hash(ids)
  return (h[:, None] == h[None, :]) | jnp.eye(ids.shape[0], dtype=bool)


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
