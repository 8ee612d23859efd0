"""LP-FT (Kumar, Raghunathan, Jones, Ma & Liang 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR): first a linear probe on the frozen features, then fine-tune everything from that head.

1. LP: with the image tower frozen at the base θ⁰_img, the head is multinomial logistic regression on the
   features z = f(x; θ⁰_img) (`vlm_jax.evaluate.linear_probe`, the evaluation suite's L-BFGS probe on
   standardised features ẑ = (z − μ)/σ):

     (K, c) = argmin_{K, c} (1/N) Σ_i CE(ẑ_i K + c, y_i) + (λ/2)‖K‖²_F

   one fit per λ of `method.l2_grid`, λ chosen on the k-shot validation split (`linear_probe.select_on`: ties go
   to the stronger λ), never the test split — the `fit` of the linear-probe transfer method (`methods/
   linear_probe.py`), reused as it is.
2. FT: full fine-tuning (`finetune.py`: the image tower and the head, cross-entropy, AdamW with warmup and a
   cosine schedule) from that head. The probe is written into fine-tuning's head, logits = exp(log τ⁻¹)·W z + b,
   exactly: W = (K / σ)ᵀ · τ (σ per feature dimension), b = c − (μ / σ) K. So at step 0 the model is the probe
   (a test checks it), and the features start undistorted by a random head — Kumar et al.'s point.

Results add fit/l2 (the chosen λ) and fit/probe_val_top1. Config (`config.method`): head, l2_grid, steps.
"""

from __future__ import annotations

import jax
import numpy as np

from vlm_jax.transfer.methods import Method, finetune


def probe_head(module: finetune.FineTune, variables: dict, probe: dict) -> dict:
  """Fine-tuning's head {kernel W [C, E], bias b [C]} equal to the fitted probe `probe` = {mu, sd, kernel K,
  bias c} (`methods.linear_probe`): W = (K / σ)ᵀ · τ, b = c − (μ / σ) K (module docstring)."""
  mu, sd, kernel, bias = (np.asarray(probe[k], np.float64) for k in ("mu", "sd", "kernel", "bias"))
  scale = float(jax.jit(lambda v: module.apply(v, method=lambda m: m.base.logit_scale()))(variables))
  w = (kernel / sd[:, None]).T / scale
  b = bias - (mu / sd) @ kernel
  return {"kernel": w.astype(np.float32), "bias": b.astype(np.float32)}


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  from vlm_jax.errors import UserError  # noqa: PLC0415
  from vlm_jax.transfer.methods import linear_probe  # noqa: PLC0415
  kw = dict(base_model=base_model, base_config=base_config, tokenizer=tokenizer, class_names=class_names,
            templates=templates, descriptions=descriptions)
  method = finetune.build(cfg, **kw)
  if method.module.head_mode == "text":
    raise UserError("lp_ft fits a linear head: method.head must be 'learned' or 'frozen', not 'text'")
  probe = linear_probe.build(cfg, **kw)  # step 1: the linear-probe method's fit (λ chosen on validation)

  def fit(variables, train, val) -> dict:
    fitted = probe.fit(variables, train, val)
    return {**fitted, "params": {"head": probe_head(method.module, variables, fitted["params"])}}

  return method._replace(fit=fit)


def check(config) -> None:
  """Preflight: fine-tuning's head / frozen rules and the linear probe's (l2_grid, steps)."""
  from vlm_jax.transfer.methods import linear_probe  # noqa: PLC0415
  finetune.check(config)
  linear_probe.check(config)
