"""Linear probe on the frozen image features (Radford et al. 2021, CLIP §3.2; the few-shot baseline of CoOp,
Zhou et al. 2022, and of Tip-Adapter / CLIP-Adapter).

Multinomial logistic regression on the standardised frozen image embeddings ẑ = (f(x) − μ) / σ:

  (K, c) = argmin (1/N) Σ_i CE(softmax(ẑ_i K + c), y_i) + (λ/2) ‖K‖²_F,        logits = ẑ K + c

fitted by the evaluation suite's full-batch L-BFGS probe (`vlm_jax.evaluate.linear_probe`: μ, σ of the fitted
rows, one fit per λ of `method.l2_grid`). Training-free in the run's sense (no training loop): `fit` embeds the
k-shot training and validation splits, fits one probe per λ on the training features and keeps the λ with the
best top-1 on the k-shot VALIDATION split (`linear_probe.select_on`: ties → the larger λ; no refit on
train + val), as the few-shot protocol of the evaluation suite. The classifier is class-specific: base-to-novel
reports no novel score. Results add fit/l2 (the chosen λ) and fit/probe_val_top1.

Config (`config.method`): l2_grid, steps (L-BFGS iterations at most).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method, frozen_features
from vlm_jax.transfer.methods import prompting as pr
from vlm_jax.transfer.methods.zeroshot import zero_loss


class LinearProbe(nn.Module):
  """logits = ((f(x) − μ) / σ) K + c on the frozen image embedding f(x) (module docstring)."""
  base: nn.Module
  n_classes: int

  @nn.compact
  def classify(self, images):
    z = pr.image_embeddings(self.base, images)
    e = z.shape[-1]
    mu = self.param("mu", nn.initializers.zeros, (e,), jnp.float32)
    sd = self.param("sd", nn.initializers.ones, (e,), jnp.float32)
    kernel = self.param("kernel", nn.initializers.zeros, (e, self.n_classes), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.n_classes,), jnp.float32)
    return ((z - mu) / sd) @ kernel + bias

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def check(config) -> None:
  """Preflight of `config.method` (a non-empty grid of λ ≥ 0, steps ≥ 1)."""
  grid = tuple(config.method.get("l2_grid", ()) or ())
  if not grid or any(float(x) < 0 for x in grid):
    raise UserError(f"method.l2_grid={grid!r}: give one or more L2 strengths λ ≥ 0")
  if int(config.method.get("steps", 1)) < 1:
    raise UserError(f"method.steps={config.method.get('steps')!r} must be ≥ 1")


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config, tokenizer, templates, descriptions
  from vlm_jax.evaluate import linear_probe as probe  # noqa: PLC0415
  module = LinearProbe(base_model, len(class_names))
  l2_grid = tuple(float(x) for x in (cfg.get("l2_grid", probe.L2_GRID) or probe.L2_GRID))
  steps = int(cfg.get("steps", probe.STEPS))

  def fit(variables, train, val):
    """The probe on the k-shot training features, λ chosen on the validation features."""
    ztr = frozen_features.embed(base_model, variables, train.images)
    zva = frozen_features.embed(base_model, variables, val.images)
    sel = probe.select_on(ztr, np.asarray(train.labels), zva, np.asarray(val.labels), len(class_names),
                          l2_grid=l2_grid, steps=steps)
    p = sel.probe
    params = {"mu": p.mu[0], "sd": p.sd[0], "kernel": p.kernel[0], "bias": p.bias[0]}
    return {"params": {k: np.asarray(v, np.float32) for k, v in params.items()}, "l2": sel.l2,
            "probe_val_top1": float(sel.val_acc.max())}

  return Method(module, zero_loss, pr.classify_fn, fit=fit)
