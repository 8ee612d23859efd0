"""Frozen image features of the k-shot splits: what a `fit` hook computes before (or instead of) training — the
linear probe's inputs and Tip-Adapter's cache keys and validation features.

- `embed(base_model, variables, images)`: f(x) [N, E], the base's L2-normalised image embeddings
  (`TwoTower.encode_image`, train=False: BatchNorm with its running statistics), in fixed-size, mesh-sharded
  batches. `variables` are a method's (the base under 'base', `vlm_jax.transfer.run.nest_base`).
- `augmented_embed(…, passes, seed)`: Σ_p f(aug_p(x)) / passes [N, E], the mean embedding over `passes` random
  augmentations of each image (Tip-Adapter's cache keys before their L2 normalisation; Zhang et al. 2022 §3.1
  average 10 augmented epochs of the training images).
- `augment(images, boxes, flips)`: the augmentation of Tip-Adapter's reference (torchvision RandomResizedCrop
  with scale (0.5, 1), bicubic, then RandomHorizontalFlip). Per image, a crop box of area s·H·W, s ~ U(scale), and
  aspect ratio a, log a ~ U(log 3/4, log 4/3) (the Inception crop of `vlm_jax.data.transforms.
  random_resized_crop`: ten tries, else the central crop; `crop_boxes` draws all tries at once, the same
  distribution), resized back to H × W with a cubic kernel (`jax.image.scale_and_translate`) and mirrored with
  probability 1/2. It runs on the normalised images: cropping, resizing and mirroring are linear per channel,
  so they commute with the per-channel normalisation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SCALE = (0.5, 1.0)            # crop area fraction (Tip-Adapter's RandomResizedCrop)
RATIO = (3 / 4, 4 / 3)        # crop aspect ratio range (torchvision's default)
CHUNK = 1024                  # images augmented per host round trip


def base_variables(variables: dict) -> dict:
  """The base model's own variables out of a method's (every collection's 'base' subtree)."""
  return {c: tree["base"] for c, tree in variables.items() if isinstance(tree, dict) and "base" in tree}


def embed(base_model, variables: dict, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """f(x) [N, E] float32: L2-normalised image embeddings of normalised images [N, H, W, 3]."""
  from vlm_jax.embedding.batched import Embedder  # noqa: PLC0415 (one compiled apply per model and mesh)
  enc = Embedder(base_model, "encode_image", batch_size)
  return np.asarray(enc(base_variables(variables), np.asarray(images, np.float32)), np.float32)


def crop_boxes(rng: np.random.Generator, n: int, height: int, width: int, scale=SCALE, ratio=RATIO,
               tries: int = 10) -> np.ndarray:
  """[n, 4] crop boxes (y0, x0, h, w) in pixels: the Inception crop (module docstring)."""
  area = height * width
  target = area * rng.uniform(scale[0], scale[1], (n, tries))
  aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, tries)))
  w, h = np.sqrt(target * aspect), np.sqrt(target / aspect)
  ok = (w <= width) & (h <= height)
  first = np.argmax(ok, axis=1)
  w, h = w[np.arange(n), first], h[np.arange(n), first]
  # no try fitted: the central crop with the aspect ratio clamped into `ratio` (torchvision's fallback)
  a = width / height
  cw, ch = (width, width / ratio[0]) if a < ratio[0] else ((height * ratio[1], height) if a > ratio[1] else
                                                          (width, height))
  w = np.where(ok.any(1), w, min(cw, width))
  h = np.where(ok.any(1), h, min(ch, height))
  x0 = np.where(ok.any(1), rng.uniform(0.0, 1.0, n) * (width - w), (width - w) / 2)
  y0 = np.where(ok.any(1), rng.uniform(0.0, 1.0, n) * (height - h), (height - h) / 2)
  return np.stack([y0, x0, h, w], axis=1).astype(np.float32)


@jax.jit
def augment(images: jax.Array, boxes: jax.Array, flips: jax.Array) -> jax.Array:
  """Crop `boxes` [N, 4] (y0, x0, h, w) of images [N, H, W, C], resized back to H × W (cubic), mirrored where
  `flips` [N] is true."""
  height, width = images.shape[1:3]

  def one(img, box, flip):
    y0, x0, h, w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([height / h, width / w])
    out = jax.image.scale_and_translate(img, img.shape, (0, 1), scale, -jnp.stack([y0, x0]) * scale, "cubic")
    return jnp.where(flip, out[:, ::-1], out)

  return jax.vmap(one)(images, boxes, flips)


def augmented_embed(base_model, variables: dict, images: np.ndarray, *, passes: int, seed: int,
                    batch_size: int = 256) -> np.ndarray:
  """[N, E]: the mean over `passes` augmentations (seeded by `seed`) of f(aug(x)) (module docstring)."""
  images = np.asarray(images, np.float32)
  n, height, width = images.shape[:3]
  rng = np.random.default_rng((int(seed), 0x7195))
  total = np.zeros((n, 0), np.float32)
  for _ in range(int(passes)):
    boxes = crop_boxes(rng, n, height, width)
    flips = rng.random(n) < 0.5
    feats = []
    for s in range(0, n, CHUNK):
      aug = np.asarray(augment(images[s:s + CHUNK], boxes[s:s + CHUNK], flips[s:s + CHUNK]))
      feats.append(embed(base_model, variables, aug, batch_size))
    f = np.concatenate(feats)
    total = f if total.shape[1] == 0 else total + f
  return total / float(passes)
