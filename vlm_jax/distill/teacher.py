"""The frozen teacher of a distillation run: any vlm_jax run or converted CLIP/SigLIP directory.

  teacher = load_teacher(config.teacher)     # UserError naming `make demo` / --config.teacher.checkpoint if absent
  teacher.fingerprint                        # sha256 of its weights (runs.fingerprint): keys every cache
  teacher.text_embeddings(names)             # [C, E] CLIP prompt ensemble (Radford et al. 2021 §3.1.4)
  teacher.crop_embeddings(images, boxes)     # [B, P, S, E] normalised f_I(crop_s(b)) for every crop scale s
  teacher.dense(images)                      # [B, h, w, E] MaskCLIP dense embeddings (Zhou et al. 2022)

The teacher is never trained: it is read once through `vlm_jax.inference.load` (every variable collection, the
run's own eval transform) and only its outputs are used. Crops are taken with RoIAlign (He et al. 2017) as
bilinear crop-and-resize to the teacher's input size (`crop_and_resize`): a box b scaled by s about its centre,
clipped to the image, sampled on an S×S grid with 2×2 points per output pixel (anti-aliased downscaling) — ViLD's
1× and 1.5× crops (Gu et al. 2022, §3.2: "we also crop 1.5× … to include more context").
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

from vlm_jax.errors import UserError

DEMO_HINT = "run `make demo` first (it writes workdirs/demo) or pass --config.teacher.checkpoint=MODEL_DIR"


def resolve_checkpoint(path: str) -> str:
  """`path` as an absolute teacher directory; `UserError` (one line) when it holds no vlm_jax checkpoint."""
  from vlm_jax import runs  # noqa: PLC0415
  if not path:
    raise UserError(f"no teacher checkpoint given: {DEMO_HINT}")
  full = os.path.abspath(path)
  if not os.path.isdir(full):
    raise UserError(f"teacher checkpoint {full} does not exist: {DEMO_HINT}")
  try:
    runs.resolve(full)
  except UserError as e:
    raise UserError(f"teacher {full}: {e}; {DEMO_HINT}") from None
  return full


def scale_boxes(boxes: np.ndarray, scale: float, size: Sequence[int]) -> np.ndarray:
  """Boxes (x0, y0, x1, y1) pixels scaled by `scale` about their centres, clipped to the image (H, W)."""
  b = np.asarray(boxes, np.float32)
  c = (b[..., :2] + b[..., 2:]) / 2
  half = (b[..., 2:] - b[..., :2]) * (scale / 2)
  lo, hi = c - half, c + half
  wh = np.asarray([size[1], size[0]], np.float32)
  return np.concatenate([np.clip(lo, 0, wh), np.clip(hi, 0, wh)], axis=-1)


@functools.lru_cache(maxsize=8)
def _crop_fn(out: int):
  import jax  # noqa: PLC0415

  from vlm_jax.models.roi_align import roi_align  # noqa: PLC0415

  def crop(images, boxes):  # images [B, H, W, 3] float, boxes normalised [B, P, 4] -> [B, P, out, out, 3]
    return roi_align(images, boxes, out, sampling_ratio=2)
  return jax.jit(crop)


def crop_and_resize(images: np.ndarray, boxes: np.ndarray, out: int) -> np.ndarray:
  """Bilinear crops [B, P, out, out, 3] of images [B, H, W, 3] (any float scale) at pixel boxes [B, P, 4]."""
  h, w = images.shape[1:3]
  norm = np.asarray(boxes, np.float32) / np.asarray([w, h, w, h], np.float32)
  return np.asarray(_crop_fn(int(out))(np.asarray(images, np.float32), norm))


class Teacher:
  """A frozen teacher (see the module docstring). `model` is its `vlm_jax.inference.InferenceModel`."""

  def __init__(self, path: str, *, batch_size: int = 256, templates: str | Sequence[str] = "synthetic"):
    from vlm_jax import inference, runs  # noqa: PLC0415
    self.path = resolve_checkpoint(path)
    self.model = inference.load(self.path, batch_size=batch_size)
    self.fingerprint = runs.fingerprint(self.path)
    self.image_size, self.mean, self.std = self.model.image_size, self.model.mean, self.model.std
    self.embed_dim = int(self.model.model.embed_dim)
    self.templates = templates

  @property
  def tokenizer(self):
    return self.model.tokenizer

  def normalize(self, images_uint8: np.ndarray) -> np.ndarray:
    from vlm_jax.data import transforms  # noqa: PLC0415
    return transforms.normalize(images_uint8, self.mean, self.std)

  def text_embeddings(self, names: Sequence[str], templates=None) -> np.ndarray:
    """[C, E] prompt-ensemble embeddings w_c = normalise(mean_p normalise(f_T(p(c)))) of class names."""
    from vlm_jax.embedding import classifier, prompts  # noqa: PLC0415
    tmpl = prompts.load_templates(self.templates if templates is None else templates)
    return classifier.class_embeddings(self.model.encode_text, self.tokenizer, list(names), tmpl,
                                       batch_size=256, fix_articles=True)

  def crop_embeddings(self, images_uint8: np.ndarray, boxes: np.ndarray,
                      scales: Sequence[float] = (1.0, 1.5)) -> np.ndarray:
    """[B, P, len(scales), E] normalised teacher image embeddings of each box's crop at each scale."""
    images = np.asarray(images_uint8, np.float32) / 255.0
    b, p = boxes.shape[:2]
    out = []
    for s in scales:
      crops = crop_and_resize(images, scale_boxes(boxes, s, images.shape[1:3]), self.image_size)
      crops = np.clip(crops.reshape(b * p, self.image_size, self.image_size, 3) * 255.0, 0, 255)
      z = self.model.encode_image(self.normalize(crops))
      out.append(z.reshape(b, p, -1))
    return np.stack(out, axis=2).astype(np.float32)

  @staticmethod
  def resize(images_uint8: np.ndarray, size: int | None = None) -> np.ndarray:
    """uint8 images resized (bilinear, anti-aliased RoIAlign sampling) to `size`² (default: as given)."""
    images = np.asarray(images_uint8)
    if size and size != images.shape[1]:
      full = np.asarray([[0, 0, images.shape[2], images.shape[1]]], np.float32)
      images = crop_and_resize(images.astype(np.float32), np.repeat(full[None], len(images), 0), int(size))[:, 0]
      images = np.clip(images + 0.5, 0, 255).astype(np.uint8)
    return images

  def dense(self, images_uint8: np.ndarray, size: int | None = None) -> np.ndarray:
    """[B, h, w, E] MaskCLIP dense embeddings of images resized (bilinear) to `size` (default: as given)."""
    return self.model.encode_dense(self.normalize(self.resize(images_uint8, size)))


def load_teacher(teacher_config) -> Teacher:
  """The teacher named by `config.teacher` ({'checkpoint', 'templates', 'batch_size'})."""
  cfg = dict(teacher_config or {})
  return Teacher(str(cfg.get("checkpoint") or ""), batch_size=int(cfg.get("batch_size", 256)),
                 templates=cfg.get("templates", "synthetic"))


TEACHER = "teacher"  # placeholder in config.init.sources / config.model.image for the teacher


def fill_placeholders(config, teacher: Teacher) -> dict:
  """`config` as a plain dict with the teacher placeholders filled in: the absolute teacher path (also in the init
  sources named 'teacher'), the teacher's image tower as `model.image` (a ResNet's BatchNorm frozen: the
  students' batches are small, running statistics are kept), the teacher's mean / std as the data normalisation."""
  from vlm_jax import config_lib  # noqa: PLC0415
  d = config_lib.plain(config)
  d["teacher"]["checkpoint"] = teacher.path
  d["init"]["sources"] = tuple({**s, "checkpoint": teacher.path} if s.get("checkpoint") == TEACHER else s
                               for s in (config_lib.plain(s) for s in d["init"].get("sources") or ()))
  if d["model"].get("image") == TEACHER:
    image = config_lib.plain(teacher.model.config.model.image)
    if image.get("kind") == "resnet":
      image["train_batch_stats"] = False
    d["model"]["image"] = image
  d["data"]["mean"], d["data"]["std"] = tuple(teacher.mean), tuple(teacher.std)
  return d
