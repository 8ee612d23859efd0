"""The frozen features before their L2 normalisation, for methods that add a residual and normalise after
(CLIP-Adapter, TaskRes), so that a zero residual is zero-shot CLIP bit for bit.

- `image_features(base, images)` u [B, E]: the image tower's pooled feature through the image projection —
  `TwoTower.encode_image(x)` is exactly `two_tower.l2_normalize(u)` (`normalize_image`).
- `text_sums(base, handcrafted)` (S [C, E], P [C]): per class, the sum of its hand-crafted prompts' normalised
  text embeddings and their count — `prompting.handcrafted_weights` (the zero-shot classifier) is exactly
  `prompting.l2_normalize(S)` (`normalize_text`); S / P is the prompt-ensemble mean.

Gradients are stopped: the base is frozen.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.two_tower import l2_normalize as normalize_image  # noqa: F401 (what encode_image applies)
from vlm_jax.transfer.methods.prompting import HandCrafted
from vlm_jax.transfer.methods.prompting import l2_normalize as normalize_text  # noqa: F401 (handcrafted_weights')


def image_features(base: nn.Module, images: jax.Array) -> jax.Array:
  """u [B, E]: the projected pooled image feature, before `encode_image`'s normalisation (BatchNorm frozen)."""
  enc = base.img(images, train=False)
  u = base.img_proj(enc["pooled"]) if base.project_image else enc["pooled"]
  return jax.lax.stop_gradient(u.astype(jnp.float32))


def text_sums(base: nn.Module, hc: HandCrafted) -> tuple[jax.Array, jax.Array]:
  """(S [C, E], P [C]): per class the sum of its prompts' normalised text embeddings, and the prompt count."""
  z = base.encode_text(jnp.asarray(hc.ids, jnp.int32), train=False)
  owner = jnp.asarray(hc.owner, jnp.int32)
  sums = jax.ops.segment_sum(z, owner, num_segments=hc.n_classes)
  counts = jax.ops.segment_sum(jnp.ones_like(owner, jnp.float32), owner, num_segments=hc.n_classes)
  return jax.lax.stop_gradient(sums), counts
