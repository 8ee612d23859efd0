"""Segmentation data for distillation: the synthetic open-vocabulary scenes as image + label-map sources.

`SyntheticSegmentation(split, view, …)` wraps `vlm_jax.data.synthetic_scenes.OpenVocabScenes` over the vocabulary of
its 64 class ids (`names`, a `novel` flag, `test_mask` = the 32 base + 16 novel classes that appear). Images and
label maps are read separately, so a method that must not see annotations provably never does:

  image(i)  uint8 [S, S, 3]
  mask(i)   int32 [S, S] label map: 0 = background, class id + 1. 'train' view: base objects only (novel objects
            are present in the pixels and labelled background, as in the detection scenes); 'eval' view: every
            object (base and novel), what the base / novel mIoU are computed on.

Real data: `--config.data.masks=IMAGES:LABELS:CLASSES` replaces the scenes by an image folder + PNG label maps +
class list (`seg_folder`: COCO-Stuff / PASCAL-Context layouts, base / novel split, ignored pixels −1).

`train_iterator` (as detection's `distill.data.train_iterator`, over row indices) batches rows with grain;
its iterator state is checkpointed, so resume is exact.
"""

from __future__ import annotations

import numpy as np

from vlm_jax.errors import UserError


class SyntheticSegmentation:
  """Synthetic scenes as a segmentation source (module docstring)."""

  def __init__(self, split: str, view: str, *, seed: int, image_size: int, num_images: int, objects=(2, 4),
               p_novel: float = 0.35):
    from vlm_jax.data import synthetic_scenes as ss  # noqa: PLC0415
    self.scenes = ss.OpenVocabScenes(split, seed=seed, image_size=image_size, num_samples=num_images, view=view,
                                     objects=tuple(objects), p_novel=p_novel)
    groups = ss.class_split()
    self.names = ss.class_names()
    self.novel = np.isin(np.arange(ss.N_CLASSES), groups["novel"])
    self.test_mask = np.isin(np.arange(ss.N_CLASSES), np.concatenate([groups["base"], groups["novel"]]))

  def __len__(self) -> int:
    return len(self.scenes)

  def image(self, i: int) -> np.ndarray:
    return self.scenes[int(i)]["image"]

  def mask(self, i: int) -> np.ndarray:
    return self.scenes[int(i)]["semantic_mask"].astype(np.int32)

  def images(self, idx) -> np.ndarray:
    return np.stack([self.image(i) for i in idx])

  def masks(self, idx) -> np.ndarray:
    return np.stack([self.mask(i) for i in idx])


def make_source(data_config, view: str):
  """The training ('train' view, split 'train'), evaluation ('eval' view, `data.eval_split`) or support source
  ('support': the training images with every object labelled, where CLIPSeg's visual prompts come from); with
  `data.masks` the image + label-map folder of `seg_folder` instead of the synthetic scenes."""
  d = dict(data_config)
  if d.get("masks"):
    from vlm_jax.distill import seg_folder  # noqa: PLC0415
    return seg_folder.make_source(d, view)
  split = "train" if view in ("train", "support") else d.get("eval_split", "val")
  train_split = view in ("train", "support")
  view = "eval" if view == "support" else view
  return SyntheticSegmentation(split, view, seed=int(d.get("seed", 0)), image_size=int(d["image_size"]),
                               num_images=int(d["num_train"] if train_split else d["num_eval"]),
                               objects=tuple(d.get("objects", (2, 4))), p_novel=float(d.get("p_novel", 0.35)))


def settings(data_config) -> dict:
  """The data settings that decide cached teacher outputs (the cache key's data part; the folder keys only when
  `data.masks` is set, so the synthetic scenes' keys are unchanged)."""
  d = dict(data_config)
  keys = ("image_size", "num_train", "seed", "objects", "p_novel")
  if d.get("masks"):
    keys += ("masks", "eval_masks", "num_eval", "novel_classes")
  return {k: v for k, v in d.items() if k in keys}


def check(data_config) -> None:
  """Preflight of the data part: a `data.masks` / `data.eval_masks` spec names existing folders and a class list."""
  d = dict(data_config)
  if d.get("masks"):
    from vlm_jax.distill import seg_folder  # noqa: PLC0415
    seg_folder.parse(d["masks"])
    if d.get("eval_masks"):
      seg_folder.parse(d["eval_masks"], "data.eval_masks")
  elif d.get("eval_masks"):
    raise UserError("data.eval_masks needs data.masks (the training folder)")


class _Rows:
  """Random-access rows: `make(i)` for index i of the process's share."""

  def __init__(self, indices: np.ndarray, make):
    self.indices, self.make = indices, make

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, j: int) -> dict:
    return self.make(int(self.indices[int(j)]))


def train_iterator(num_images: int, make_row, *, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1):
  """grain iterator over rows `make_row(i)` of images 0..num_images−1 (this process's share), every image once per
  epoch in a seeded random order, batched; `get_state()` / `set_state()` resume exactly."""
  import grain  # noqa: PLC0415
  if global_batch_size % process_count:
    raise UserError(f"batch_size={global_batch_size} is not divisible by the {process_count} processes")
  per_process = global_batch_size // process_count
  mine = np.arange(process_index, int(num_images), process_count)
  if len(mine) < per_process:
    raise UserError(f"{len(mine)} training image(s) per process cannot fill a batch of {per_process}; "
                    "raise data.num_train or lower batch_size")
  ds = (grain.MapDataset.source(_Rows(mine, make_row)).shuffle(seed=int(seed) * 1_000_003 + 17)
        .repeat().batch(per_process, drop_remainder=True))
  return iter(ds.to_iter_dataset())
