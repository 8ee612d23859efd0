"""Objective registry and the weighted combination the training loop calls.

`OBJECTIVES` maps a config name to a pure `loss_fn(outputs, batch, *, mesh_axes=None, **hparams)
-> (scalar, metrics)`. A run picks and weights objectives in config data, e.g.
`config.objectives = {'clip': 1.0, 'simclr': 0.5}` (SLIP) with per-objective keyword arguments in
`config.objective_hparams = {'simclr': {'temperature': 0.1}}`; `make_loss_fn` turns that into one
`fn(outputs, batch) -> (loss, metrics)`, so a single training loop serves every objective family.

'clip', 'siglip', 'unicl' and 'filip' take `impl='dense'` (the B/n × B logits, the default) or `impl='ring'`
(memory linear in B; its `tile` hyper-parameter is the rows per logits tile), e.g.
`config.objective_hparams = {'clip': {'impl': 'ring', 'tile': 256}}`. Each ring variant lives beside its dense
twin (`contrastive`, `filip`); the switch between them is written once, `ring.dense_or_ring`.

Generative and alignment objectives live in their own modules and are imported on first use (a registry value
'module:function'): masked image modelling ('mae', 'mim_feature'), masked language / cross-modal modelling
('mlm', 'mcm'), captioning ('captioning': CoCa/CapPa), image-text matching ('itm'), FILIP ('filip'),
region-word alignment ('region_word') and knowledge distillation from a frozen teacher's image-text logits
('clip_kd', open_clip's DistillClipLoss; the teacher's outputs come in the batch, `vlm_jax.distill.classification`).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping, Sequence

from vlm_jax.errors import UserError
from vlm_jax.objectives.contrastive import clip_loss, siglip_loss, simclr_loss, unicl_loss

OBJECTIVES: dict[str, Callable[..., Any]] = {
    "clip": clip_loss,
    "siglip": siglip_loss,
    "unicl": unicl_loss,
    "simclr": simclr_loss,
    "mae": "vlm_jax.objectives.masked_image:mae_loss",
    "mim_feature": "vlm_jax.objectives.masked_image:mim_feature_loss",
    "mlm": "vlm_jax.objectives.masked_language:mlm_loss",
    "mcm": "vlm_jax.objectives.masked_language:mcm_loss",
    "captioning": "vlm_jax.objectives.captioning:captioning_loss",
    "itm": "vlm_jax.objectives.matching:itm_loss",
    "filip": "vlm_jax.objectives.filip:filip_loss",
    "region_word": "vlm_jax.objectives.region_word:region_word_loss",
    "clip_kd": "vlm_jax.objectives.distillation:clip_kd_loss",
}


def get_objective(name: str) -> Callable[..., Any]:
  """The loss function registered as `name` (importing its module on first use)."""
  fn = OBJECTIVES[name]
  if isinstance(fn, str):
    module, attr = fn.split(":")
    fn = OBJECTIVES[name] = getattr(importlib.import_module(module), attr)
  return fn


def _hparam_names(fn: Callable[..., Any]) -> list[str]:
  params = inspect.signature(fn).parameters.values()
  return [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name != "mesh_axes"]


def make_loss_fn(objectives: Mapping[str, float],
                 hparams: Mapping[str, Mapping[str, Any]] | None = None,
                 mesh_axes: str | Sequence[str] | None = None):
  """Returns `fn(outputs, batch) -> (total, metrics)` with total = Σ_name w_name · loss_name.

  `objectives` maps registry names to weights (a weight of 0 skips the objective); `hparams` maps a name to
  keyword arguments of its loss (e.g. {'simclr': {'temperature': 0.1}}); `mesh_axes` is passed to every
  objective (see `vlm_jax.objectives.contrastive`). `metrics` merges every objective's metrics and adds
  'loss' = total. Unknown names or hyper-parameters raise `UserError` listing the choices.
  """
  choices = sorted(OBJECTIVES)
  weights = {str(name): float(w) for name, w in dict(objectives or {}).items()}
  hparams = {str(name): dict(kw) for name, kw in dict(hparams or {}).items()}
  for name in list(weights) + list(hparams):
    if name not in OBJECTIVES:
      raise UserError(f"unknown objective {name!r}; choose from {choices}")
  for name, kw in hparams.items():
    allowed = _hparam_names(get_objective(name))
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
      raise UserError(f"objective {name!r} has no hyper-parameter(s) {unknown}; it accepts {allowed}")
  active = [(name, w) for name, w in weights.items() if w != 0.0]
  if not active:
    raise UserError(f"no objective has a non-zero weight in {weights}; choose from {choices}")

  def loss_fn(outputs, batch):
    total = 0.0
    metrics = {}
    for name, weight in active:
      loss, m = get_objective(name)(outputs, batch, mesh_axes=mesh_axes, **hparams.get(name, {}))
      total = total + weight * loss
      metrics.update(m)
    metrics["loss"] = total
    return total, metrics

  return loss_fn
