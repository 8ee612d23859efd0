"""The captioning objective of CoCa and CapPa: masked next-token cross-entropy over outputs['caption'].

  L_cap = Σ_{b,l} m_bl · −log p_θ(y_bl | y_b,<l, image_b) / Σ_{b,l} m_bl

(CoCa, Yu et al. 2022, eq. 3: L_Cap = −Σ_t log P_θ(y_t | y_<t, x); CapPa, Tschannen et al. 2023: the same loss,
with parallel-prediction examples conditioning on [MASK] inputs instead of y_<t.) y = text[:, 1:] (the token after
each input position), m = 1 on non-padding targets (the words and EOT). The sums run over the global batch
(inside `jit` every array is global), so the value does not depend on the sharding.
"""

from __future__ import annotations

from vlm_jax.objectives.reconstruction import masked_cross_entropy


def captioning_loss(outputs, batch, *, mesh_axes=None, label_smoothing: float = 0.0):
  """(L_cap, {'captioning/loss', 'captioning/accuracy'}) from outputs['caption'] = {'logits' [B,L,V],
  'targets' int [B,L], 'mask' [B,L]}; `label_smoothing` ε mixes ε/V into the targets. `batch` and `mesh_axes`
  are unused (the targets travel in the outputs; no shard_map)."""
  del batch, mesh_axes
  cap = outputs["caption"]
  loss, accuracy = masked_cross_entropy(cap["logits"], cap["targets"], cap["mask"], label_smoothing)
  return loss, {"captioning/loss": loss, "captioning/accuracy": accuracy}
