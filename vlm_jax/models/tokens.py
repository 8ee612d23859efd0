"""Where the special tokens of a text row sit: EOT positions, word masks and attention-key masks.

The layout comes from the tokenizer (`vlm_jax.data.tokenizers`), whose `sot_id`, `eot_id`, `pad_id` (None where the
tokenizer has no such token) the model assembly copies into the text encoder's fields of the same names:
- CLIP layout ('words', 'bytes', 'sentencepiece', 'clip_bpe'): `[SOT] w_1 … w_n [EOT] pad…`, pad 0 (for 'clip_bpe'
  0 is also the id of '!', so a 0 before EOT is a word);
- SigLIP ('siglip'): `w_1 … w_n </s> </s>…`, pad_id = eot_id (1), no SOT.

With `eot_id` set, the layout is read from positions (e_b the EOT position of row b):

    e_b = min{l : ids_bl = eot_id}   (L − 1 when the row has no EOT, i.e. it was cut without one)
    word_bl  = [l < e_b] ∧ [ids_bl ≠ sot_id]      (the words: no SOT, no EOT, no padding)
    valid_bl = [l ≤ e_b]                           (the tokens a bidirectional encoder may attend to)

Padding is whatever follows the EOT, so `pad_id` needs no comparison inside the text (it would drop CLIP's '!').
With `eot_id` None (a model config that predates tokenizer-given layouts, e.g. a converted open_clip checkpoint)
the old convention holds, unchanged: EOT is the row's largest id (e_b = argmax_l ids_bl, open_clip's pooling),
padding is `pad_id` (0 when None) and SOT is position 0 (or `sot_id` when given).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEGACY_PAD_ID = 0


def eot_positions(ids: jax.Array, eot_id: int | None = None) -> jax.Array:
  """int32 [B]: e_b, the first position holding `eot_id` (L − 1 if none); `eot_id` None: argmax of the ids."""
  ids = jnp.asarray(ids)
  if eot_id is None:
    return jnp.argmax(ids, axis=-1).astype(jnp.int32)
  hit = ids == eot_id
  first = jnp.argmax(hit, axis=-1)
  return jnp.where(jnp.any(hit, axis=-1), first, ids.shape[-1] - 1).astype(jnp.int32)


def valid_tokens(ids: jax.Array, *, eot_id: int | None = None, pad_id: int | None = None) -> jax.Array:
  """bool [B, L]: the tokens up to and including EOT (`eot_id` set); legacy: ids ≠ pad_id (0 when None)."""
  ids = jnp.asarray(ids)
  if eot_id is None:
    return ids != (LEGACY_PAD_ID if pad_id is None else pad_id)
  pos = jnp.arange(ids.shape[-1])[None, :]
  return pos <= eot_positions(ids, eot_id)[:, None]


def word_tokens(ids: jax.Array, *, sot_id: int | None = None, eot_id: int | None = None,
                pad_id: int | None = None) -> jax.Array:
  """bool [B, L]: the words of each row — no SOT, no EOT, no padding (module docstring). A row may have none."""
  ids = jnp.asarray(ids)
  pos = jnp.arange(ids.shape[-1])[None, :]
  eot = eot_positions(ids, eot_id)[:, None]
  if eot_id is None:  # legacy: EOT the largest id, padding `pad_id` (0), SOT at position 0 unless `sot_id` is given
    words = valid_tokens(ids, pad_id=pad_id) & (pos != eot)
    sot = (pos == 0) if sot_id is None else (ids == sot_id)
  else:
    words = pos < eot
    sot = (ids == sot_id) if sot_id is not None else jnp.zeros_like(words)
  return words & ~sot


def text_token_mask(ids: jax.Array, *, sot_id: int | None = None, eot_id: int | None = None,
                    pad_id: int | None = None) -> jax.Array:
  """bool [B, L]: the tokens FILIP's token-wise similarity uses (Yao et al. 2021, drop padding, SOT and EOT) =
  `word_tokens`; a row with no word keeps its EOT, so every text has at least one token."""
  mask = word_tokens(ids, sot_id=sot_id, eot_id=eot_id, pad_id=pad_id)
  pos = jnp.arange(mask.shape[-1])[None, :]
  eot = eot_positions(ids, eot_id)[:, None]
  return mask | (~jnp.any(mask, axis=1, keepdims=True) & (pos == eot))


def layout_of(module) -> dict:
  """{'sot_id', 'eot_id', 'pad_id'} of a text encoder (None for an attribute it lacks)."""
  return {k: getattr(module, k, None) for k in ("sot_id", "eot_id", "pad_id")}


def special_ids(vocab_size: int, *, sot_id: int | None = None, eot_id: int | None = None,
                pad_id: int | None = None) -> tuple[int, ...]:
  """Sorted ids that are never a word: SOT, EOT, pad; with `eot_id` None the legacy pad 0 and EOT vocab_size − 1."""
  if eot_id is None:
    eot_id, pad_id = vocab_size - 1, LEGACY_PAD_ID if pad_id is None else pad_id
  return tuple(sorted({int(i) for i in (sot_id, eot_id, pad_id) if i is not None}))
