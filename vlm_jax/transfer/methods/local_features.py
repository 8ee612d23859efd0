"""Local (per-region) image embeddings of the frozen base, for methods that match text to image regions
(DualCoOp's class-specific region aggregation, PLOT's optimal transport).

  'tokens'  the ViT's patch tokens after the final LayerNorm through the image projection, L2-normalised
            (`TwoTower.encode_image_tokens`): for a mean-pooled ('gap') ViT the global embedding is the
            normalised mean of exactly these (the projection is linear), so they are the tower's own local
            features (PLOT's ViT variant uses the patch tokens the same way).
  'dense'   MaskCLIP dense embeddings (`TwoTower.encode_dense`, Zhou et al. 2022): the value path of the last
            attention / attention pool, what DualCoOp and PLOT use on CLIP's ResNets (the attention pool's
            value and output projections applied to every spatial position).
  'auto'    'tokens' for a ViT with 'gap' pooling, else 'dense'.

Either way: [B, R, E] float32, R = the token grid (h·w), gradients stopped (the base is frozen).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError

KINDS = ("auto", "tokens", "dense")


def resolve(kind: str, base_model) -> str:
  """'tokens' or 'dense' for `kind` on this base (see the module docstring)."""
  if kind not in KINDS:
    raise UserError(f"unknown local feature kind {kind!r}; use one of {KINDS}")
  img = getattr(base_model, "img", None)
  is_vit = img is not None and hasattr(img, "num_patches")
  if kind == "auto":
    return "tokens" if is_vit and getattr(img, "pool_type", "") == "gap" else "dense"
  if kind == "tokens" and not is_vit:
    raise UserError("local features 'tokens' need a ViT image tower; use 'dense' (MaskCLIP) for a ResNet")
  return kind


def local_embeddings(base: nn.Module, images: jax.Array, kind: str) -> jax.Array:
  """L2-normalised region embeddings [B, R, E] of the frozen base ('tokens' | 'dense', already resolved)."""
  if kind == "tokens":
    z = base.encode_image_tokens(images, train=False)
  else:
    z = base.encode_dense(images, train=False)
    z = z.reshape(z.shape[0], -1, z.shape[-1])
  return jax.lax.stop_gradient(z.astype(jnp.float32))
