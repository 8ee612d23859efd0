"""Evaluators, chosen and scheduled by config.

`config.evals = {'<name>': {'kind': 'zeroshot_synthetic', …}}`; `make_evaluators` turns it into
`{name: fn(variables) -> {metric: value}}` for the training loop (run every `eval_every_steps` and at the end)
and for the standalone entry point (`python -m vlm_jax.evaluate`). Every metric key is `<name>/<metric>`: the
evaluator's own prefix is replaced by its name in the config, so two zero-shot evaluators on different data
report `imagenet/top1` and `cifar10/top1`. Embeddings are computed batched and sharded over the mesh
(`embed.py`).

A kind maps to a builder `builder(cfg, *, model, tokenizer, data_config, plot_dir) -> fn(variables) -> dict`;
`plot_dir` is None (no plots) or the run's `plots/` directory, written by process 0 only. Builders are imported
on first use, so a run pays (imports, data rendering) only for the evaluators it configures.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

from vlm_jax import config_lib
from vlm_jax.errors import UserError


def _lazy(module: str, attr: str) -> Callable:
  """The builder `vlm_jax.evaluate.<module>.<attr>`, imported when first called."""

  def build(cfg, **kwargs):
    return getattr(importlib.import_module(f"vlm_jax.evaluate.{module}"), attr)(cfg, **kwargs)

  build.__name__ = f"{module}.{attr}"
  return build


KINDS = {
    "zeroshot_synthetic": _lazy("zeroshot", "synthetic_evaluator"),
    "retrieval_synthetic": _lazy("retrieval", "synthetic_evaluator"),
    "retrieval_jsonl": _lazy("retrieval", "jsonl_evaluator"),
    "linear_probe_synthetic": _lazy("linear_probe", "synthetic_evaluator"),
    "fewshot_synthetic": _lazy("linear_probe", "fewshot_synthetic_evaluator"),
    "segmentation_synthetic": _lazy("segmentation", "synthetic_evaluator"),
    "zeroshot": _lazy("datasets", "zeroshot_evaluator"),
    "linear_probe": _lazy("datasets", "linear_probe_evaluator"),
    "fewshot": _lazy("datasets", "fewshot_evaluator"),
    "retrieval_shards": _lazy("datasets", "retrieval_shards_evaluator"),
    "captioning_synthetic": _lazy("captioning", "synthetic_evaluator"),
    "reconstruction_synthetic": _lazy("reconstruction", "synthetic_evaluator"),
    "itm_rerank_synthetic": _lazy("itm_rerank", "synthetic_evaluator"),
    "filip_maps_synthetic": _lazy("filip_maps", "synthetic_evaluator"),
    "region_word_synthetic": _lazy("region_word", "synthetic_evaluator"),
    "detection": _lazy("detection", "detection_evaluator"),
}


def options(cfg: Mapping | None, defaults: Mapping[str, Any], where: str) -> dict:
  """An evaluator's options: `defaults` updated by `cfg` (minus 'kind'); unknown keys raise `UserError`."""
  cfg = config_lib.plain(cfg)
  cfg.pop("kind", None)
  unknown = sorted(set(cfg) - set(defaults))
  if unknown:
    raise UserError(f"unknown option(s) {unknown} for {where}; valid: {sorted(defaults)}")
  return {**defaults, **cfg}


def _renamed(fn: Callable, name: str) -> Callable:
  """`fn` with every metric key's first path segment replaced by the evaluator's name."""

  def run(variables) -> dict:
    return {f"{name}/{k.split('/', 1)[-1]}": v for k, v in fn(variables).items()}

  return run


def make_evaluators(evals_config, *, model, tokenizer, data_config,
                    plot_dir: str | None = None) -> dict[str, Callable]:
  """{name: fn(variables) -> {'<name>/<metric>': value}} for the evaluators of `evals_config`."""
  out = {}
  for name, cfg in (evals_config or {}).items():
    kind = cfg.get("kind", name)
    if kind not in KINDS:
      raise UserError(f"unknown evaluator kind {kind!r} for evals.{name}; available: {sorted(KINDS)}")
    fn = KINDS[kind](cfg, model=model, tokenizer=tokenizer, data_config=data_config, plot_dir=plot_dir)
    out[name] = _renamed(fn, name)
  return out
