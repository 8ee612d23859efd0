"""Class-agnostic proposals per training image: the boxes ViLD-image distils on and PB-OVD picks pseudo boxes from.

ViLD (Gu et al. 2022, ICLR, arXiv 2104.13921, §3.3) distils the teacher's embeddings of M proposals per image,
computed offline by a detector trained on the base categories only; the base-trained RPN generalises to novel
objects ("proposals of novel categories are recalled", ViLD §4), which is how novel objects get cropped. PB-OVD
(Gao et al. 2022) likewise selects its pseudo boxes among the proposals of a pre-trained proposal generator.

  kind='rpn'     (`configs/distill/vild.py:tiny`) the closed-set baseline of the same run (trained first, on base
                 boxes only; `config.baselines` must include 'closed_set'), its detector run on every training
                 image at test settings: the RPN's post-NMS proposals, then one more class-agnostic NMS across
                 pyramid levels (IoU `nms_iou`, the RPN's NMS is per level), the `per_image` highest-objectness
                 boxes. Slots the RPN leaves empty (fewer surviving boxes) are filled with 'random' boxes.
  kind='random'  seeded random boxes (`teacher_cache.proposal_boxes`): label-free and detector-free — a test and
                 ablation setting; random boxes rarely fit an object (IoU ≥ 0.5), so pseudo boxes chosen among
                 them are poor.

`settings(...)` is what the teacher cache keys on: the proposal settings plus, for 'rpn', the fingerprint of the
baseline's final checkpoint (`runs.fingerprint`), so retraining the baseline is a cache miss.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from vlm_jax.distill import teacher_cache
from vlm_jax.errors import UserError

KINDS = ("rpn", "random")
SOURCE = "closed_set"  # the baseline whose RPN proposes (baselines/<SOURCE> of the run's workdir)


def source_dir(workdir: str) -> str:
  return os.path.join(workdir, "baselines", SOURCE)


def crops_needed(config) -> bool:
  """Whether the run caches the teacher's crop embeddings of the proposals (ViLD-image, or crop-scored pseudo
  boxes; DetPro learns from them too)."""
  m = config.method
  return float(m.image_weight) > 0 or bool(m.pseudo_boxes and config.pseudo_boxes.get("scorer") == "crops")


def needed(config) -> bool:
  """Whether the run uses proposals at all (ViLD-text alone does not)."""
  return crops_needed(config) or bool(config.method.pseudo_boxes)


def check(config) -> None:
  """A `UserError` for an unknown kind, or for kind 'rpn' in a run that uses proposals without the baseline."""
  kind = config.proposals.get("kind", "random")
  if kind not in KINDS:
    raise UserError(f"unknown proposals.kind {kind!r}; use one of {list(KINDS)}")
  if kind == "rpn" and needed(config) and SOURCE not in tuple(config.get("baselines") or ()):
    raise UserError(f"proposals.kind='rpn' takes the proposals of the {SOURCE!r} baseline's RPN: keep "
                    f"{SOURCE!r} in config.baselines, or set --config.proposals.kind=random")


def settings(config, workdir: str) -> dict:
  """The proposal settings the teacher cache keys on (module docstring)."""
  from vlm_jax import config_lib  # noqa: PLC0415
  p = config_lib.plain(config.proposals)
  if p.get("kind") == "rpn":
    from vlm_jax import runs  # noqa: PLC0415
    p["source_fingerprint"] = runs.fingerprint(source_dir(workdir))
  return p


def random_boxes(config, num_images: int) -> np.ndarray:
  """'random' proposals [N, per_image, 4] of the training images."""
  p, hw = config.proposals, (int(config.data.image_size),) * 2
  return np.stack([teacher_cache.proposal_boxes(int(config.data.seed), i, int(p.per_image), hw,
                                                min_size=float(p.min_size), max_size=float(p.max_size))
                   for i in range(num_images)])


def top_boxes(boxes: np.ndarray, scores: np.ndarray, valid: np.ndarray, count: int, *, nms_iou: float,
              fill: np.ndarray) -> np.ndarray:
  """The `count` highest-scoring boxes of one image after class-agnostic NMS (IoU > `nms_iou` suppressed), best
  first; missing slots from `fill` [count, 4] (same order)."""
  from vlm_jax.models.detection.nms import nms  # noqa: PLC0415
  scores = np.where(valid, scores, -np.inf).astype(np.float32)
  idx, ok = (np.asarray(a) for a in nms(boxes, scores, iou_threshold=nms_iou, max_out=count))
  out = np.array(fill, np.float32, copy=True)
  kept = boxes[idx[ok]]
  out[:len(kept)] = kept
  return out


def rpn_boxes(config, workdir: str, source, build_student: Callable) -> np.ndarray:
  """'rpn' proposals [N, per_image, 4] of the training images from the closed-set baseline (module docstring)."""
  import jax  # noqa: PLC0415

  from vlm_jax import runs  # noqa: PLC0415
  from vlm_jax.data import transforms  # noqa: PLC0415
  path = source_dir(workdir)
  try:
    run = runs.load(path)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"proposals.kind='rpn' needs the trained {SOURCE!r} baseline at {path}: {e}") from None
  model = build_student(run.config)  # the saved config describes the whole student
  apply = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, im: m.detector(im, train=False)))
  p = config.proposals
  count, batch = int(p.per_image), int(config.teacher_cache.chunk)
  fill = random_boxes(config, len(source))
  out = np.zeros((len(source), count, 4), np.float32)
  for start in range(0, len(source), batch):
    idx = range(start, min(start + batch, len(source)))
    images = transforms.normalize(np.stack([source[i]["image"] for i in idx]), config.data.mean, config.data.std)
    o = jax.device_get(apply(run.variables, images))
    for j, i in enumerate(idx):
      out[i] = top_boxes(o["rpn_proposals"][j], o["rpn_scores"][j], o["rpn_valid"][j], count,
                         nms_iou=float(p.get("nms_iou", 0.5)), fill=fill[i])
  return out


def proposal_boxes(config, workdir: str, source, build_student: Callable) -> np.ndarray:
  """Proposals [N, per_image, 4] of the training images for `config.proposals.kind` (module docstring)."""
  check(config)
  if config.proposals.kind == "rpn":
    return rpn_boxes(config, workdir, source, build_student)
  return random_boxes(config, len(source))
