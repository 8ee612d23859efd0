"""PLOT: Prompt Learning with Optimal Transport (Chen, Yao, Wang, Xu, Tian, Zhang & Liu 2023, ICLR).

What is learned: N sets of M context vectors (N prompts per class, shared by all classes as CoOp's unified
context); everything of the two-tower base is frozen. Prompt n of class c is t_{n,c} = [V^n_1 … V^n_M CLASS_c .]
with text feature g_{n,c} = g(t_{n,c}) (L2-normalised); an image gives R local features F = {f_r} (L2-normalised,
`local_features`: the ViT's projected patch tokens, or MaskCLIP dense features for a ResNet). For class c:

  C_c[r, n] = 1 − f_rᵀ g_{n,c}                              (cost of matching region r with prompt n)
  T*_c = argmin_{T ∈ Π(μ, ν)} <T, C_c> − λ H(T),  μ = 1_R / R,  ν = 1_N / N     (Sinkhorn, `sinkhorn.py`)
  d_OT(c) = <T*_c, C_c>
  p(y = c | x) = exp((1 − d_OT(c)) / τ) / Σ_j exp((1 − d_OT(j)) / τ)                  (PLOT eq. 6–8)

trained with cross-entropy; as in the paper, T* is computed without gradient (the two-stage optimisation: the
inner Sinkhorn fixes the plan, the outer step differentiates the cost), λ = 0.1, 100 iterations. The context is
initialised N(0, 0.02²) (`method.init = ''`), or from a phrase's embeddings plus N(0, init_std²) noise so the N
prompts differ (identical prompts would receive identical gradients and never separate). Paper: N = 4, M = 16,
SGD lr 2e-3 as CoOp.

Config (`config.method`): n_prompts (N); as CoOp's (`coop.prompt_options`): n_ctx (M), position, init (phrase or
''), init_std; eps (λ), iterations, local
('auto' | 'tokens' | 'dense').
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method, local_features, sinkhorn
from vlm_jax.transfer.methods import prompting as pr
from vlm_jax.transfer.methods.coop import prompt_options


class PLOT(nn.Module):
  """The frozen base `base` and the learned context `ctx` [N, M, D] (see the module docstring)."""
  base: nn.Module
  prompt: pr.PromptText
  n_prompts: int
  local: str = "tokens"
  init_phrase: tuple | None = None
  init_std: float = 0.02
  eps: float = 0.1
  iterations: int = 100

  def setup(self):
    self.ctx = self.param("ctx", nn.initializers.normal(self.init_std),
                          (self.n_prompts, self.prompt.n_ctx, self.base.txt.width), jnp.float32)

  def text_features(self):
    """L2-normalised g_{n,c} [N, C, E]."""
    ctx = pr.context_value(self.base, self.ctx, self.init_phrase)  # the phrase (if any) added to every set
    return pr.encode_prompt_sets(self.base, self.prompt, ctx)

  def ot_distance(self, images):
    """d_OT [B, C] between each image's local features and each class's N prompts."""
    f = local_features.local_embeddings(self.base, images, self.local)  # [B, R, E]
    g = self.text_features()  # [N, C, E]
    cost = 1.0 - jnp.einsum("bre,nce->bcrn", f, g)
    return sinkhorn.distance(cost, eps=self.eps, iterations=self.iterations)

  def classify(self, images):
    """logits [B, C] = exp(log τ⁻¹) · (1 − d_OT(c))."""
    return self.base.logit_scale() * (1.0 - self.ot_distance(images))

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config, templates, descriptions
  opts = prompt_options(cfg, tokenizer, class_names)
  if opts["class_specific"]:
    raise UserError("PLOT's N prompts are shared by all classes here (method.class_specific=False)")
  n_prompts = int(cfg.get("n_prompts", 4))
  if n_prompts < 1:
    raise UserError(f"PLOT needs n_prompts >= 1, got {n_prompts}")
  local = local_features.resolve(str(cfg.get("local", "auto")), base_model)
  module = PLOT(base_model, opts["prompt"], n_prompts, local, opts["init_phrase"], opts["init_std"],
                float(cfg.get("eps", 0.1)), int(cfg.get("iterations", 100)))
  return Method(module, pr.ce_loss, pr.classify_fn)
