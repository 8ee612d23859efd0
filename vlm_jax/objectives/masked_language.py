"""Masked language modelling (BERT) and FLAVA's masked cross-modal modelling: the losses.

BERT (Devlin et al. 2019, arXiv:1810.04805, §3.1 and appendix A.1): of the real tokens of a text (not padding,
[SOT]/[CLS] or [EOT]/[SEP]) 15 % are selected — round(0.15 · n) per text, at least one, as BERT's
`create_pretraining_data` — and of the selected tokens 80 % are replaced by [MASK], 10 % by a random token and 10 %
left unchanged. The model corrupts its own input (`vlm_jax.models.masking.bert_mask`, with the tokenizer's
SOT/EOT/pad ids) and emits the logits, the original ids and the selected positions; the loss predicts the original
token at the selected positions only (the survey's L_MLM):

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

from vlm_jax.errors import UserError
from vlm_jax.objectives.reconstruction import masked_cross_entropy, masked_mse


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
