"""Region classification by phrase on held-out synthetic scenes: does each box's region feature name its object?

Every ground-truth box of held-out scenes is pooled from the image tokens (RoIAlign, `TwoTower.encode_regions`)
and scored against the 64 class phrases "<colour> <shape>" (`TwoTower.encode_phrases`, the same path as the
training phrases); the box is classified as the highest-scoring phrase — GLIP's use of the grounding scores as a
detector's class logits (Li et al. 2022, arXiv 2112.03857, §3.1), with the boxes given. Metrics:

  top1          accuracy over the boxes of 'eval_retrieval' scenes (1–3 objects of seen classes, unseen images)
  unseen_top1   accuracy on 'eval_unseen' single-object images (held-out (shape, colour) pairs; compositional)
  chance        1 / #classes (1/64)
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from vlm_jax.errors import UserError


def _scenes(src, n: int, mean, std, normalize):
  scenes = [src.scene(i) for i in range(min(n, len(src)))]
  rendered = [src.render(s) for s in scenes]
  images = normalize(np.stack([r["image"] for r in rendered]), mean, std)
  size = float(src.image_size)
  boxes = np.stack([r["boxes"] for r in rendered]) / size  # [M, K, 4] normalised, zeros for padding
  classes = np.stack([r["classes"] for r in rendered])  # [M, K], −1 padding
  return images, boxes.astype(np.float32), classes


def synthetic_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'region_word_synthetic' (metrics in the module docstring). Options: num_images (scenes of
  'eval_retrieval'), unseen (also the held-out classes), phrase_length, batch_size."""
  import jax  # noqa: PLC0415

  from vlm_jax.data import pipeline  # noqa: PLC0415
  from vlm_jax.evaluate import options  # noqa: PLC0415
  del plot_dir
  o = options(cfg, {"num_images": 256, "unseen": True, "phrase_length": 8, "batch_size": 128},
              "region_word_synthetic")
  if not hasattr(model, "encode_regions"):
    raise UserError("region_word_synthetic needs a two-tower model (encode_regions / encode_phrases)")
  size = int(data_config["image_size"])
  mean, std = tuple(data_config.get("mean", pipeline.CLIP_MEAN)), tuple(data_config.get("std", pipeline.CLIP_STD))
  sets = {"top1": _scenes(pipeline.make_source(data_config, "eval_retrieval", image_size=size),
                          int(o["num_images"]), mean, std, pipeline.normalize)}
  if o["unseen"]:
    sets["unseen_top1"] = _scenes(pipeline.make_source(data_config, "eval_unseen", image_size=size), 1 << 30,
                                  mean, std, pipeline.normalize)
  names = pipeline.dataset_info(data_config)["class_names"]
  phrases = tokenizer(list(names), int(o["phrase_length"]))
  bs = int(o["batch_size"])
  regions = jax.jit(lambda v, x, b: model.apply(v, x, b, method="encode_regions"))
  encode_phrases = jax.jit(lambda v, p: model.apply(v, p, method="encode_phrases"))

  def run(variables) -> dict:
    zp = np.asarray(encode_phrases(variables, phrases))  # [C, E]
    out = {}
    for key, (images, boxes, classes) in sets.items():
      hits = []
      for s in range(0, len(images), bs):
        x, b, c = images[s:s + bs], boxes[s:s + bs], classes[s:s + bs]
        n = len(x)
        if n < bs:  # fixed shapes: one compilation
          x = np.concatenate([x, np.repeat(x[-1:], bs - n, 0)])
          b = np.concatenate([b, np.repeat(b[-1:], bs - n, 0)])
        zr = np.asarray(regions(variables, x, b))[:n]  # [n, K, E]
        pred = np.argmax(zr @ zp.T, axis=-1)
        valid = c >= 0
        hits.append((pred == c)[valid])
      out[f"region_word/{key}"] = float(np.mean(np.concatenate(hits)))
    out["region_word/chance"] = 1.0 / len(names)
    return out
  return run
