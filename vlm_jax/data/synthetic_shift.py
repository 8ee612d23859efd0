"""Distribution-shift classification tasks over the procedural shapes, selectable by name (few-shot transfer).

    get_task(name, split, n, seed=0, image_size=32) -> Task(images uint8 [n, S, S, 3], labels int32 [n],
                                                            class_names list[str], templates tuple[str, ...])

Every image shows ONE object on a background; image i of a split shows class i mod C (C = len(class_names)), so
n = k·C gives exactly k shots per class. Class names are '<colour> <shape>' (the canonical words of
`synthetic.COLOURS` / `synthetic.SHAPES`, all in the 'words' tokenizer's vocabulary); the templates are the
synthetic prompt set (`evaluate/templates/synthetic.txt`, with 'a' before every name: zero-shot code writes 'an'
before a vowel), plus task-specific ones where a task has them. The tasks (pre-training = `SyntheticShapes`
'train' with its defaults: shapes 0–7 × colours 0–7, 16 held-out pairs, flat fill, low-contrast grey textures):

    base                 the 64 (shape, colour) classes of pre-training, drawn like its single-object eval images
    shifted_hues         the same 64 classes and names; every colour's hue rotated by +22°, saturation × 0.7 and
                         value × 0.85 (faded, shifted paint)
    new_colours          8 shapes × the colours 'brown' and 'black' (16 classes): colour words the tokenizer
                         knows but no pre-training image shows
    new_shapes           'crescent' and 'hexagon' × the 8 colours (16 classes): shapes never drawn in pre-training
    unseen_compositions  the 16 held-out (shape, colour) pairs of `synthetic.heldout_pairs` (never in a
                         pre-training image or caption), one class each
    textured             the 64 classes on strongly textured, coloured backgrounds (a random dark and a random
                         light muted colour blended by a texture, instead of a ±8 % grey ripple)
    outline              the 64 classes drawn as outlines only (a stroke of 1/4 of the radius, nothing filled)

Splits 'train', 'val' and 'test' are disjoint random streams keyed by (seed, task, split, index) — different from
every `SyntheticShapes` split — so few-shot training, model selection and testing never share an image. Everything
is a pure function of the arguments; results are cached per process (a copy is returned).
"""

from __future__ import annotations

import colorsys
import functools
from typing import NamedTuple

import numpy as np

from vlm_jax.data import synthetic, synthetic_paint as paint
from vlm_jax.errors import UserError

TASKS = ("base", "shifted_hues", "new_colours", "new_shapes", "unseen_compositions", "textured", "outline")
SPLITS = ("train", "val", "test")
# the synthetic prompt set (evaluate/templates/synthetic.txt, which the data package does not import)
TEMPLATES = ("a {}", "a photo of a {}", "a picture of a {}", "an image of a {}", "there is a {}",
             "a rendering of a {}")
_EXTRA_TEMPLATES = {"textured": ("a {} on a textured background",)}
_N = 8  # pre-training's shapes and colours (SyntheticShapes defaults)
_SIZE_RANGES = synthetic.SIZE_RANGES  # the same object sizes as pre-training
_HUE_SHIFT, _SAT_SCALE, _VAL_SCALE = 22 / 360, 0.7, 0.85
_OUTLINE_WIDTH = 0.25
_STREAM = 52361  # rng key salt of this module


class Task(NamedTuple):
  """A labelled image set of one task and split (unpacks as images, labels, class_names, templates)."""
  images: np.ndarray  # uint8 [N, S, S, 3]
  labels: np.ndarray  # int32 [N]
  class_names: list
  templates: tuple


def task_classes(name: str) -> list[tuple[int, int]]:
  """(shape index, colour index) into `synthetic.SHAPES` / `synthetic.COLOURS` of each class of a task."""
  if name not in TASKS:
    raise UserError(f"unknown synthetic shift task {name!r}; available: {list(TASKS)}")
  if name == "new_colours":
    return [(s, c) for s in range(_N) for c in (8, 9)]
  if name == "new_shapes":
    return [(s, c) for s in (8, 9) for c in range(_N)]
  if name == "unseen_compositions":
    return sorted((int(s), int(c)) for s, c in synthetic.heldout_pairs(_N, _N, 16))
  return [(s, c) for s in range(_N) for c in range(_N)]


def class_names(name: str) -> list[str]:
  """'<colour> <shape>' per class of task `name`."""
  return [f"{synthetic.COLOURS[c][0]} {synthetic.SHAPES[s][0]}" for s, c in task_classes(name)]


def templates(name: str) -> tuple[str, ...]:
  """Prompt templates ('{}' = class name) of task `name`."""
  task_classes(name)  # validates the name
  return TEMPLATES + _EXTRA_TEMPLATES.get(name, ())


def _shift_hue(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
  h, s, v = colorsys.rgb_to_hsv(*(x / 255 for x in rgb))
  r, g, b = colorsys.hsv_to_rgb((h + _HUE_SHIFT) % 1.0, s * _SAT_SCALE, v * _VAL_SCALE)
  return tuple(int(round(x * 255)) for x in (r, g, b))


def _background(name: str, u: np.ndarray, texture: np.ndarray) -> np.ndarray:
  """float32 [S, S, 3]: pre-training's grey ripple, or (textured) two muted colours blended by the texture."""
  if name == "textured":
    muted = lambda x: 0.5 * x + 0.5 * x.mean()  # noqa: E731 (half-desaturated: never reads as an object colour)
    a, b = 0.1 + 0.3 * muted(u[8:11]), 0.6 + 0.3 * muted(u[11:14])  # a dark and a light colour
    w = (texture[..., None] + 1) * np.float32(0.5)
    return (a.astype(np.float32) * (1 - w) + b.astype(np.float32) * w).astype(np.float32)
  grey, amp = 0.35 + 0.3 * u[8], (0.3 + 0.7 * u[9]) * 0.08
  tint = (u[10:13] - 0.5) * 0.08
  return np.clip(tint.astype(np.float32) + np.float32(grey) + np.float32(amp) * texture[..., None], 0.0, 1.0)


def render_one(name: str, split: str, index: int, *, seed: int = 0, image_size: int = 32) -> np.ndarray:
  """uint8 [S, S, 3]: image `index` of a task's split (class index mod C), a pure function of the arguments."""
  classes = task_classes(name)
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; use one of {SPLITS}")
  s = int(image_size)
  shape, colour = classes[index % len(classes)]
  u = np.random.default_rng((int(seed), _STREAM, TASKS.index(name), SPLITS.index(split), int(index))).random(16)
  size_id = min(2, int(u[0] * 3))
  lo, hi = _SIZE_RANGES[size_id]
  diam = s * (lo + (hi - lo) * u[1])
  r = diam / 2
  centre = (r + 0.5 + (s - 2 * r - 1) * u[2], r + 0.5 + (s - 2 * r - 1) * u[3])
  base = synthetic.COLOURS[colour][1]
  if name == "shifted_hues":
    base = _shift_hue(base)
  rgb = tuple(min(255, max(0, v + int(u[4 + j] * 25) - 12)) for j, v in enumerate(base[:3]))
  img = _background(name, u, _textures(int(seed), s)[int(u[15] * paint.N_TEXTURES)])
  raster = (paint.outline_mask(synthetic.SHAPES[shape][0], _OUTLINE_WIDTH) if name == "outline"
            else paint.shape_mask(synthetic.SHAPES[shape][0]))
  paint.paint(img, raster, centre, diam, rgb, _subpixels(s), 2)
  return (img * 255.0 + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _textures(seed: int, size: int) -> np.ndarray:
  return paint.texture_bank(seed, size)


@functools.lru_cache(maxsize=4)
def _subpixels(size: int) -> np.ndarray:
  return paint.subpixels(size, 2)


@functools.lru_cache(maxsize=16)
def _task(name: str, split: str, n: int, seed: int, image_size: int) -> Task:
  c = len(task_classes(name))
  images = np.stack([render_one(name, split, i, seed=seed, image_size=image_size) for i in range(n)]) if n else (
      np.zeros((0, image_size, image_size, 3), np.uint8))
  return Task(images, (np.arange(n) % c).astype(np.int32), class_names(name), templates(name))


def get_task(name: str, split: str, n: int, seed: int = 0, *, image_size: int = 32) -> Task:
  """The first `n` images of a task's split with labels, class names and templates (see the module docstring)."""
  if int(n) < 0:
    raise UserError(f"number of images must be >= 0, got {n}")
  if int(image_size) < 8:
    raise UserError(f"image_size must be >= 8, got {image_size}")
  task_classes(name)
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; use one of {SPLITS}")
  t = _task(name, split, int(n), int(seed), int(image_size))
  return Task(t.images.copy(), t.labels.copy(), list(t.class_names), t.templates)
