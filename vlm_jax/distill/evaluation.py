"""Detection evaluation of a distillation student: `vlm_jax.evaluate.detection` on the evaluation view.

Every evaluator of `config.evals` has kind 'detection' (`vlm_jax.evaluate.detection`: COCO AP, AP50, AP75,
AP_base / AP50_base, AP_novel / AP50_novel and APr = AP_novel — the analogue of LVIS' rare-class AP that the
published anchors report, ViLD R50 16.1 and OWL-ViT B/16 17.1 —, plots/detections.png, COCO JSON). It calls the
student's `detect` (`models.detection.open_vocab.OpenVocabDetector.detect`: every test-vocabulary class, novel
ones included). On synthetic scenes `python -m vlm_jax.evaluate --config=configs/eval/detection.py` reproduces
these numbers from the run directory.

Synthetic scenes go through the shared evaluator unchanged (held-out 'val' scenes, eval view, with the teacher's
mean/std from `config.data`). COCO-format data (`data.coco_eval`, else `data.coco`) is read by
`data.CocoDetection` in its eval view and scored by the same `evaluate_detector`, with the split's base / novel
class groups.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from vlm_jax import config_lib
from vlm_jax.errors import UserError

_COCO_OPTIONS = {"kind": "detection", "num_images": 0, "batch_size": 32, "max_dets": 100, "plots": True,
                 "coco_json": True}


def _coco_evaluator(cfg, *, model, source, mean, std, plot_dir: str | None) -> Callable:
  import jax  # noqa: PLC0415

  from vlm_jax.data import transforms  # noqa: PLC0415
  from vlm_jax.evaluate import detection  # noqa: PLC0415
  o = {**_COCO_OPTIONS, **config_lib.plain(cfg)}
  unknown = sorted(set(o) - set(_COCO_OPTIONS))
  if unknown:
    raise UserError(f"unknown option(s) {unknown} for a COCO 'detection' evaluator; valid: {sorted(_COCO_OPTIONS)}")
  detect = jax.jit(lambda v, x: model.apply(v, x, method="detect"))
  main = jax.process_index() == 0
  groups = {"base": np.nonzero(~source.novel)[0].tolist(), "novel": np.nonzero(source.novel)[0].tolist()}
  cache: dict = {}

  def run(variables) -> dict:
    if "data" not in cache:
      n = int(o["num_images"]) or len(source)
      els = [source[i] for i in range(min(n, len(source)))]
      images = np.stack([e["image"] for e in els])
      classes = np.stack([e["classes"] for e in els])
      cache["data"] = (images, transforms.normalize(images, tuple(mean), tuple(std)),
                       {"boxes": np.stack([e["boxes"] for e in els]), "classes": classes, "valid": classes >= 0})
    uint8, images, gt = cache["data"]
    plot = os.path.join(plot_dir, "detections.png") if plot_dir and o["plots"] and main else None
    js = os.path.join(os.path.dirname(plot_dir), "detections_coco.json") if plot_dir and o["coco_json"] and main \
        else None
    return detection.evaluate_detector(lambda x: jax.device_get(detect(variables, x)), images, gt,
                                       batch_size=int(o["batch_size"]), class_groups=groups,
                                       max_dets=int(o["max_dets"]), images_uint8=uint8,
                                       class_names=source.names, plot_path=plot, json_path=js)

  return run


def make_evaluators(config, *, model, source, plot_dir: str | None) -> dict[str, Callable]:
  """{name: fn(variables) -> metrics} for `config.evals` (all of kind 'detection')."""
  from vlm_jax import evaluate  # noqa: PLC0415
  evals = config_lib.plain(config.get("evals"))
  for name, cfg in evals.items():
    if cfg.get("kind", name) != "detection":
      raise UserError(f"distillation evaluators are of kind 'detection'; evals.{name} has kind {cfg.get('kind')!r}")
  if not config.data.get("coco"):
    return evaluate.make_evaluators(evals, model=model, tokenizer=None, data_config=config_lib.plain(config.data),
                                    plot_dir=plot_dir)
  return {name: _prefixed(_coco_evaluator(cfg, model=model, source=source, mean=config.data.mean,
                                          std=config.data.std, plot_dir=plot_dir), name)
          for name, cfg in evals.items()}


def _prefixed(fn: Callable, name: str) -> Callable:
  def run(variables) -> dict:
    return {f"{name}/{k.split('/', 1)[-1]}": v for k, v in fn(variables).items()}
  return run
