"""Masked image modelling objectives over outputs['mim'] = {'pred', 'target', 'mask'} (1 = masked patch).

- 'mae' (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377): mean squared
  error on the masked patches only,

      L_MAE = Σ_{b,n} m_bn · (1/D) Σ_d (ŷ_bnd − y_bnd)²  /  Σ_{b,n} m_bn

  with y the (per-patch normalised) pixels. The survey's L_MIM; FLAVA's image part uses the same loss.
- 'mim_feature' (EVA, Fang et al. 2022, arXiv:2211.07636; MVP, Wei et al. 2022): regression of a frozen
  teacher's patch features on the masked patches, by negative cosine similarity (EVA)

      L_feat = Σ_{b,n} m_bn · (1 − cos(ŷ_bn, y_bn)) / Σ_{b,n} m_bn                (distance='cosine')

  (EVA's −cos shifted by the constant 1, so the loss is ≥ 0; same gradient), or the mean squared error of
  L2-normalised features (distance='mse'; MVP and MaskDistill-style; equal to 2·L_feat).

Inputs are global arrays: inside `jit` the sums run over the whole global batch whatever the sharding, so no
`mesh_axes` handling is needed (the argument is accepted for the objective signature).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.objectives.reconstruction import masked_mse

DISTANCES = ("cosine", "mse")


def _mim(outputs: dict, key: str, name: str) -> dict:
  if key not in outputs:
    raise UserError(f"objective {name!r} needs outputs[{key!r}] (a masked-image model, e.g. framework 'mae'); "
                    f"the model gave {sorted(outputs)}")
  return outputs[key]


def mae_loss(outputs, batch, *, mesh_axes=None, key: str = "mim"):
  """L_MAE (module docstring) over outputs[key]; metrics 'mae/loss' and 'mae/mask_ratio' (masked fraction)."""
  del batch, mesh_axes
  m = _mim(outputs, key, "mae")
  loss = masked_mse(m["pred"], m["target"], m["mask"])
  return loss, {"mae/loss": loss, "mae/mask_ratio": jnp.mean(m["mask"].astype(jnp.float32))}


def _unit(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def mim_feature_loss(outputs, batch, *, mesh_axes=None, key: str = "mim", distance: str = "cosine"):
  """L_feat (module docstring) over outputs[key]; metrics 'mim_feature/loss' and 'mim_feature/cosine' (the
  mean cosine similarity on masked patches)."""
  del batch, mesh_axes
  if distance not in DISTANCES:
    raise UserError(f"mim_feature distance {distance!r} is not one of {list(DISTANCES)}")
  m = _mim(outputs, key, "mim_feature")
  mask = m["mask"].astype(jnp.float32)
  cos = jnp.sum(_unit(m["pred"]) * _unit(m["target"]), axis=-1)
  mean_cos = jnp.sum(cos * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  if distance == "cosine":
    loss = 1.0 - mean_cos
  else:
    loss = masked_mse(_unit(m["pred"]), _unit(m["target"]), mask) * m["pred"].shape[-1]
  return loss, {"mim_feature/loss": loss, "mim_feature/cosine": mean_cos}
