"""Zero-shot CLIP (Radford et al. 2021, §3.1.4): the baseline row every transfer method is compared with.

Nothing is learned. Class c's text embedding is the prompt ensemble w_c = normalise(mean_p normalise(g(p)))
over its hand-crafted prompts p (templates filled with the class name, plus CuPL descriptions when given), and

  logits(x) = exp(log τ⁻¹) · f(x)ᵀ w_c        (CLIP's zero-shot classifier)
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr


class ZeroShot(nn.Module):
  base: nn.Module
  handcrafted: pr.HandCrafted

  def classify(self, images):
    z = pr.image_embeddings(self.base, images)
    return self.base.logit_scale() * z @ pr.handcrafted_weights(self.base, self.handcrafted).T

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def zero_loss(outputs, batch):
  del batch
  return jnp.zeros((), jnp.float32) * jnp.sum(outputs["logits"]), {}


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del cfg, base_config
  hc = pr.make_handcrafted(tokenizer, class_names, templates, descriptions)
  return Method(ZeroShot(base_model, hc), zero_loss, pr.classify_fn)
