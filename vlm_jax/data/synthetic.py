"""Procedural image-caption dataset of coloured shapes: the default data when no dataset is given.

Each image shows 1–3 flat-coloured shapes on a low-contrast, grey textured background; its caption names
them ("a red circle", "a photo of a small crimson disk on the left", "a blue star and a pink ring", …). The
class of an object is the pair (shape, colour), with

    class id = shape_idx * n_colours + colour_idx            (8 shapes × 8 colours = 64 classes)

A deterministic set of held-out pairs (16 of 64 by default: every shape misses exactly two colours and every
colour misses exactly two shapes, so each still appears with six partners) NEVER appears in a 'train' image or
caption; the 'eval_unseen' split shows only those pairs, 'eval_seen' only the others, one object per image, so
zero-shot classification over all 64 classes measures compositional generalisation (chance 1/64). The
'eval_retrieval' split draws held-out scenes like the training ones (1–3 objects of seen pairs, from its own
random stream), and `SyntheticShapes.captions` gives several different captions of one scene (retrieval).
The 'val' split (model selection, e.g. for few-shot transfer) shows one object per image of ALL classes,
class-balanced (image i shows class i mod n_classes), from its own random stream: no image of it is a 'train' or
eval image. Distribution-shift tasks and open-vocabulary scenes live in `synthetic_shift` and `synthetic_scenes`.

Everything is a pure function of (seed, split, index): `SyntheticShapes` is a random-access source (`__len__`,
`__getitem__`) usable as a grain data source. An element is a dict

    image     uint8 [S, S, 3]   rendered at the requested size, anti-aliased by supersampling
    caption   str
    label     int32 []          UniCL concept id (see `content_label`)
    classes   int32 [K]         class id per object, -1 padding (K = max_objects)
    boxes     float32 [K, 4]    (x0, y0, x1, y1) pixel-edge coordinates of each object's visible mask
                                (x1, y1 exclusive), zeros for padding
    instance_mask int32 [S, S]  0 = background, k + 1 = object k
    semantic_mask int32 [S, S]  0 = background, class id + 1 = object pixels

`scene(index)` returns the metadata without rendering (cheap, used to audit captions and held-out pairs).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from vlm_jax.data import synthetic_paint as paint
from vlm_jax.data.synthetic_paint import N_TEXTURES, shape_mask  # noqa: F401 (re-exported)
from vlm_jax.errors import UserError

# name, caption synonyms (the first is canonical and is the one used in zero-shot prompts)
SHAPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("circle", ("circle", "disk")),
    ("square", ("square", "box")),
    ("triangle", ("triangle",)),
    ("diamond", ("diamond", "rhombus")),
    ("star", ("star",)),
    ("cross", ("cross", "plus")),
    ("heart", ("heart",)),
    ("ring", ("ring", "donut")),
    ("crescent", ("crescent", "moon")),
    ("hexagon", ("hexagon",)),
)
# name, RGB, synonyms (first canonical)
COLOURS: tuple[tuple[str, tuple[int, int, int], tuple[str, ...]], ...] = (
    ("red", (225, 25, 30), ("red", "crimson", "scarlet")),
    ("orange", (250, 135, 15), ("orange", "tangerine")),
    ("yellow", (245, 225, 20), ("yellow", "golden")),
    ("green", (30, 165, 45), ("green", "emerald")),
    ("cyan", (20, 210, 225), ("cyan", "turquoise")),
    ("blue", (25, 55, 225), ("blue", "azure")),
    ("purple", (125, 30, 185), ("purple", "violet")),
    ("pink", (255, 125, 200), ("pink", "rose")),
    ("brown", (120, 70, 20), ("brown", "chocolate")),
    ("black", (15, 15, 15), ("black", "dark")),
)
SIZE_WORDS = {0: ("small", "tiny", "little"), 1: ("medium", "mid-sized"), 2: ("large", "big")}
PREFIXES = ("", "a photo of ", "a picture of ", "an image of ", "there is ", "a rendering of ")
SUFFIXES = ("", "", "", " on a textured background")
SPLITS = ("train", "eval_seen", "eval_unseen", "eval_retrieval", "val")  # append only: the index keys the rng
# relative diameter ranges (fraction of the image side) per size class: small, medium, large
SIZE_RANGES = ((0.30, 0.38), (0.40, 0.50), (0.52, 0.66))
_SIZE_EDGES = (0.39, 0.51)  # diameter fractions separating the size classes (recovers a scene's size words)
_MULTI_MAX_DIAM = 0.45  # objects of multi-object images sit in distinct quadrants


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def tokenize_words(text: str) -> list[str]:
  """Lower-case words, split on anything that is not a letter (the 'words' tokenizer's rule)."""
  return [w for w in re.split(r"[^a-z]+", text.lower()) if w]


def vocabulary(n_shapes: int = len(SHAPES), n_colours: int = len(COLOURS)) -> tuple[str, ...]:
  """Every word a caption or a zero-shot prompt of this dataset can contain, sorted."""
  words: set[str] = {"a", "an", "and", "the", "of", "on", "in", "at", "photo", "picture", "image", "there",
                     "is", "rendering", "textured", "background", "left", "right", "top", "bottom", "center"}
  for _, syn in SHAPES[:n_shapes]:
    words.update(tokenize_words(" ".join(syn)))
  for _, _, syn in COLOURS[:n_colours]:
    words.update(tokenize_words(" ".join(syn)))
  for syn in SIZE_WORDS.values():
    words.update(tokenize_words(" ".join(syn)))
  return tuple(sorted(words))


def heldout_pairs(n_shapes: int = 8, n_colours: int = 8, n_holdout: int = 16) -> np.ndarray:
  """Held-out (shape, colour) pairs [n_holdout, 2], spread evenly: shape s misses colours s + j·n_colours/h.

  h = n_holdout / n_shapes pairs per shape (2 for 8×8/16); with as many colours as shapes every colour is
  also missed by exactly h shapes, so each shape and colour keeps n − h partners in training. Raises
  `UserError` unless every shape and every colour keeps at least two training partners.
  """
  if n_holdout % n_shapes:
    raise UserError(f"n_holdout={n_holdout} must be a multiple of n_shapes={n_shapes}")
  h = n_holdout // n_shapes
  step = max(n_colours // h, 1) if h else 1
  pairs = np.array([(s, (s + j * step) % n_colours) for s in range(n_shapes) for j in range(h)],
                   np.int32).reshape(-1, 2)
  seen = np.ones((n_shapes, n_colours), bool)
  seen[pairs[:, 0], pairs[:, 1]] = False
  if len({tuple(p) for p in pairs}) != len(pairs) or seen.sum(1).min() < 2 or seen.sum(0).min() < 2:
    raise UserError(f"n_holdout={n_holdout} leaves some shape or colour of {n_shapes}×{n_colours} with fewer "
                    "than two training partners")
  return pairs


def content_label(classes: Sequence[int], n_classes: int) -> int:
  """UniCL concept id of an image: its class id when it shows one object; otherwise a stable id of the
  SORTED multiset of its classes, offset past the single-object ids (n + n² + … in mixed radix n), so two
  images share a label exactly when they show the same classes regardless of position, size or caption."""
  cls = sorted(int(c) for c in classes)
  if len(cls) == 1:
    return cls[0]
  offset = sum(n_classes ** k for k in range(1, len(cls)))
  code = 0
  for c in cls:
    code = code * n_classes + c
  return offset + code


@dataclasses.dataclass(frozen=True)
class Scene:
  """Metadata of one image (no pixels)."""
  classes: tuple[int, ...]
  centers: tuple[tuple[float, float], ...]  # (x, y) in pixels
  diameters: tuple[float, ...]  # in pixels
  rgbs: tuple[tuple[int, int, int], ...]
  caption: str
  label: int
  background: tuple  # (texture id, grey level, rgb tint, texture amplitude)


# ----------------------------------------------------------------------------------------------------------

class _Draws:
  """Uniforms drawn from a generator in blocks (few numpy calls per scene keep sampling cheap)."""

  def __init__(self, rng: np.random.Generator, block: int = 128):
    self._rng, self._block = rng, block
    self._u, self._i = [], 0

  def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
    if self._i == len(self._u):
      self._u, self._i = self._rng.random(self._block).tolist(), 0
    x = self._u[self._i]
    self._i += 1
    return lo + (hi - lo) * x

  def integers(self, n: int) -> int:
    return min(n - 1, int(self.uniform() * n))

  def choice(self, p: np.ndarray) -> int:
    x, acc = self.uniform(), 0.0
    for i, pi in enumerate(p):
      acc += pi
      if x < acc:
        return i
    return len(p) - 1


# ----------------------------------------------------------------------------------------------------------

class SyntheticShapes:
  """Random-access procedural dataset (a grain data source); see the module docstring."""

  def __init__(self, split: str = "train", *, seed: int = 0, image_size: int = 64, num_samples: int | None = None,
               n_shapes: int = 8, n_colours: int = 8, n_holdout: int = 16,
               object_probs: Sequence[float] = (0.6, 0.25, 0.15), supersample: int = 2,
               p_synonym: float = 0.3, p_size_word: float = 0.25, p_position_word: float = 0.25,
               texture_amplitude: float = 0.08, eval_per_class: int = 16):
    if split not in SPLITS:
      raise UserError(f"unknown split {split!r}; use one of {SPLITS}")
    if not (2 <= n_shapes <= len(SHAPES) and 2 <= n_colours <= len(COLOURS)):
      raise UserError(f"n_shapes must be in [2, {len(SHAPES)}] and n_colours in [2, {len(COLOURS)}]")
    self.split, self.seed, self.image_size = split, int(seed), int(image_size)
    self.n_shapes, self.n_colours = n_shapes, n_colours
    self.n_classes = n_shapes * n_colours
    self.object_probs = np.asarray(object_probs, np.float64) / np.sum(object_probs)
    self.max_objects = len(self.object_probs)
    if not 1 <= self.max_objects <= 3 or np.any(self.object_probs < 0):
      raise UserError(f"object_probs gives P(1), P(2), P(3 objects); got {tuple(object_probs)}")
    self.supersample = int(supersample)
    self.p_synonym, self.p_size_word, self.p_position_word = p_synonym, p_size_word, p_position_word
    self.texture_amplitude = texture_amplitude
    held = heldout_pairs(n_shapes, n_colours, n_holdout)
    self.unseen_classes = np.sort(held[:, 0] * n_colours + held[:, 1]).astype(np.int32)
    self.seen_classes = np.setdiff1d(np.arange(self.n_classes), self.unseen_classes).astype(np.int32)
    self._pool = {"train": self.seen_classes, "eval_seen": self.seen_classes,
                  "eval_unseen": self.unseen_classes, "eval_retrieval": self.seen_classes,
                  "val": np.arange(self.n_classes, dtype=np.int32)}[split]
    if num_samples is None:
      num_samples = (1 << 24) if split == "train" else eval_per_class * len(self._pool)
    self.num_samples = int(num_samples)

  # ---- metadata --------------------------------------------------------------------------------------------
  def class_names(self) -> list[str]:
    """Canonical '<colour> <shape>' name per class id."""
    return [f"{COLOURS[c][0]} {SHAPES[s][0]}" for s in range(self.n_shapes) for c in range(self.n_colours)]

  def shape_colour(self, class_id: int) -> tuple[int, int]:
    return divmod(int(class_id), self.n_colours)

  def __len__(self) -> int:
    return self.num_samples

  def scene(self, index: int) -> Scene:
    """Samples the metadata of element `index` (deterministic, no rendering)."""
    if not 0 <= index < self.num_samples:
      raise IndexError(index)
    d = _Draws(np.random.default_rng((self.seed, SPLITS.index(self.split), int(index))))
    s = self.image_size
    if self.split in ("train", "eval_retrieval"):
      k = d.choice(self.object_probs) + 1
      classes = [int(self._pool[d.integers(len(self._pool))]) for _ in range(k)]
    else:  # class-balanced single objects
      k, classes = 1, [int(self._pool[index % len(self._pool)])]
    centers, diams, size_ids = [], [], []
    if k == 1:  # anywhere, any size
      size_ids.append(d.integers(3))
      diams.append(s * d.uniform(*SIZE_RANGES[size_ids[0]]))
      r = diams[0] / 2
      centers.append((d.uniform(r + 0.5, s - r - 0.5), d.uniform(r + 0.5, s - r - 0.5)))
    else:  # k distinct quadrants, each object inside its own: no overlap, no occlusion
      cells = [0, 1, 2, 3]
      for j in range(k):
        q = cells.pop(d.integers(len(cells)))
        size_ids.append(d.integers(2))
        diam = s * min(d.uniform(*SIZE_RANGES[size_ids[-1]]), _MULTI_MAX_DIAM)
        r, half = diam / 2, s / 2
        ox, oy = (q % 2) * half, (q // 2) * half
        centers.append((ox + d.uniform(r + 0.5, half - r - 0.5), oy + d.uniform(r + 0.5, half - r - 0.5)))
        diams.append(diam)
    rgbs = []
    for c in classes:
      base = COLOURS[c % self.n_colours][1]
      rgbs.append(tuple(min(255, max(0, v + d.integers(25) - 12)) for v in base))
    caption = self._caption(d, classes, centers, size_ids)
    background = (d.integers(N_TEXTURES), d.uniform(0.35, 0.65),
                  (d.uniform(-.04, .04), d.uniform(-.04, .04), d.uniform(-.04, .04)),
                  d.uniform(0.3, 1.0) * self.texture_amplitude)
    return Scene(tuple(classes), tuple(centers), tuple(diams), tuple(rgbs), caption,
                 content_label(classes, self.n_classes), background)

  def captions(self, scene: Scene, n: int, rng: np.random.Generator, max_tries: int = 200) -> list[str]:
    """`n` different captions of one scene drawn by the training caption sampler (synonyms, size and position
    words, prefixes), `scene.caption` first; raises `UserError` when the scene has fewer variants."""
    sizes = [0 if d / self.image_size < _SIZE_EDGES[0] else 1 if d / self.image_size < _SIZE_EDGES[1] else 2
             for d in scene.diameters]
    out, draws = [scene.caption], _Draws(rng)
    for _ in range(max_tries * n):
      if len(out) >= n:
        break
      c = self._caption(draws, scene.classes, scene.centers, sizes)
      if c not in out:
        out.append(c)
    if len(out) < n:
      raise UserError(f"a scene of {len(scene.classes)} object(s) gave only {len(out)} different captions, "
                      f"{n} requested")
    return out[:n]

  def _caption(self, d: _Draws, classes, centers, size_ids) -> str:
    phrases = []
    for c, (cx, cy), size_id in zip(classes, centers, size_ids):
      sh, co = self.shape_colour(c)
      shape_syn, colour_syn = SHAPES[sh][1], COLOURS[co][2]
      shape = shape_syn[1 + d.integers(len(shape_syn) - 1)] if (
          len(shape_syn) > 1 and d.uniform() < self.p_synonym) else shape_syn[0]
      colour = colour_syn[1 + d.integers(len(colour_syn) - 1)] if (
          len(colour_syn) > 1 and d.uniform() < self.p_synonym) else colour_syn[0]
      words = [colour, shape]
      if d.uniform() < self.p_size_word / len(classes):
        syn = SIZE_WORDS[size_id]
        words.insert(0, syn[d.integers(len(syn))])
      phrase = f"{_article(words[0])} {' '.join(words)}"
      if d.uniform() < self.p_position_word / len(classes):
        phrase += " " + self._position_words(cx, cy)
      phrases.append(phrase)
    if len(phrases) == 1:
      body = phrases[0]
    else:
      body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    # multi-object captions stay short (they must fit a 16-token context): no suffix, and no prefix for three
    prefix = PREFIXES[d.integers(len(PREFIXES))] if len(classes) < 3 else ""
    suffix = SUFFIXES[d.integers(len(SUFFIXES))] if len(classes) == 1 else ""
    return prefix + body + suffix

  def _position_words(self, cx: float, cy: float) -> str:
    s = self.image_size
    h = "left" if cx < s / 3 else "right" if cx > 2 * s / 3 else ""
    v = "top" if cy < s / 3 else "bottom" if cy > 2 * s / 3 else ""
    if h and v:
      return f"in the {v} {h}"
    if h:
      return f"on the {h}"
    if v:
      return f"at the {v}"
    return "in the center"

  # ---- rendering -------------------------------------------------------------------------------------------
  def _textures(self) -> np.ndarray:
    """N_TEXTURES unit textures [N, S, S] in [-1, 1], built once per source from its seed
    (`synthetic_paint.texture_bank`)."""
    if getattr(self, "_tex", None) is None:
      self._tex = paint.texture_bank(self.seed, self.image_size)
    return self._tex

  def _subpixels(self) -> np.ndarray:
    """x (or y) coordinates of the supersampling points, [S * supersample], pixel i covering [i, i + 1)."""
    if getattr(self, "_sub", None) is None:
      self._sub = paint.subpixels(self.image_size, self.supersample)
    return self._sub

  def _background(self, scene: Scene) -> np.ndarray:
    tex_id, grey, tint, amp = scene.background
    base = np.asarray(tint, np.float32) + np.float32(grey)
    return np.clip(base + np.float32(amp) * self._textures()[tex_id][..., None], 0.0, 1.0)

  def render(self, scene: Scene, masks: bool = True) -> dict:
    """Pixels and masks of a scene (see the module docstring for the element format); `masks=False` skips
    classes/boxes/masks (the training input needs only image, caption and label)."""
    s, ss = self.image_size, self.supersample
    img = self._background(scene)
    inst = np.zeros((s, s), np.int32)
    coords = self._subpixels()
    for k, (c, centre, d, rgb) in enumerate(zip(scene.classes, scene.centers, scene.diameters, scene.rgbs)):
      raster = shape_mask(SHAPES[c // self.n_colours][0])
      (y0, y1, x0, x1), alpha = paint.paint(img, raster, centre, d, rgb, coords, ss)
      if masks:
        inst[y0:y1, x0:x1][alpha >= 0.5] = k + 1
    image = (img * 255.0 + 0.5).astype(np.uint8)
    if not masks:
      return {"image": image, "caption": scene.caption, "label": np.int32(scene.label)}
    return {"image": image, "caption": scene.caption, "label": np.int32(scene.label), "instance_mask": inst,
            **paint.instance_annotations(inst, scene.classes, self.max_objects)}

  def __getitem__(self, index: int) -> dict:
    return self.render(self.scene(int(index)))
