"""Open-vocabulary detection and segmentation scenes: novel-class objects appear UNLABELLED among labelled base
objects in training, and every object is annotated (with a base/novel flag) for evaluation.

Classes are the 64 (shape, colour) pairs of pre-training (class id = shape · 8 + colour, names '<colour> <shape>',
`synthetic.SyntheticShapes` defaults), split once and for all (`class_split()`):

    held out  the 16 pairs of `synthetic.heldout_pairs(8, 8, 16)` (shape s with colours s and s + 4): never in a
              scene, so the pre-training held-out pairs stay unseen by every model
    novel     16 pairs, shape s with colours s + 1 and s + 5 (mod 8): orange circle, blue circle, yellow
              square, …; seen in pre-training (a teacher knows them), never labelled for the detector/segmenter
    base      the other 32 pairs: labelled in training
              (every shape has 4 base and 2 novel colours, every colour 4 base and 2 novel shapes)

A scene shows 2–4 objects (`objects`), each novel with probability `p_novel` (else base), class drawn uniformly
within its group, diameter 20–36 % of the image side, placed by rejection sampling so their bounding circles do
not overlap (an object that finds no room after 50 tries is left out), drawn like pre-training objects (flat
fill, ±12 colour jitter, anti-aliased) on pre-training's low-contrast grey textures. Splits 'train', 'val',
'test' are disjoint random streams keyed by (seed, split, index). `OpenVocabScenes` is a random-access source
(`__len__`, `__getitem__`, usable as a grain data source); an element is a dict

    image          uint8 [S, S, 3]
    caption        str      names every object in order ('a red circle, a blue star and a green ring'): the
                            image-level text a caption-supervised method (pseudo boxes) may read
    classes        int32 [K]       class id per object, −1 padding (K = max objects)
    boxes          float32 [K, 4]  (x0, y0, x1, y1) pixel edges of the object's mask (x1, y1 exclusive), 0 padding
    is_novel       bool [K]        the object's class is novel
    valid          bool [K]        a real object (not padding)
    instance_mask  int32 [S, S]    0 = background, k + 1 = object k
    semantic_mask  int32 [S, S]    0 = background, class id + 1 on object pixels

in one of two views of the same pixels (`view`, default 'train' for the 'train' split, else 'eval'):

    'eval'   every object, base and novel, with `is_novel` set: what detection AP / segmentation mIoU use
    'train'  the base objects only (compacted to slots 0…, `is_novel` all False): novel objects get no slot,
             no box, class 0 in `semantic_mask` and `instance_mask` — to a supervised learner they are background

`scene_arrays(split, n, …)` stacks the first n elements into arrays (captions as a list).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from vlm_jax.data import synthetic, synthetic_paint as paint
from vlm_jax.errors import UserError

SPLITS = ("train", "val", "test")
VIEWS = ("train", "eval")
N_SHAPES = N_COLOURS = 8
N_CLASSES = N_SHAPES * N_COLOURS
_DIAMETER = (0.20, 0.36)  # fraction of the image side
_TRIES = 50
_STREAM = 70001  # rng key salt of this module


@functools.lru_cache(maxsize=1)
def class_split() -> dict[str, np.ndarray]:
  """{'base': int32 [32], 'novel': int32 [16], 'heldout': int32 [16]} class ids (see the module docstring)."""
  held = synthetic.heldout_pairs(N_SHAPES, N_COLOURS, 16)
  novel = np.stack([held[:, 0], (held[:, 1] + 1) % N_COLOURS], 1)
  ids = lambda pairs: np.sort(pairs[:, 0] * N_COLOURS + pairs[:, 1]).astype(np.int32)  # noqa: E731
  heldout, novel_ids = ids(held), ids(novel)
  base = np.setdiff1d(np.arange(N_CLASSES), np.concatenate([heldout, novel_ids])).astype(np.int32)
  assert not set(heldout) & set(novel_ids) and len(base) == 32
  return {"base": base, "novel": novel_ids, "heldout": heldout}


def class_names() -> list[str]:
  """'<colour> <shape>' per class id (all 64; scenes use the base and novel ones)."""
  return [f"{synthetic.COLOURS[c][0]} {synthetic.SHAPES[s][0]}" for s in range(N_SHAPES) for c in range(N_COLOURS)]


@dataclasses.dataclass(frozen=True)
class SceneLayout:
  """Metadata of one scene (no pixels)."""
  classes: tuple[int, ...]
  centers: tuple[tuple[float, float], ...]  # (x, y) pixels
  diameters: tuple[float, ...]  # pixels
  rgbs: tuple[tuple[int, int, int], ...]
  background: tuple  # (texture id, grey level, rgb tint, texture amplitude)


class OpenVocabScenes:
  """Random-access source of open-vocabulary scenes (see the module docstring)."""

  def __init__(self, split: str = "train", *, seed: int = 0, image_size: int = 64, num_samples: int | None = None,
               view: str | None = None, objects: Sequence[int] = (2, 4), p_novel: float = 0.35,
               supersample: int = 2):
    if split not in SPLITS:
      raise UserError(f"unknown split {split!r}; use one of {SPLITS}")
    view = view or ("train" if split == "train" else "eval")
    if view not in VIEWS:
      raise UserError(f"unknown view {view!r}; use one of {VIEWS}")
    lo, hi = (int(k) for k in objects)
    if not 1 <= lo <= hi <= 6:
      raise UserError(f"objects=(min, max) must satisfy 1 <= min <= max <= 6, got {tuple(objects)}")
    if not 0.0 <= p_novel <= 1.0:
      raise UserError(f"p_novel must be in [0, 1], got {p_novel}")
    if int(image_size) < 16:
      raise UserError(f"image_size must be >= 16, got {image_size}")
    self.split, self.view, self.seed, self.image_size = split, view, int(seed), int(image_size)
    self.objects, self.p_novel, self.supersample = (lo, hi), float(p_novel), int(supersample)
    self.max_objects = hi
    self.num_samples = int(num_samples if num_samples is not None else (1 << 20 if split == "train" else 512))
    groups = class_split()
    self.base_classes, self.novel_classes = groups["base"], groups["novel"]
    self._novel = np.zeros(N_CLASSES, bool)
    self._novel[self.novel_classes] = True

  def class_names(self) -> list[str]:
    return class_names()

  def __len__(self) -> int:
    return self.num_samples

  def layout(self, index: int) -> SceneLayout:
    """Samples the metadata of scene `index` (deterministic, no rendering)."""
    if not 0 <= index < self.num_samples:
      raise IndexError(index)
    rng = np.random.default_rng((self.seed, _STREAM, SPLITS.index(self.split), int(index)))
    s = self.image_size
    k = int(rng.integers(self.objects[0], self.objects[1] + 1))
    classes, centers, diams, rgbs = [], [], [], []
    for _ in range(k):
      pool = self.novel_classes if rng.random() < self.p_novel else self.base_classes
      c = int(pool[rng.integers(len(pool))])
      d = s * rng.uniform(*_DIAMETER)
      r = d / 2
      jitter = rng.integers(-12, 13, 3)
      for _ in range(_TRIES):
        cx, cy = rng.uniform(r + 0.5, s - r - 0.5, 2)
        if all(np.hypot(cx - x, cy - y) >= r + e / 2 + 1 for (x, y), e in zip(centers, diams)):
          break
      else:
        continue  # no room: the object is left out
      classes.append(c)
      centers.append((float(cx), float(cy)))
      diams.append(float(d))
      base = synthetic.COLOURS[c % N_COLOURS][1]
      rgbs.append(tuple(int(min(255, max(0, v + j))) for v, j in zip(base, jitter)))
    background = (int(rng.integers(paint.N_TEXTURES)), float(rng.uniform(0.35, 0.65)),
                  tuple(float(t) for t in rng.uniform(-0.04, 0.04, 3)), float(rng.uniform(0.3, 1.0) * 0.08))
    return SceneLayout(tuple(classes), tuple(centers), tuple(diams), tuple(rgbs), background)

  def caption(self, layout: SceneLayout) -> str:
    """Names every object in order, e.g. 'a red circle, a blue star and a green ring'."""
    names = class_names()
    phrases = [f"{'an' if names[c][0] in 'aeiou' else 'a'} {names[c]}" for c in layout.classes]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]

  def render(self, layout: SceneLayout) -> dict:
    """Pixels and the 'eval' view annotations (every object) of a scene."""
    s, ss = self.image_size, self.supersample
    tex_id, grey, tint, amp = layout.background
    img = np.clip(np.asarray(tint, np.float32) + np.float32(grey)
                  + np.float32(amp) * _textures(self.seed, s)[tex_id][..., None], 0.0, 1.0)
    inst = np.zeros((s, s), np.int32)
    coords = _subpixels(s, ss)
    for k, (c, centre, d, rgb) in enumerate(zip(layout.classes, layout.centers, layout.diameters, layout.rgbs)):
      raster = paint.shape_mask(synthetic.SHAPES[c // N_COLOURS][0])
      (y0, y1, x0, x1), alpha = paint.paint(img, raster, centre, d, rgb, coords, ss)
      inst[y0:y1, x0:x1][alpha >= 0.5] = k + 1
    ann = paint.instance_annotations(inst, layout.classes, self.max_objects)
    valid = ann["classes"] >= 0
    return {"image": (img * 255.0 + 0.5).astype(np.uint8), "caption": self.caption(layout), **ann,
            "is_novel": valid & self._novel[np.maximum(ann["classes"], 0)], "valid": valid, "instance_mask": inst}

  def training_view(self, element: dict) -> dict:
    """The 'train' view of an 'eval' element: base objects only, novel objects turned into background."""
    keep = np.nonzero(element["valid"] & ~element["is_novel"])[0]
    kmax = len(element["classes"])
    classes = np.full((kmax,), -1, np.int32)
    boxes = np.zeros((kmax, 4), np.float32)
    classes[:len(keep)], boxes[:len(keep)] = element["classes"][keep], element["boxes"][keep]
    remap = np.zeros(kmax + 1, np.int32)  # old instance id -> new one (0 for novel objects)
    remap[keep + 1] = np.arange(1, len(keep) + 1)
    inst = remap[element["instance_mask"]]
    sem = np.where(inst > 0, element["semantic_mask"], 0).astype(np.int32)
    return {**element, "classes": classes, "boxes": boxes, "is_novel": np.zeros(kmax, bool),
            "valid": classes >= 0, "instance_mask": inst, "semantic_mask": sem}

  def element(self, index: int, view: str | None = None) -> dict:
    """Scene `index` in `view` (default: this source's view)."""
    view = view or self.view
    if view not in VIEWS:
      raise UserError(f"unknown view {view!r}; use one of {VIEWS}")
    el = self.render(self.layout(int(index)))
    return self.training_view(el) if view == "train" else el

  def __getitem__(self, index: int) -> dict:
    return self.element(int(index))


@functools.lru_cache(maxsize=4)
def _textures(seed: int, size: int) -> np.ndarray:
  return paint.texture_bank(seed, size)


@functools.lru_cache(maxsize=4)
def _subpixels(size: int, supersample: int) -> np.ndarray:
  return paint.subpixels(size, supersample)


def scene_arrays(split: str, n: int, *, seed: int = 0, image_size: int = 64, view: str | None = None,
                 **options) -> dict:
  """The first `n` elements of a split stacked: every array key gets a leading [n] axis; 'caption' is a list."""
  src = OpenVocabScenes(split, seed=seed, image_size=image_size, view=view, **options)
  els = [src[i] for i in range(int(n))]
  out = {k: np.stack([e[k] for e in els]) for k in els[0] if k != "caption"} if els else {}
  out["caption"] = [e["caption"] for e in els]
  return out
