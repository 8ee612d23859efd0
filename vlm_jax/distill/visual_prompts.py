"""CLIPSeg's visual prompts (Lüddecke & Ecker 2022, "Image Segmentation Using Text and Image Prompts", §3): the
conditional vector of the decoder may be the CLIP image embedding of a support image in which the object is
highlighted, instead of the text embedding of its name; during training the two are interpolated.

Visual prompt engineering (their best variant: background intensity reduced to 10 %, background blurred, the image
cropped to the object with a little context). For a support image s ∈ [0, 1]^{H×W×3} and its object mask m:

    s' = m ⊙ s + β · (1 − m) ⊙ G_σ ∗ s                  β = `background` (0.1), G_σ: Gaussian blur of σ = `blur` px
    box = bbox(m) widened by `context` (0.1) of its height / width on each side, clipped to the image
    v   = f_I( resize_{S×S}( square( s' restricted to box ) ) )     (square: the box padded with black, centred)

f_I is the frozen teacher's image encoder (L2-normalised, its joint space with the text embeddings t_c), S its input
size; the resize is bilinear (RoIAlign sampling, `teacher.crop_and_resize`). Darkening is applied to pixel
intensities in [0, 1] (towards black), as the paper describes it.

Image-text interpolation (training with `method.conditioning = 'mixed'`): per query

    x = a · v + (1 − a) · t,    a ~ U(0, 1)

with v the visual prompt of another training example of the query's class and t its normalised text embedding;
'visual' uses x = v, 'text' x = t (the decoder's own class-embedding path, unchanged).

Support examples come from the training split with full annotations (`seg_data.make_source(…, 'support')`: for the
synthetic scenes the 'eval' view of the training images, where novel objects are labelled too; for a mask folder
every class of its label maps): a seeded scan of at most `scan` images, an example qualifies when the class covers at
least `min_pixels` pixels. `bank` draws up to `supports` examples per class (training: base classes); evaluation uses
one example per test class (base and novel: the one-shot protocol), drawn by the same seed from another stream.
"""

from __future__ import annotations

import numpy as np


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
  """float32 [N, H, W, C] blurred by a separable Gaussian of σ px (kernel radius ⌈3σ⌉, edges replicated)."""
  x = np.asarray(images, np.float32)
  if sigma <= 0:
    return x
  r = max(1, int(np.ceil(3 * sigma)))
  k = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float32) / sigma) ** 2)
  k /= k.sum()
  for axis in (1, 2):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="edge")
    n = x.shape[axis]
    x = sum(w * np.take(xp, np.arange(j, j + n), axis=axis) for j, w in enumerate(k))
  return x.astype(np.float32)


def object_boxes(masks: np.ndarray, context: float) -> np.ndarray:
  """[N, 4] pixel boxes (x0, y0, x1, y1) of each mask's bounding box widened by `context` × its size, clipped."""
  out = []
  h, w = masks.shape[1:3]
  for m in np.asarray(masks, bool):
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    if not len(rows):
      out.append((0.0, 0.0, float(w), float(h)))
      continue
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dy, dx = context * (y1 - y0), context * (x1 - x0)
    out.append((max(0.0, x0 - dx), max(0.0, y0 - dy), min(float(w), x1 + dx), min(float(h), y1 + dy)))
  return np.asarray(out, np.float32)


def prompt_images(images_uint8: np.ndarray, masks: np.ndarray, size: int, *, background: float = 0.1,
                  blur: float = 1.0, context: float = 0.1) -> np.ndarray:
  """float32 [N, size, size, 3] in [0, 255]: the engineered visual prompts of the module docstring."""
  from vlm_jax.distill.teacher import crop_and_resize  # noqa: PLC0415
  s = np.asarray(images_uint8, np.float32) / 255.0
  m = np.asarray(masks, bool)[..., None].astype(np.float32)
  x = m * s + float(background) * (1.0 - m) * gaussian_blur(s, float(blur))
  n, h, w = x.shape[:3]
  boxes = object_boxes(masks, float(context))
  ys, xs = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
  inside = ((xs >= np.floor(boxes[:, 0, None, None])) & (xs < np.ceil(boxes[:, 2, None, None]))
            & (ys >= np.floor(boxes[:, 1, None, None])) & (ys < np.ceil(boxes[:, 3, None, None])))
  x = x * inside[..., None]  # outside the box: black, as the square padding
  side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
  cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
  pad = max(h, w)  # a black frame wide enough for any square around a box inside the image
  framed = np.zeros((n, h + 2 * pad, w + 2 * pad, 3), np.float32)
  framed[:, pad:pad + h, pad:pad + w] = x
  square = np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], -1) + pad
  crops = crop_and_resize(framed, square[:, None], int(size))[:, 0]
  return np.clip(crops * 255.0, 0.0, 255.0).astype(np.float32)


def embed(teacher, images_uint8: np.ndarray, masks: np.ndarray, settings: dict, batch_size: int = 128) -> np.ndarray:
  """[N, E] teacher image embeddings v of the visual prompts (module docstring)."""
  kw = {k: float(settings[k]) for k in ("background", "blur", "context") if k in settings}
  out = []
  for i in range(0, len(images_uint8), batch_size):
    x = prompt_images(images_uint8[i:i + batch_size], masks[i:i + batch_size], teacher.image_size, **kw)
    out.append(np.asarray(teacher.model.encode_image(teacher.normalize(x)), np.float32))
  if not out:
    return np.zeros((0, int(teacher.embed_dim)), np.float32)
  return np.concatenate(out)


def class_areas(source, idx: np.ndarray, num_classes: int, chunk: int = 64) -> np.ndarray:
  """int64 [len(idx), C] pixel count of every class (labels c + 1) in the label maps of `source` images idx."""
  out = []
  for i in range(0, len(idx), chunk):
    y = source.masks(idx[i:i + chunk]).reshape(len(idx[i:i + chunk]), -1).astype(np.int64)
    counts = np.stack([np.bincount(np.clip(r, 0, num_classes + 1), minlength=num_classes + 2) for r in y])
    out.append(counts[:, 1:num_classes + 1])
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.int64)


def select(areas: np.ndarray, idx: np.ndarray, classes: np.ndarray, per_class: int, *, min_pixels: int,
           seed: int, stream: int) -> np.ndarray:
  """int64 [len(classes), per_class] image indices of the chosen support examples (−1: none qualifies), drawn
  without replacement by a generator seeded by (seed, stream, class id)."""
  out = np.full((len(classes), int(per_class)), -1, np.int64)
  for j, c in enumerate(classes):
    ok = idx[areas[:, c] >= int(min_pixels)]
    if len(ok):
      rng = np.random.default_rng((int(seed), int(stream), int(c)))
      pick = rng.choice(ok, min(int(per_class), len(ok)), replace=False)
      out[j, :len(pick)] = pick
  return out


def bank(teacher, source, classes: np.ndarray, settings: dict, *, seed: int, stream: int) -> dict:
  """{'embeddings' float32 [C, P, E] (vocabulary rows; zeros where none), 'images' int64 [C, P] (−1: none)} of up to
  P = `settings['supports']` examples for each class in `classes` (every other row stays empty)."""
  c = len(source.names)
  rng = np.random.default_rng((int(seed), 104729))
  idx = np.sort(rng.permutation(len(source))[:int(settings.get("scan", 512))])
  areas = class_areas(source, idx, c)
  per_class = int(settings.get("supports", 1))
  chosen = select(areas, idx, np.asarray(classes), per_class, min_pixels=int(settings.get("min_pixels", 16)),
                  seed=seed, stream=stream)
  images = np.full((c, per_class), -1, np.int64)
  images[np.asarray(classes)] = chosen
  emb = np.zeros((c, per_class, int(teacher.embed_dim)), np.float32)
  where = np.argwhere(images >= 0)
  if len(where):
    ids = images[where[:, 0], where[:, 1]]
    imgs = source.images(ids)
    masks = np.stack([source.mask(i) == k + 1 for i, k in zip(ids, where[:, 0])])
    emb[where[:, 0], where[:, 1]] = embed(teacher, imgs, masks, settings)
  return {"embeddings": emb, "images": images}
