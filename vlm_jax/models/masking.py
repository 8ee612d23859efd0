"""Input corruption that masked-modelling models apply to their own inputs: patch dropping and BERT text masking.

The model masks, the objective only reads what the model emits (`outputs['mlm']`, `outputs['mim']`, …).

Patches — MAE (He et al. 2022, arXiv:2111.06377, §3) and FLIP (Li et al. 2023): per example a uniform random subset
of K = max(1, round((1 − r)·N)) of the N patches is kept (`random_keep_indices`); the loss belongs to the others
(`masked_from_keep`, m_bn = 1 for the masked patches).

Text — BERT (Devlin et al. 2019, arXiv:1810.04805, §3.1 and appendix A.1): of the n words of a row (no SOT, EOT or
padding: `models.tokens.word_tokens`, from the tokenizer's `sot_id`/`eot_id`/`pad_id`),

    k = max(1, round(r · n))   (0 when n = 0)

positions are selected uniformly without replacement (BERT's `create_pretraining_data`), and each selected token
becomes [MASK] with probability 0.8, a random token with 0.1 and stays unchanged with 0.1. Random tokens are drawn
uniformly from the vocabulary minus the special ids (SOT, EOT, pad: `models.tokens.special_ids`) and [MASK], so a
corruption never fakes the row's layout. The loss belongs to every selected position (the survey's L_MLM).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.tokens import special_ids, word_tokens


def random_keep_indices(rng: jax.Array, batch_size: int, num_patches: int, mask_ratio: float) -> jax.Array:
  """Per example, a random subset of round((1 − r)·N) patch indices (at least one): int32 [B, K].

  A uniform random permutation per example (argsort of uniform noise, as MAE), truncated and sorted back into
  raster order (FLIP's patch dropping, MAE's visible set, the two-leg model's MIM/MCM masks).
  """
  keep = max(1, int(round((1. - mask_ratio) * num_patches)))
  noise = jax.random.uniform(rng, (batch_size, num_patches))
  idx = jnp.argsort(noise, axis=1)[:, :keep]
  return jnp.sort(idx, axis=1).astype(jnp.int32)


def masked_from_keep(keep_idx: jax.Array, num_patches: int) -> jax.Array:
  """float32 [B, N]: 1 at the patches not in `keep_idx` [B, K] (they carry the MIM/MCM loss), 0 at the kept ones."""
  b = keep_idx.shape[0]
  return jnp.ones((b, num_patches), jnp.float32).at[jnp.arange(b)[:, None], keep_idx].set(0.)


def maskable_positions(ids: jax.Array, *, sot_id: int | None = None, eot_id: int | None = None,
                       pad_id: int | None = None, skip_first: bool = True) -> jax.Array:
  """bool [B, L]: the words of each row (`models.tokens.word_tokens`), and never position 0 when `skip_first`
  (the [CLS] slot a 'first'-pooling encoder reads)."""
  words = word_tokens(ids, sot_id=sot_id, eot_id=eot_id, pad_id=pad_id)
  if skip_first:
    words = words & (jnp.arange(ids.shape[-1]) > 0)[None]
  return words


def random_tokens(rng: jax.Array, shape: Sequence[int], vocab_size: int, exclude: Sequence[int]) -> jax.Array:
  """int32 ids uniform over [0, vocab_size) minus `exclude` (ids outside the range are ignored).

  Draws r uniform over the V − |exclude| allowed ids, then steps it over each excluded id in increasing order
  (r ← r + [r ≥ e]), which maps {0 … V−|E|−1} one-to-one onto the allowed ids.
  """
  banned = sorted({int(e) for e in exclude if 0 <= int(e) < vocab_size})
  allowed = vocab_size - len(banned)
  if allowed < 1:
    raise UserError(f"no token id of a {vocab_size}-token vocabulary is left once {banned} are excluded")
  r = jax.random.randint(rng, tuple(shape), 0, allowed, dtype=jnp.int32)
  for e in banned:
    r = r + (r >= e).astype(jnp.int32)
  return r


def bert_mask(rng: jax.Array, ids: jax.Array, *, mask_id: int, vocab_size: int, ratio: float = 0.15,
              sot_id: int | None = None, eot_id: int | None = None, pad_id: int | None = None,
              skip_first: bool = True) -> tuple[jax.Array, jax.Array]:
  """BERT corruption (module docstring): (corrupted ids int32 [B, L], selected bool [B, L]).

  `vocab_size` is the tokenizer's (ids [0, V)); `mask_id` the [MASK] id (the two-leg model's extra row V). The
  layout ids come from the tokenizer; all None keeps the old convention (EOT = V − 1, pad 0, SOT at position 0).
  """
  if not 0.0 < ratio < 1.0:
    raise UserError(f"mlm mask ratio must be in (0, 1), got {ratio}")
  ids = ids.astype(jnp.int32)
  k_sel, k_kind, k_tok = jax.random.split(rng, 3)
  real = maskable_positions(ids, sot_id=sot_id, eot_id=eot_id, pad_id=pad_id, skip_first=skip_first)
  n = jnp.sum(real, axis=1)
  k = jnp.where(n > 0, jnp.maximum(1, jnp.floor(ratio * n + 0.5)), 0).astype(jnp.int32)
  noise = jnp.where(real, jax.random.uniform(k_sel, ids.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  selected = real & (rank < k[:, None])
  u = jax.random.uniform(k_kind, ids.shape)
  exclude = special_ids(vocab_size, sot_id=sot_id, eot_id=eot_id, pad_id=pad_id) + (mask_id,)
  random_ids = random_tokens(k_tok, ids.shape, vocab_size, exclude)
  corrupted = jnp.where(selected & (u < 0.8), mask_id, jnp.where(selected & (u >= 0.8) & (u < 0.9), random_ids, ids))
  return corrupted, selected
