"""TaskRes: Task Residual tuning (Yu, Lu, Jin, Chen & Wang 2023, "Task Residual for Tuning Vision-Language
Models", CVPR).

The zero-shot text classifier t (the prior knowledge, frozen) plus a learned, task-specific residual x of the
same shape, scaled by α (TaskRes eq. 2–3):

  t'_c = t_c + α · x_c,          x zero-initialised, learned;    p(y = c | x) = softmax_c(s · cos(f(x), t'_c))

with f the frozen image embedding and s the base's logit scale; the image and text features are normalised
before the cosine, as the reference code does. t_c is the prompt-ensemble mean of class c (the mean of its
prompts' normalised text embeddings; the reference averages its templates' raw text features). It is computed as
t'_c ∝ S_c + α · P_c · x_c with S_c the sum of the P_c prompt embeddings (`unnormalised.text_sums`) —
(S_c + α P_c x_c) / P_c = t_c + α x_c, the same direction — so that x = 0 is zero-shot CLIP bit for bit. Only x
is trained (cross-entropy, the one training loop). The reference's recipe is Adam, α = 0.5 (1.0 on some
datasets), lr 2e-3 (2e-4 on ImageNet), batch 256.

Config (`config.method`): alpha.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr
from vlm_jax.transfer.methods import unnormalised


class TaskRes(nn.Module):
  """The frozen base, the zero-shot prompts and the residual x [C, E] (module docstring)."""
  base: nn.Module
  handcrafted: pr.HandCrafted
  alpha: float = 0.5

  @nn.compact
  def text_features(self):
    """t' [C, E], normalised (the zero-shot classifier when x = 0)."""
    sums, counts = unnormalised.text_sums(self.base, self.handcrafted)
    x = self.param("residual", nn.initializers.zeros, sums.shape, jnp.float32)
    return unnormalised.normalize_text(sums + (self.alpha * counts)[:, None] * x)

  def classify(self, images):
    return self.base.logit_scale() * pr.image_embeddings(self.base, images) @ self.text_features().T

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def check(config) -> None:
  """Preflight of `config.method.alpha` (a positive scale)."""
  if not float(config.method.get("alpha", 0.5)) > 0.0:
    raise UserError(f"method.alpha={config.method.get('alpha')!r}: TaskRes's residual scale must be > 0")


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config
  hc = pr.make_handcrafted(tokenizer, class_names, templates, descriptions)
  return Method(TaskRes(base_model, hc, alpha=float(cfg.get("alpha", 0.5))), pr.ce_loss, pr.classify_fn)
