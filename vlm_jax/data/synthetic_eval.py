"""Evaluation sets of the procedural dataset beyond the zero-shot splits, rendered once per process and cached.

`retrieval_set`: the first `num_images` scenes of the held-out 'eval_retrieval' split (1–3 objects of seen
  (shape, colour) pairs, drawn like training scenes from their own random stream, so no training image), each
  with `captions_per_image` different captions from the training caption sampler (`SyntheticShapes.captions`,
  rng keyed by (data seed, index)), and multi-hot class targets (multi-label zero-shot).
`probe_sets`: labelled single-object images over ALL classes for the linear probe and few-shot: test = the
  zero-shot test images ('eval_seen' + 'eval_unseen', `pipeline.make_eval_arrays`); train = `train_per_class`
  further images per class, the indices of the same splits that follow the test images.
`labelled_set` / `validation_set`: single-object images of 'eval_seen', 'eval_unseen' or 'val' (all classes,
  disjoint from training and evaluation images: model selection) with their class ids.

Images are normalised like the training input (data.mean / data.std, CLIP's by default); every set also carries
the uint8 pixels ('image_uint8', for augmentation-based methods) with `image == normalize(image_uint8)` exactly.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from vlm_jax.data import pipeline
from vlm_jax.data.transforms import CLIP_MEAN, CLIP_STD, normalize
from vlm_jax.config_lib import plain as _plain
from vlm_jax.errors import UserError


def _key(data_config) -> str:
  return json.dumps(_plain(data_config), sort_keys=True, default=list)


def _normalize(images: np.ndarray, cfg: dict) -> np.ndarray:
  return normalize(images, tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD)))


@functools.lru_cache(maxsize=4)
def _retrieval(key: str, image_size: int, num_images: int, captions_per_image: int) -> dict:
  cfg = json.loads(key)
  sized = {**cfg, "synthetic": {**cfg.get("synthetic", {}), "num_samples": num_images}}
  src = pipeline.make_source(sized, "eval_retrieval", image_size=image_size)
  images, captions = [], []
  multi_hot = np.zeros((num_images, src.n_classes), np.int32)
  for i in range(num_images):
    scene = src.scene(i)
    images.append(src.render(scene, masks=False)["image"])
    captions.append(src.captions(scene, captions_per_image, np.random.default_rng((src.seed, 104729, i))))
    multi_hot[i, list(scene.classes)] = 1
  images = np.stack(images)
  return {"image": _normalize(images, cfg), "image_uint8": images, "captions": captions, "multi_hot": multi_hot}


def retrieval_set(data_config, *, image_size: int, num_images: int = 256, captions_per_image: int = 5) -> dict:
  """{'image' float [N,S,S,3], 'image_uint8' [N,S,S,3], 'captions' [N][K] str, 'multi_hot' int [N, C]}."""
  out = _retrieval(_key(data_config), int(image_size), int(num_images), int(captions_per_image))
  return {k: (v.copy() if isinstance(v, np.ndarray) else [list(c) for c in v]) for k, v in out.items()}


@functools.lru_cache(maxsize=4)
def _probe_train(key: str, image_size: int, train_per_class: int) -> dict:
  cfg = json.loads(key)
  images, labels = [], []
  for split in ("eval_seen", "eval_unseen"):
    test_src = pipeline.make_source(cfg, split, image_size=image_size)
    n_test = len(test_src)
    pool = len(test_src.seen_classes if split == "eval_seen" else test_src.unseen_classes)
    extended = {**cfg, "synthetic": {**cfg.get("synthetic", {}), "num_samples": n_test + train_per_class * pool}}
    src = pipeline.make_source(extended, split, image_size=image_size)
    for i in range(n_test, len(src)):
      scene = src.scene(i)
      images.append(src.render(scene, masks=False)["image"])
      labels.append(scene.classes[0])
  images = np.stack(images)
  return {"image": _normalize(images, cfg), "image_uint8": images, "label": np.asarray(labels, np.int32)}


def probe_sets(data_config, *, image_size: int, train_per_class: int = 16) -> dict:
  """{'train': {'image', 'image_uint8', 'label'}, 'test': {'image', 'image_uint8', 'label'}, 'class_names': [...]}
  over all classes."""
  train = _probe_train(_key(data_config), int(image_size), int(train_per_class))
  test = [labelled_set(data_config, s, image_size=image_size) for s in ("eval_seen", "eval_unseen")]
  return {"train": {k: v.copy() for k, v in train.items()},
          "test": {k: np.concatenate([t[k] for t in test]) for k in ("image", "image_uint8", "label")},
          "class_names": list(pipeline.dataset_info(data_config)["class_names"])}


_LABELLED_SPLITS = ("eval_seen", "eval_unseen", "val")


@functools.lru_cache(maxsize=8)
def _labelled(key: str, split: str, image_size: int, num_images: int | None) -> dict:
  cfg = json.loads(key)
  if num_images is not None:
    cfg = {**cfg, "synthetic": {**cfg.get("synthetic", {}), "num_samples": num_images}}
  src = pipeline.make_source(cfg, split, image_size=image_size)
  scenes = [src.scene(i) for i in range(len(src))]
  images = np.stack([src.render(sc, masks=False)["image"] for sc in scenes])
  return {"image": _normalize(images, cfg), "image_uint8": images,
          "label": np.asarray([sc.classes[0] for sc in scenes], np.int32)}


def labelled_set(data_config, split: str, *, image_size: int, num_images: int | None = None) -> dict:
  """{'image' float [N,S,S,3], 'image_uint8' [N,S,S,3], 'label' int32 [N]}: the first `num_images` (default
  data.synthetic.eval_per_class per class) single-object images of 'eval_seen', 'eval_unseen' or 'val'; image i
  shows the split's class i mod (its number of classes). Cached per process."""
  if split not in _LABELLED_SPLITS:
    raise UserError(f"unknown labelled split {split!r}; use one of {_LABELLED_SPLITS}")
  if num_images is not None and int(num_images) < 1:
    raise UserError(f"num_images must be >= 1, got {num_images}")
  out = _labelled(_key(data_config), split, int(image_size), None if num_images is None else int(num_images))
  return {k: v.copy() for k, v in out.items()}


def validation_set(data_config, *, image_size: int, per_class: int | None = None) -> dict:
  """The 'val' split (all classes, class-balanced, disjoint from training and evaluation images) as
  `labelled_set`: `per_class` images per class (default data.synthetic.eval_per_class)."""
  n = None if per_class is None else int(per_class) * int(pipeline.dataset_info(data_config)["num_classes"])
  return labelled_set(data_config, "val", image_size=image_size, num_images=n)
