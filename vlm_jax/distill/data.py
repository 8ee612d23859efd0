"""Detection data for distillation: synthetic open-vocabulary scenes (default) or a COCO-format JSON + image folder,
fed through a grain pipeline whose iterator state is checkpointed (exact resume).

Sources are random access (`__len__`, `__getitem__` -> {'image' uint8 [S, S, 3], 'boxes' float32 [K, 4] pixels,
'classes' int32 [K] vocabulary index (−1 padding), 'caption' str}), over a vocabulary `names` with a `novel` flag:

  synthetic  `vlm_jax.data.synthetic_scenes.OpenVocabScenes`: vocabulary = its 64 class ids, of which the 32 base
             are trained on and the 32 base + 16 novel scored at test time (`test_mask`; the 16 held-out
             pre-training pairs never appear); 'train' view: base boxes only, novel objects present and unlabelled;
             'eval' view: every object.
  coco       `--config.data.coco=ANNOTATIONS.json:IMAGES_DIR` (eval: `data.coco_eval`, default the same files).
             Images are resized (bilinear, aspect ratio kept, zero-padded bottom/right) to data.image_size; boxes
             scaled alike. Base/novel split `data.coco_split`: 'ovr_cnn' (Zareian et al. 2021, "Open-Vocabulary
             Object Detection Using Captions": 48 base + 17 novel COCO classes, `OVR_CNN_BASE` /
             `OVR_CNN_NOVEL`; the other 15 classes are dropped), or 'all_base'. The 'train' view keeps base
             annotations only (crowd boxes dropped); nothing is downloaded.

`train_iterator` shuffles image indices of this process's share with grain (seeded), maps each index to the
training example (the image normalised with the teacher's mean/std, ground truth, cached proposals and teacher
targets, optional pseudo boxes) and batches; `get_state`/`set_state` make resume exact.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np

from vlm_jax.errors import UserError

OVR_CNN_BASE = ("person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse",
                "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite",
                "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
                "broccoli", "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse",
                "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock", "vase", "toothbrush")
OVR_CNN_NOVEL = ("airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
                 "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors")


class SyntheticDetection:
  """Synthetic scenes as a detection source over the base + novel vocabulary (module docstring)."""

  def __init__(self, split: str, view: str, *, seed: int, image_size: int, num_images: int, objects=(2, 4),
               p_novel: float = 0.35):
    from vlm_jax.data import synthetic_scenes as ss  # noqa: PLC0415
    self.scenes = ss.OpenVocabScenes(split, seed=seed, image_size=image_size, num_samples=num_images, view=view,
                                     objects=tuple(objects), p_novel=p_novel)
    groups = ss.class_split()
    self.names = ss.class_names()  # the vocabulary is every class id (so detections use the scenes' class ids)
    self.novel = np.isin(np.arange(ss.N_CLASSES), groups["novel"])
    self.test_mask = np.isin(np.arange(ss.N_CLASSES), np.concatenate([groups["base"], groups["novel"]]))

  def __len__(self) -> int:
    return len(self.scenes)

  def __getitem__(self, i: int) -> dict:
    el = self.scenes[int(i)]
    return {"image": el["image"], "boxes": el["boxes"].astype(np.float32), "classes": el["classes"],
            "caption": el["caption"]}


def _parse_spec(spec: str) -> tuple[str, str]:
  ann, sep, images = str(spec).partition(":")
  if not sep or not ann or not images:
    raise UserError(f"data.coco must be ANNOTATIONS.json:IMAGES_DIR, got {spec!r}")
  if not os.path.isfile(ann):
    raise UserError(f"COCO annotation file {ann} does not exist")
  if not os.path.isdir(images):
    raise UserError(f"COCO image folder {images} does not exist")
  return ann, images


class CocoDetection:
  """A COCO-format annotation file + image folder as a detection source (module docstring)."""

  def __init__(self, spec: str, view: str, *, image_size: int, split: str = "ovr_cnn", max_boxes: int = 32,
               num_images: int = 0):
    ann_path, self.image_dir = _parse_spec(spec)
    try:
      with open(ann_path) as f:
        ann = json.load(f)
      cats = {int(c["id"]): c["name"] for c in ann["categories"]}
      images = sorted(ann["images"], key=lambda im: im["id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError(f"{ann_path} is not a COCO instances file ({type(e).__name__}: {e})") from None
    if split == "ovr_cnn":
      names, novel = list(OVR_CNN_BASE) + list(OVR_CNN_NOVEL), [False] * 48 + [True] * 17
    elif split == "all_base":
      names, novel = [cats[k] for k in sorted(cats)], [False] * len(cats)
    else:
      raise UserError(f"unknown data.coco_split {split!r}; use 'ovr_cnn' or 'all_base'")
    self.names, self.novel = names, np.asarray(novel)
    self.test_mask = np.ones(len(names), bool)
    index = {n: i for i, n in enumerate(names)}
    self.cat_to_vocab = {k: index.get(v, -1) for k, v in cats.items()}
    self.size, self.max_boxes, self.view = int(image_size), int(max_boxes), view
    self.images = images[:num_images] if num_images else images
    self.coco_ids = [int(im["id"]) for im in self.images]
    self.anns: dict[int, list] = {}
    for a in ann.get("annotations", []):
      self.anns.setdefault(int(a["image_id"]), []).append(a)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict:
    from PIL import Image  # noqa: PLC0415
    im = self.images[int(i)]
    with Image.open(os.path.join(self.image_dir, im["file_name"])) as img:
      img = img.convert("RGB")
      scale = self.size / max(img.size)
      w, h = max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))
      pixels = np.zeros((self.size, self.size, 3), np.uint8)
      pixels[:h, :w] = np.asarray(img.resize((w, h), Image.BILINEAR))
    boxes = np.zeros((self.max_boxes, 4), np.float32)
    classes = np.full((self.max_boxes,), -1, np.int32)
    k = 0
    for a in self.anns.get(int(im["id"]), []):
      c = self.cat_to_vocab.get(int(a["category_id"]), -1)
      if c < 0 or a.get("iscrowd", 0) or k >= self.max_boxes or (self.view == "train" and self.novel[c]):
        continue
      x, y, bw, bh = (float(v) * scale for v in a["bbox"])
      if bw < 1 or bh < 1:
        continue
      boxes[k], classes[k] = (x, y, x + bw, y + bh), c
      k += 1
    return {"image": pixels, "boxes": boxes, "classes": classes, "caption": ""}


def make_source(data_config, view: str):
  """The training ('train' view) or evaluation ('eval' view) source of `config.data`."""
  d = dict(data_config)
  if d.get("coco"):
    spec = d["coco"] if view == "train" else (d.get("coco_eval") or d["coco"])
    return CocoDetection(spec, view, image_size=int(d["image_size"]), split=d.get("coco_split", "ovr_cnn"),
                         num_images=int(d["num_train"] if view == "train" else d["num_eval"]))
  split = "train" if view == "train" else d.get("eval_split", "val")
  return SyntheticDetection(split, view, seed=int(d.get("seed", 0)), image_size=int(d["image_size"]),
                            num_images=int(d["num_train"] if view == "train" else d["num_eval"]),
                            objects=tuple(d.get("objects", (2, 4))), p_novel=float(d.get("p_novel", 0.35)))


def settings(data_config) -> dict:
  """The data settings that decide the cached teacher outputs (the cache key's data part)."""
  d = {k: v for k, v in dict(data_config).items() if k in ("coco", "coco_split", "image_size", "num_train",
                                                           "seed", "objects", "p_novel")}
  if d.get("coco"):
    ann = str(d["coco"]).partition(":")[0]
    d["coco_mtime"] = os.path.getmtime(ann) if os.path.exists(ann) else None
  return d


class _Examples:
  """Random-access training examples: source element i + the per-image cached arrays (`extra`)."""

  def __init__(self, source, indices: np.ndarray, make: Callable[[int, dict], dict]):
    self.source, self.indices, self.make = source, indices, make

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, j: int) -> dict:
    i = int(self.indices[int(j)])
    return self.make(i, self.source[i])


def train_iterator(source, make_example: Callable[[int, dict], dict], *, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1):
  """grain iterator of this process's rows of the global batches: every image of the process's share once per
  epoch in a seeded random order; `get_state()` / `set_state()` resume exactly."""
  import grain  # noqa: PLC0415
  if global_batch_size % process_count:
    raise UserError(f"batch_size={global_batch_size} is not divisible by the {process_count} processes")
  per_process = global_batch_size // process_count
  mine = np.arange(process_index, len(source), process_count)
  if len(mine) < per_process:
    raise UserError(f"{len(mine)} training image(s) per process cannot fill a batch of {per_process}; "
                    "raise data.num_train or lower batch_size")
  ds = (grain.MapDataset.source(_Examples(source, mine, make_example)).shuffle(seed=int(seed) * 1_000_003 + 17)
        .repeat().batch(per_process, drop_remainder=True))
  return iter(ds.to_iter_dataset())


def images_normalized(images_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  from vlm_jax.data import transforms  # noqa: PLC0415
  return transforms.normalize(images_uint8, tuple(mean), tuple(std))
