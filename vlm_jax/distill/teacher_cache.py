"""The teacher's outputs that never change, computed once and cached on disk: proposals, crop embeddings, pseudo boxes.

ViLD (Gu et al. 2022, "Open-vocabulary Object Detection via Vision and Language Knowledge Distillation", §3.2)
precomputes, offline, the teacher image embeddings of M proposals per training image,

    e_r = normalise( normalise(f_I(crop_1×(r))) + normalise(f_I(crop_1.5×(r))) )          (the 1× + 1.5× ensemble)

because the teacher is frozen and the proposals fixed: training then never runs the teacher. This module does the
same for a finite training set (image i of the training source, i < num_images) and stores per image

    proposals  float32 [M, 4]        class-agnostic boxes (x0, y0, x1, y1) pixels (`proposal_boxes`)
    crops      float16 [M, S, E]     f_I of the crop at each scale s (normalised), S = len(scales)
    pseudo     float32 [K, 4] + int32 [K] classes (−1 padding)   PB-OVD pseudo boxes (`pseudo_boxes.py`), when on

Proposals: 'random' (default): M boxes per image drawn deterministically from (seed, image index): square-ish
boxes with side uniform in [min_size, max_size] × the image side, aspect ratio in [2/3, 3/2], uniform position —
label-free, so novel objects are cropped as often as base ones (ViLD's proposals come from an RPN trained on base
classes; any class-agnostic boxes serve the distillation, and these need no detector).

Cache: `<root>/<key>/chunk-<k>.npz` (`chunk` images each) plus `meta.json`; the key is a sha256 of the teacher's
fingerprint (`runs.fingerprint`) and every data, proposal, crop and pseudo-box setting, so a changed teacher or
setting is a miss, never stale data. A missing chunk is computed and written atomically (temporary file, then
rename): a run killed while filling the cache resumes where it stopped. A hit only reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

import numpy as np

log = logging.getLogger("vlm_jax")
VERSION = 1  # bump when the stored content changes meaning


def default_root() -> str:
  base = os.environ.get("VLM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlm_jax")
  return os.path.join(base, "distill_teacher")


def proposal_boxes(seed: int, index: int, count: int, image_hw, *, min_size: float = 0.15,
                   max_size: float = 0.5) -> np.ndarray:
  """'random' proposals of image `index`: float32 [count, 4] pixel boxes inside the image (module docstring)."""
  rng = np.random.default_rng((int(seed), 80021, int(index)))
  h, w = (float(v) for v in image_hw)
  side = rng.uniform(min_size, max_size, count) * min(h, w)
  ratio = np.exp(rng.uniform(np.log(2 / 3), np.log(3 / 2), count))
  bw, bh = np.minimum(side * np.sqrt(ratio), w), np.minimum(side / np.sqrt(ratio), h)
  x0, y0 = rng.uniform(0, 1, count) * (w - bw), rng.uniform(0, 1, count) * (h - bh)
  return np.stack([x0, y0, x0 + bw, y0 + bh], 1).astype(np.float32)


def cache_key(settings: dict) -> str:
  return hashlib.sha256(json.dumps({"version": VERSION, **settings}, sort_keys=True,
                                   default=str).encode()).hexdigest()[:20]


class TeacherCache:
  """Per-image teacher outputs for images 0..num_images−1 of a training source (see the module docstring).

  `compute(indices) -> {name: array [len(indices), …]}` produces a chunk; `load()` returns every array stacked
  over all images, computing the chunks that are missing first. `hits` / `misses` count chunks of the last load.
  """

  def __init__(self, root: str, settings: dict, num_images: int, compute: Callable[[np.ndarray], dict], *,
               chunk: int = 256):
    self.settings, self.num_images, self.compute, self.chunk = settings, int(num_images), compute, int(chunk)
    self.key = cache_key({**settings, "num_images": self.num_images, "chunk": self.chunk})
    self.directory = os.path.join(os.path.abspath(root or default_root()), self.key)
    self.hits = self.misses = 0

  def _chunk_path(self, k: int) -> str:
    return os.path.join(self.directory, f"chunk-{k:05d}.npz")

  def num_chunks(self) -> int:
    return -(-self.num_images // self.chunk)

  def complete(self) -> bool:
    return all(os.path.exists(self._chunk_path(k)) for k in range(self.num_chunks()))

  def load(self, *, progress: bool = False) -> dict[str, np.ndarray]:
    os.makedirs(self.directory, exist_ok=True)
    meta = os.path.join(self.directory, "meta.json")
    if not os.path.exists(meta):
      with open(meta + f".tmp{os.getpid()}", "w") as f:
        json.dump({"settings": self.settings, "num_images": self.num_images, "chunk": self.chunk}, f, indent=2,
                  sort_keys=True, default=str)
      os.replace(meta + f".tmp{os.getpid()}", meta)
    self.hits = self.misses = 0
    parts = []
    for k in range(self.num_chunks()):
      path = self._chunk_path(k)
      if os.path.exists(path):
        self.hits += 1
      else:
        self.misses += 1
        if progress:
          print(f"teacher cache: computing chunk {k + 1}/{self.num_chunks()} ({self.directory})", flush=True)
        idx = np.arange(k * self.chunk, min((k + 1) * self.chunk, self.num_images))
        arrays = self.compute(idx)
        tmp = path[:-4] + f".tmp{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
      with np.load(path) as z:
        parts.append({name: z[name] for name in z.files})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
