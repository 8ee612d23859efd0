"""LP-FT (Kumar, Raghunathan, Jones, Ma & Liang 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR): first a linear probe on the frozen features, then fine-tune everything from that head.

1. LP: with the image tower frozen at the base θ⁰_img, the head is multinomial logistic regression on the
   features z = f(x; θ⁰_img) (`vlm_jax.evaluate.linear_probe`, the evaluation suite's L-BFGS probe on
   standardised features ẑ = (z − μ)/σ):

     (K, c) = argmin_{K, c} (1/N) Σ_i CE(ẑ_i K + c, y_i) + (λ/2)‖K‖²_F

   one fit per λ of `method.l2_grid`, λ chosen on the k-shot validation split (`linear_probe.select_on`: ties go
   to the stronger λ), never the test split.
2. FT: full fine-tuning (`finetune.py`: the image tower and the head, cross-entropy, AdamW with warmup and a
   cosine schedule) from that head. The probe is written into fine-tuning's head, logits = exp(log τ⁻¹)·W z + b,
   exactly: W = (K / σ)ᵀ · τ (σ per feature dimension), b = c − (μ / σ) K. So at step 0 the model is the probe
   (a test checks it), and the features start undistorted by a random head — Kumar et al.'s point.

Results add fit/l2 (the chosen λ) and fit/probe_val_top1. Config (`config.method`): head, l2_grid.
"""

from __future__ import annotations

import jax
import numpy as np

from vlm_jax.transfer.methods import Method, finetune


def probe_head(module: finetune.FineTune, variables: dict, train, val, l2_grid, batch_size: int = 256) -> dict:
  """{'params': {'head': {kernel W [C, E], bias b [C]}}, 'l2': λ, 'probe_val_top1': …}: the linear probe on the
  base features of the k-shot train split (λ chosen on `val`), as fine-tuning's head (module docstring)."""
  from vlm_jax.embedding.batched import apply_batched, current_mesh  # noqa: PLC0415
  from vlm_jax.evaluate import linear_probe  # noqa: PLC0415
  embed = jax.jit(lambda v, x: module.apply(v, x, method=finetune.FineTune.features))
  mesh = current_mesh()
  ztr = apply_batched(embed, variables, train.images, batch_size, mesh)
  zva = apply_batched(embed, variables, val.images, batch_size, mesh)
  sel = linear_probe.select_on(ztr, np.asarray(train.labels), zva, np.asarray(val.labels),
                               module.handcrafted.n_classes, l2_grid=tuple(float(x) for x in l2_grid), mesh=mesh)
  mu, sd, kernel, bias = (np.asarray(a[0], np.float64) for a in (sel.probe.mu, sel.probe.sd, sel.probe.kernel,
                                                                  sel.probe.bias))
  scale = float(jax.jit(lambda v: module.apply(v, method=lambda m: m.base.logit_scale()))(variables))
  w = (kernel / sd[:, None]).T / scale
  b = bias - (mu / sd) @ kernel
  return {"params": {"head": {"kernel": w.astype(np.float32), "bias": b.astype(np.float32)}},
          "l2": sel.l2, "probe_val_top1": float(sel.val_acc.max())}


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  from vlm_jax.errors import UserError  # noqa: PLC0415
  from vlm_jax.evaluate.linear_probe import L2_GRID  # noqa: PLC0415
  method = finetune.build(cfg, base_model=base_model, base_config=base_config, tokenizer=tokenizer,
                          class_names=class_names, templates=templates, descriptions=descriptions)
  if method.module.head_mode == "text":
    raise UserError("lp_ft fits a linear head: method.head must be 'learned' or 'frozen', not 'text'")
  l2_grid = tuple(cfg.get("l2_grid", L2_GRID) or L2_GRID)

  def fit(variables, train, val) -> dict:
    return probe_head(method.module, variables, train, val, l2_grid)

  return method._replace(fit=fit)


check = finetune.check  # preflight: the same head / frozen rules as fine-tuning
