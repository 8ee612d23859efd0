"""WiSE-FT: weight-space ensembles for fine-tuning (Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes,
Hajishirzi, Farhadi, Namkoong & Schmidt 2022, "Robust fine-tuning of zero-shot models", CVPR, eq. 1):

  θ(α) = (1 − α) · θ_zeroshot + α · θ_finetuned,        α ∈ {0, 0.1, …, 1} (`method.alphas`)

θ_finetuned is full fine-tuning (`finetune.py`: image tower and head from the zero-shot head, cross-entropy,
AdamW + warmup + cosine; the step kept by validation), θ_zeroshot the same model at its zero-shot point (the
base's image tower, the head W = the prompt-ensemble classifier, b = 0). Every parameter is interpolated (the
frozen ones are equal at both ends); other collections (a ResNet's frozen BatchNorm statistics) are the base's.
θ(0) is zero-shot CLIP, θ(1) the fine-tuned model (tests check both).

The run scores every θ(α) on the k-shot VALIDATION split of the target task and keeps the best α (ties → the
smaller α, the more robust end); the run directory holds that model (`finetune.full_model`). After selection,
each θ(α) is also scored on the target test split and on the shifted task `config.shift_dataset` (same classes,
another distribution): the robustness curve, written to results.json ('candidates': α, val, test, shift top-1)
and `DIR/plots/wise_ft.png` (shift vs target top-1, one point per α). Default pair (configs/transfer/
wise_ft.py): target `shifted_hues` (faded, hue-rotated paint), shift `textured` (the original colours on strongly
textured backgrounds) — the same 64 classes under two different shifts of the pre-training images.

Config (`config.method`): head (as fine-tuning), alphas.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method, finetune

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def interpolate(theta0: dict, theta1: dict, alpha: float) -> dict:
  """θ(α) = (1 − α)·θ0 + α·θ1 over the 'params' collection (same tree structure); the other collections are
  θ1's."""
  a = float(alpha)
  params = jax.tree.map(lambda x, y: ((1.0 - a) * np.asarray(x) + a * np.asarray(y)).astype(np.asarray(x).dtype),
                        jax.device_get(theta0["params"]), jax.device_get(theta1["params"]))
  return {**theta1, "params": params}


def zeroshot_point(module: finetune.FineTune, base_variables: dict) -> dict:
  """θ_zeroshot in the fine-tuning model's parameters: the base, and the zero-shot head (head='text': none)."""
  if module.head_mode == "text":
    return base_variables
  return finetune.with_head(base_variables, finetune.zeroshot_head(module, base_variables))


def candidates_fn(module: finetune.FineTune, alphas):
  """The `candidates` hook: [({'alpha': α}, θ(α))] for every α, from the zero-shot point of the base and the
  selected fine-tuned variables."""

  def candidates(base_variables: dict, finetuned: dict) -> list:
    theta0 = zeroshot_point(module, base_variables)
    return [({"alpha": float(a)}, interpolate(theta0, finetuned, a)) for a in alphas]

  return candidates


def plot(results: dict, workdir: str) -> str | None:
  """`DIR/plots/wise_ft.png`: top-1 on the shifted task against top-1 on the target task for every α (the
  robustness curve), the zero-shot and fine-tuned ends and the α chosen on validation marked. None without a
  shifted task."""
  curve = results.get("candidates") or []
  if not curve or "shift/top1" not in curve[0]:
    return None
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  path = os.path.join(workdir, "plots", "wise_ft.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  x = [100 * c["top1"] for c in curve]
  y = [100 * c["shift/top1"] for c in curve]
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  ax.plot(x, y, "-o", color="tab:blue", label="WiSE-FT θ(α)")
  for c, xi, yi in zip(curve, x, y):
    ax.annotate(f"{c['alpha']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.plot(x[0], y[0], "s", color="tab:green", ms=9, label="zero-shot (α=0)")
  ax.plot(x[-1], y[-1], "^", color="tab:red", ms=9, label="fine-tuned (α=1)")
  chosen = [i for i, c in enumerate(curve) if c["alpha"] == results.get("alpha")]
  if chosen:
    ax.plot(x[chosen[0]], y[chosen[0]], "*", color="black", ms=13, label=f"α chosen on validation "
            f"({results['alpha']:g})")
  ax.set_xlabel(f"target: {results.get('dataset')} test top-1 (%)")
  ax.set_ylabel(f"shift: {results.get('shift_dataset')} test top-1 (%)")
  k = results.get("shots")
  ax.set_title(f"WiSE-FT, {k} shot{'' if k == 1 else 's'}, seed {results.get('seed')}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  method = finetune.build(cfg, base_model=base_model, base_config=base_config, tokenizer=tokenizer,
                          class_names=class_names, templates=templates, descriptions=descriptions)
  alphas = tuple(float(a) for a in (cfg.get("alphas", ALPHAS) or ALPHAS))
  if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
    raise UserError(f"method.alphas must be mixing coefficients in [0, 1], got {alphas}")
  return method._replace(candidates=candidates_fn(method.module, alphas), report=plot)


def check(config) -> None:
  """Preflight: fine-tuning's rules, alphas in [0, 1], and a shifted task for the robustness curve."""
  finetune.check(config)
  alphas = tuple(config.method.get("alphas", ALPHAS) or ())
  if not alphas or any(not 0.0 <= float(a) <= 1.0 for a in alphas):
    raise UserError(f"method.alphas must be a non-empty list of mixing coefficients in [0, 1], got {alphas}")
