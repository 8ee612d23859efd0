"""CLIP-Adapter (Gao, Geng, Zhang, Ma, Fang, Zhang, Li & Qiao 2021/2024, "CLIP-Adapter: Better Vision-Language
Models with Feature Adapters", IJCV).

A bottleneck adapter, c → c/4 → c with a ReLU and no bias (`Bottleneck`, Gao et al. eq. 1),

  A(f) = ReLU(f W₁) W₂,        W₁ ∈ R^{c × c/4},  W₂ ∈ R^{c/4 × c}

is added as a residual to the frozen features and the result is normalised (eq. 2–3):

  f* = r · A_v(f) + (1 − r) · f          (image side)      W* = r · A_t(W) + (1 − r) · W       (text side)
  p(y = c | x) = softmax_c(s · cos(f*, W*_c))

with s the base's logit scale. `method.side` picks 'image' (the paper's best setting), 'text' or 'both'. Only
the adapter is trained (cross-entropy, the one training loop); the two towers stay frozen. f is the projected
image feature before CLIP's normalisation (`unnormalised.image_features`, as the reference code) and W the
class sums of the normalised prompt embeddings (`unnormalised.text_sums`, the prompt ensemble). A is positively
homogeneous (A(λx) = λA(x) for λ > 0), so adapting f or f/‖f‖, the sum or the mean of the prompts, gives the
same direction: the normalised result does not depend on that choice. r = 0 is zero-shot CLIP bit for bit.
The reference code puts a second ReLU after W₂; here A is the paper's equation.

The residual ratio r (`params['ratio']`, never trained: its gradient is stopped): the adapter trains at
`method.ratio` (the paper's 0.2); after training the run chooses r on the k-shot VALIDATION split among
`method.ratio_grid` (`candidates`, ties → the training ratio, then the grid order) — the trained adapter is not
retrained per r, its output is blended at the chosen ratio. The grid holds r = 0, so a harmful adapter falls back
to zero-shot CLIP; `ratio_grid = ()` keeps the training ratio. results.json records 'ratio' and every
candidate's validation and test score ('candidates').

Config (`config.method`): side, reduction (4), ratio, ratio_grid.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr
from vlm_jax.transfer.methods import unnormalised

SIDES = ("image", "text", "both")


class Bottleneck(nn.Module):
  """A(x) = ReLU(x W₁) W₂: c → c / reduction → c, no bias."""
  reduction: int = 4

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = nn.relu(nn.Dense(max(1, c // self.reduction), use_bias=False, name="down")(x))
    return nn.Dense(c, use_bias=False, name="up")(h)


class CLIPAdapter(nn.Module):
  """The frozen base, the zero-shot prompts, the adapter(s) and the residual ratio (module docstring)."""
  base: nn.Module
  handcrafted: pr.HandCrafted
  side: str = "image"
  reduction: int = 4
  ratio: float = 0.2

  def setup(self):
    if self.side in ("image", "both"):
      self.image_adapter = Bottleneck(self.reduction)
    if self.side in ("text", "both"):
      self.text_adapter = Bottleneck(self.reduction)
    self.r = self.param("ratio", nn.initializers.constant(self.ratio), (), jnp.float32)

  def text_features(self):
    """W* [C, E] normalised (the zero-shot classifier when r = 0 or side = 'image')."""
    w, _ = unnormalised.text_sums(self.base, self.handcrafted)
    if self.side in ("text", "both"):
      r = jax.lax.stop_gradient(self.r)
      w = r * self.text_adapter(w) + (1.0 - r) * w
    return unnormalised.normalize_text(w)

  def image_features(self, images):
    """f* [B, E] normalised (the zero-shot image embedding when r = 0 or side = 'text')."""
    f = unnormalised.image_features(self.base, images)
    if self.side in ("image", "both"):
      r = jax.lax.stop_gradient(self.r)
      f = r * self.image_adapter(f) + (1.0 - r) * f
    return unnormalised.normalize_image(f)

  def classify(self, images):
    return self.base.logit_scale() * self.image_features(images) @ self.text_features().T

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def ratio_candidates(trained_ratio: float, grid) -> list[float]:
  """The ratios to choose from on validation: the training ratio first (ties keep it), then the grid."""
  out = [float(trained_ratio)]
  out += [float(r) for r in grid if float(r) not in out]
  return out


def check(config) -> None:
  """Preflight of `config.method` (side, reduction, ratio and grid in [0, 1])."""
  m = config.method
  if m.get("side", "image") not in SIDES:
    raise UserError(f"method.side={m.get('side')!r}: use one of {SIDES}")
  if int(m.get("reduction", 4)) < 1:
    raise UserError(f"method.reduction={m.get('reduction')!r} must be ≥ 1")
  for r in (m.get("ratio", 0.2), *tuple(m.get("ratio_grid", ()) or ())):
    if not 0.0 <= float(r) <= 1.0:
      raise UserError(f"CLIP-Adapter's residual ratio {r!r} must lie in [0, 1] (method.ratio, method.ratio_grid)")


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config
  hc = pr.make_handcrafted(tokenizer, class_names, templates, descriptions)
  side = str(cfg.get("side", "image"))
  if side not in SIDES:
    raise UserError(f"method.side={side!r}: use one of {SIDES}")
  module = CLIPAdapter(base_model, hc, side=side, reduction=int(cfg.get("reduction", 4)),
                       ratio=float(cfg.get("ratio", 0.2)))
  ratios = ratio_candidates(module.ratio, tuple(cfg.get("ratio_grid", ()) or ()))

  def candidates(base_variables, trained):
    """The trained adapter at each residual ratio; the run keeps the best on validation."""
    del base_variables
    return [({"ratio": r}, {**trained, "params": {**trained["params"], "ratio": jnp.asarray(r, jnp.float32)}})
            for r in ratios]

  return Method(module, pr.ce_loss, pr.classify_fn, candidates=candidates)
