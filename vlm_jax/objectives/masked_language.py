"""Masked language modelling (BERT) and FLAVA's masked cross-modal modelling: the corruption and the losses.

BERT (Devlin et al. 2019, arXiv:1810.04805, §3.1 and appendix A.1): of the real tokens of a text (not padding,
[SOT]/[CLS] or [EOT]/[SEP]) 15 % are selected — round(0.15 · n) per text, at least one, as BERT's
`create_pretraining_data` — and of the selected tokens 80 % are replaced by [MASK], 10 % by a random token and 10 %
left unchanged. The model predicts the original token at the selected positions only (the survey's L_MLM):

  L_MLM = −(1/|M|) Σ_{(b,l)∈M} log p(w_bl | w̃_b),     M the selected positions, w̃ the corrupted text.

FLAVA (Singh et al. 2022, arXiv:2112.04482, §3.2) applies it to its bidirectional text encoder (`mlm_loss` on
outputs['mlm']) and adds masked multimodal modelling (MMM, the survey's L_MCM; `mcm_loss` on outputs['mcm']): image
patches and text tokens are masked together and both are reconstructed from the fused representation:

  L_MCM = w_img · L_img + w_txt · L_txt,
  L_txt = the masked-token cross-entropy above, read from the fusion encoder's text positions,
  L_img = (1/|M_I|) Σ_{(b,n)∈M_I} mean_d (x̂_bnd − x_bnd)²  over the masked patches.

Deviation: FLAVA predicts the masked patches' dVAE codebook tokens (DALL-E tokenizer, as BEiT). This codebase has
no dVAE, so the image part regresses the per-patch normalised pixels of the masked patches instead (MAE, He et al.
2022, "norm_pix_loss"). The [MASK] id is the row the two-leg model adds beyond the tokenizer's vocabulary
(`mask_id = vocab_size`); it is never a target. Reductions use `objectives.reconstruction` over the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.objectives.reconstruction import masked_cross_entropy, masked_mse


def maskable_positions(ids: jax.Array, *, eot_id: int, pad_id: int = 0, skip_first: bool = True) -> jax.Array:
  """bool [B, L]: the real tokens of each row — not `pad_id`, not `eot_id`, not position 0 when `skip_first`
  (the [SOT] of the CLIP row layout, `vlm_jax.data.tokenizers`)."""
  real = (ids != pad_id) & (ids != eot_id)
  if skip_first:
    real = real & (jnp.arange(ids.shape[-1]) > 0)[None]
  return real


def bert_mask(rng: jax.Array, ids: jax.Array, *, mask_id: int, vocab_size: int, ratio: float = 0.15,
              pad_id: int = 0, skip_first: bool = True) -> tuple[jax.Array, jax.Array]:
  """BERT corruption (Devlin et al. 2019): (corrupted ids [B, L], selected bool [B, L]).

  Per row, k = max(1, round(ratio · n)) of the n real tokens (see `maskable_positions`; EOT is `vocab_size − 1`)
  are selected uniformly without replacement (k = 0 for a row without real tokens); a selected token becomes
  `mask_id` with probability 0.8, a uniformly random id in [1, vocab_size − 1) (no pad, no EOT) with 0.1, and stays
  unchanged with 0.1. The loss belongs to every selected position, whatever its replacement.
  """
  if not 0.0 < ratio < 1.0:
    raise UserError(f"mlm mask ratio must be in (0, 1), got {ratio}")
  ids = ids.astype(jnp.int32)
  k_sel, k_kind, k_tok = jax.random.split(rng, 3)
  real = maskable_positions(ids, eot_id=vocab_size - 1, pad_id=pad_id, skip_first=skip_first)
  n = jnp.sum(real, axis=1)
  k = jnp.where(n > 0, jnp.maximum(1, jnp.floor(ratio * n + 0.5)), 0).astype(jnp.int32)
  noise = jnp.where(real, jax.random.uniform(k_sel, ids.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  selected = real & (rank < k[:, None])
  u = jax.random.uniform(k_kind, ids.shape)
  random_ids = jax.random.randint(k_tok, ids.shape, 1, max(vocab_size - 1, 2), dtype=jnp.int32)
  corrupted = jnp.where(selected & (u < 0.8), mask_id, jnp.where(selected & (u >= 0.8) & (u < 0.9), random_ids, ids))
  return corrupted, selected


def _check(outputs, key: str, objective: str, what: str):
  if key not in outputs:
    raise UserError(f"objective {objective!r} needs a model that emits outputs[{key!r}] ({what})")
  return outputs[key]


def mlm_loss(outputs, batch, *, mesh_axes=None):
  """L_MLM (BERT; FLAVA's unimodal MLM): masked-token cross-entropy on outputs['mlm'] = {logits, targets, mask}.

  Metrics: mlm/loss, mlm/accuracy (top-1 over the selected positions). `mesh_axes` is accepted for the common
  signature (global arrays; nothing to constrain).
  """
  del batch, mesh_axes
  o = _check(outputs, "mlm", "mlm", "framework 'two_leg' with 'mlm' in model.tasks")
  ce, acc = masked_cross_entropy(o["logits"], o["targets"], o["mask"])
  return ce, {"mlm/loss": ce, "mlm/accuracy": acc}


def mcm_loss(outputs, batch, *, mesh_axes=None, image_weight: float = 1.0, text_weight: float = 1.0):
  """L_MCM (FLAVA's MMM): image_weight · masked-patch MSE + text_weight · masked-token cross-entropy.

  outputs['mcm'] = {'image': {pred, target, mask}, 'text': {logits, targets, mask}}. Metrics: mcm/loss,
  mcm/image_loss, mcm/text_loss, mcm/text_accuracy.
  """
  del batch, mesh_axes
  o = _check(outputs, "mcm", "mcm", "framework 'two_leg', fusion 'merged', with 'mcm' in model.tasks")
  img, txt = o["image"], o["text"]
  image_loss = masked_mse(img["pred"], img["target"], img["mask"])
  text_loss, text_acc = masked_cross_entropy(txt["logits"], txt["targets"], txt["mask"])
  loss = float(image_weight) * image_loss + float(text_weight) * text_loss
  return loss, {"mcm/loss": loss, "mcm/image_loss": image_loss, "mcm/text_loss": text_loss,
                "mcm/text_accuracy": text_acc}
