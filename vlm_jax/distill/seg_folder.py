"""Real segmentation data for the distillation students: an image folder, a folder of PNG label maps and a class list,
given as `--config.data.masks=IMAGES:LABELS:CLASSES` (`seg_data.make_source` streams it through the same rows as
the synthetic scenes: `image(i)`, `mask(i)`, `names`, `novel`, `test_mask`).

  IMAGES   images named <stem>.jpg / .jpeg / .png / .webp (any size; converted to RGB)
  LABELS   one single-channel PNG <stem>.png per image: pixel value i = class i of CLASSES (0-based), 255 = ignored
  CLASSES  a text file, one class name per line (line i names class i; blank lines only at the end)

Every label map must have its image (images without a label map are skipped). Images are resized to
`data.image_size`² bilinearly, label maps with nearest neighbours (no crop: the aspect ratio is not kept). Inside the
students a label map holds 0 = background (never present in these datasets: every pixel is a class or ignored),
class i → i + 1, ignored → −1 (the loss and the confusion matrix skip it).

Splits. With `data.eval_masks` (same IMAGES:LABELS:CLASSES form, the same class list) the first folder trains and the
second evaluates; without it the label maps (sorted by stem) are split: the last `data.num_eval` evaluate, the others
train. `data.num_train` caps the training images (the first ones by stem).

Base / novel classes (`data.novel_classes`): a comma-separated list of class names, or a number k of novel classes
drawn by a generator seeded by `data.seed`; empty: k = round(C / 4). The zero-shot protocol of ZS3Net (Bucher et al.
2019) / SPNet (Xian et al. 2019): in the training view novel-class pixels are ignored (never a label, never
background), the evaluation view keeps every class; every class is a test class (mIoU base, novel, harmonic mean).

Layouts (nothing is downloaded; point the three paths at an existing copy):
  COCO-Stuff 164k (Caesar et al. 2018): IMAGES = images/train2017 (or val2017), LABELS = stuffthingmaps/train2017
      (val2017) — PNGs of 0-based ids over the 171 used thing + stuff classes (the 182-id list with its 11 unused
      thing ids removed, as the stuffthingmaps release renumbers them), 255 = unlabelled; CLASSES: the 171 names in
      id order. Evaluate on val2017 with `data.eval_masks=images/val2017:stuffthingmaps/val2017:CLASSES`.
  PASCAL-Context (Mottaghi et al. 2014), the 59-class setting: IMAGES = JPEGImages, LABELS = 59-class label PNGs
      with 0-based ids and 255 for "background / other" (mmsegmentation's converted maps hold 0 = background and
      1..59: subtract one and map 0 to 255), CLASSES: the 59 names in id order; evaluate on the val images (a second
      folder pair, `data.eval_masks`). Keeping background as a class instead: list it first and map 0..59 as is.
"""

from __future__ import annotations

import os

import numpy as np

from vlm_jax.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
IGNORE = 255


def parse(spec: str, key: str = "data.masks") -> tuple[str, str, str]:
  """(images dir, labels dir, class-list file) of 'IMAGES:LABELS:CLASSES'; UserError when malformed or absent."""
  parts = str(spec).split(":")
  if len(parts) != 3 or not all(parts):
    raise UserError(f"{key} must be IMAGES:LABELS:CLASSES (image folder, label-map folder, class-list file), "
                    f"got {spec!r}")
  images, labels, classes = (os.path.abspath(os.path.expanduser(p)) for p in parts)
  for what, path in (("image folder", images), ("label-map folder", labels)):
    if not os.path.isdir(path):
      raise UserError(f"{key}: {what} {path} does not exist")
  if not os.path.isfile(classes):
    raise UserError(f"{key}: class-list file {classes} does not exist")
  return images, labels, classes


def read_classes(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    lines = [ln.strip() for ln in f.read().splitlines()]
  while lines and not lines[-1]:
    lines.pop()
  if not lines:
    raise UserError(f"class list {path} is empty")
  if not all(lines):
    raise UserError(f"class list {path}: blank line {lines.index('') + 1} (line i names class i − 1)")
  if len(set(lines)) != len(lines):
    raise UserError(f"class list {path} names a class twice")
  if len(lines) >= IGNORE:
    raise UserError(f"class list {path} has {len(lines)} classes; label value {IGNORE} is reserved for 'ignore'")
  return lines


def pairs(images_dir: str, labels_dir: str) -> list[tuple[str, str]]:
  """[(image path, label path)] sorted by stem; UserError for a label map without its image."""
  images = {}
  for name in os.listdir(images_dir):
    stem, ext = os.path.splitext(name)
    if ext.lower() in IMAGE_EXTS:
      images.setdefault(stem, os.path.join(images_dir, name))
  out = []
  for name in sorted(os.listdir(labels_dir)):
    stem, ext = os.path.splitext(name)
    if ext.lower() != ".png":
      continue
    if stem not in images:
      raise UserError(f"label map {os.path.join(labels_dir, name)} has no image {stem}.* in {images_dir}")
    out.append((images[stem], os.path.join(labels_dir, name)))
  if not out:
    raise UserError(f"no PNG label maps in {labels_dir}")
  return out


def novel_flags(names: list[str], spec, seed: int) -> np.ndarray:
  """bool [C] of the novel classes (module docstring: names, a count, or a quarter by default)."""
  c = len(names)
  spec = str(spec if spec is not None else "").strip()
  if spec and not spec.isdigit():
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown:
      raise UserError(f"data.novel_classes names {unknown} not in the class list")
    return np.isin(np.arange(c), [names.index(w) for w in wanted])
  k = int(spec) if spec else max(1, round(c / 4))
  if not 0 < k < c:
    raise UserError(f"data.novel_classes: {k} novel classes out of {c}; need at least one base and one novel")
  return np.isin(np.arange(c), np.random.default_rng((int(seed), 2019)).choice(c, k, replace=False))


def _nearest(label: np.ndarray, size: int) -> np.ndarray:
  h, w = label.shape
  rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
  cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
  return label[rows[:, None], cols[None, :]]


def read_label(path: str, num_classes: int) -> np.ndarray:
  """The raw label PNG as int64 [H, W]; UserError when unreadable, not single-channel or holding a value that is
  neither a class id of the list nor 255."""
  from PIL import Image, UnidentifiedImageError  # noqa: PLC0415
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise UserError(f"label map {path} is mode {im.mode}; label maps are single-channel PNGs of class ids")
      y = np.asarray(im).astype(np.int64)
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
    raise UserError(f"cannot read label map {path}: {e}") from None
  bad = (y >= num_classes) & (y != IGNORE) | (y < 0)
  if bad.any():
    v = int(y[bad][0])
    raise UserError(f"label map {path} holds value {v}, beyond the {num_classes} classes of the class list "
                    f"(0..{num_classes - 1}; {IGNORE} = ignore)")
  return y


def read_image(path: str, size: int) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError  # noqa: PLC0415
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
      return np.asarray(im, np.uint8)
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
    raise UserError(f"cannot read image {path}: {e}") from None


class FolderSegmentation:
  """Image + label-map folder as a segmentation source (module docstring); `view` 'train' ignores novel pixels."""

  has_ignore = True  # label maps hold −1 (ignored pixels): CLIPSeg's rows carry a validity mask

  def __init__(self, items: list[tuple[str, str]], names: list[str], novel: np.ndarray, *, view: str,
               image_size: int):
    self.items, self.names, self.view, self.size = list(items), list(names), view, int(image_size)
    self.novel = np.asarray(novel, bool)
    self.test_mask = np.ones(len(names), bool)
    self.lut = np.full(IGNORE + 1, -1, np.int32)  # raw value -> label (class i -> i + 1, 255 / novel in 'train' -> −1)
    self.lut[:len(names)] = np.arange(1, len(names) + 1)
    if view == "train":
      self.lut[:len(names)][self.novel] = -1

  def __len__(self) -> int:
    return len(self.items)

  def image(self, i: int) -> np.ndarray:
    return read_image(self.items[int(i)][0], self.size)

  def mask(self, i: int) -> np.ndarray:
    raw = read_label(self.items[int(i)][1], len(self.names))
    return self.lut[_nearest(raw, self.size)]

  def images(self, idx) -> np.ndarray:
    return np.stack([self.image(i) for i in idx])

  def masks(self, idx) -> np.ndarray:
    return np.stack([self.mask(i) for i in idx])


def make_source(data_config, view: str) -> FolderSegmentation:
  """The 'train', 'eval' or 'support' (training images, every class labelled) source of `data.masks` (module
  docstring: splits, base / novel classes)."""
  d = dict(data_config)
  images, labels, classes = parse(d["masks"])
  names = read_classes(classes)
  items = pairs(images, labels)
  num_eval, num_train = int(d.get("num_eval", 0)), int(d.get("num_train", 0))
  if d.get("eval_masks"):
    e_images, e_labels, e_classes = parse(d["eval_masks"], "data.eval_masks")
    if read_classes(e_classes) != names:
      raise UserError(f"data.eval_masks' class list {e_classes} differs from data.masks' {classes}")
    train, evaluation = items, pairs(e_images, e_labels)
    evaluation = evaluation[:num_eval] if num_eval > 0 else evaluation
  else:
    if not 0 < num_eval < len(items):
      raise UserError(f"data.masks has {len(items)} label maps: data.num_eval={num_eval} of them cannot be held out "
                      "for evaluation with some left for training (or give data.eval_masks)")
    train, evaluation = items[:-num_eval], items[-num_eval:]
  train = train[:num_train] if num_train > 0 else train
  novel = novel_flags(names, d.get("novel_classes", ""), int(d.get("seed", 0)))
  chosen = evaluation if view == "eval" else train
  return FolderSegmentation(chosen, names, novel, view="train" if view == "train" else "eval",
                            image_size=int(d["image_size"]))
