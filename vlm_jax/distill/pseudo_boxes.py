"""Pseudo boxes from captions (PB-OVD: Gao et al. 2022, "Open Vocabulary Object Detection with Pseudo Bounding-Box
Labels", ECCV, arXiv 2111.09452, §3.1).

PB-OVD turns image–caption pairs into box labels for the objects a caption names: for each object noun w of the
caption, an activation map Φ_w of the vision-language teacher over the image localises it, and the proposal that
best covers the activation becomes a pseudo box of class w. Here:

  nouns     the vocabulary's class names found in the caption (longest match first; PB-OVD parses nouns and keeps
            those in the category vocabulary), minus the classes the image already has boxes for (base objects);
  Φ_w(x)    the teacher's MaskCLIP dense embeddings z(x) (Zhou et al. 2022; `Teacher.dense`) scored against the
            caption's names, a softmax over them at every location,
                Φ_w(x) = exp(cos(z(x), t_w)/τ) / Σ_{n ∈ caption} exp(cos(z(x), t_n)/τ),
            upsampled bilinearly to pixels ('dense', the paper's activation maps); or ('crops') the same softmax of
            the teacher's crop embedding of each proposal (`teacher_cache`), a per-proposal activation;
  box       b*_w = argmax_b  mean_{x∈b} Φ_w(x) · Σ_{x∈b} Φ_w(x) / Σ_x Φ_w(x)        ('dense')
                 = argmax_b  Φ_w(b)                                                ('crops')
            over the class-agnostic proposals (the product rewards boxes that are both on the activation and cover
            most of it, PB-OVD's "proposal with the largest overlap with the activation").

The pseudo boxes are extra ground truth (the detector trains on base boxes + pseudo boxes); their classes join
the training vocabulary — the weak supervision PB-OVD uses, so unlike ViLD it needs captions that name the novel
objects.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np


def caption_classes(caption: str, names: Sequence[str]) -> list[int]:
  """Indices into `names` of the class names the caption mentions, in order of appearance (longest first)."""
  text = " " + re.sub(r"[^a-z0-9 ]+", " ", caption.lower()) + " "
  found = []
  for i in sorted(range(len(names)), key=lambda i: -len(names[i])):
    pat = " " + names[i].lower() + " "
    pos = text.find(pat)
    while pos >= 0:
      found.append((pos, i))
      text = text[:pos] + " " * len(pat) + text[pos + len(pat):]  # consumed: a shorter name cannot re-match it
      pos = text.find(pat)
  return [i for _, i in sorted(found)]


def _upsample(maps: np.ndarray, size) -> np.ndarray:
  """[h, w, C] -> [H, W, C] bilinear, half-pixel centres (the segmentation evaluator's convention)."""
  from vlm_jax.evaluate.segmentation import upsample_bilinear  # noqa: PLC0415
  return upsample_bilinear(maps[None], size)[0]


def box_scores_dense(activation: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """[M] score mean_{x∈b} Φ · Σ_{x∈b} Φ / Σ Φ of pixel boxes [M, 4] on an activation map [H, W] (≥ 0)."""
  h, w = activation.shape
  integral = np.zeros((h + 1, w + 1), np.float64)
  integral[1:, 1:] = activation.cumsum(0).cumsum(1)
  b = np.round(np.asarray(boxes)).astype(np.int64)
  x0, x1 = np.clip(b[:, 0], 0, w), np.clip(b[:, 2], 0, w)
  y0, y1 = np.clip(b[:, 1], 0, h), np.clip(b[:, 3], 0, h)
  inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
  area = np.maximum((x1 - x0) * (y1 - y0), 1)
  return inside / area * inside / max(float(integral[-1, -1]), 1e-12)


def pseudo_boxes(caption: str, names: Sequence[str], class_emb: np.ndarray, proposals: np.ndarray, *,
                 known: Sequence[int] = (), dense: np.ndarray | None = None, crops: np.ndarray | None = None,
                 image_hw=None, temperature: float = 0.05, max_boxes: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """(boxes float32 [max_boxes, 4], classes int32 [max_boxes], −1 padding) for one image (module docstring).

  `class_emb` [C, E] normalised text embeddings of `names`; `known`: classes with ground-truth boxes (skipped);
  `dense` [h, w, E] teacher dense embeddings ('dense' scorer) or `crops` [M, E] normalised teacher embeddings of
  the proposals ('crops' scorer)."""
  present = caption_classes(caption, names)
  out_b = np.zeros((max_boxes, 4), np.float32)
  out_c = np.full((max_boxes,), -1, np.int32)
  uniq = list(dict.fromkeys(present))
  if not uniq:
    return out_b, out_c
  t = class_emb[uniq]
  if dense is not None:
    logits = (dense @ t.T) / temperature
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    act = _upsample(prob.astype(np.float32), image_hw)
  else:
    logits = (crops @ t.T) / temperature
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
  k = 0
  for j, c in enumerate(uniq):
    if c in set(int(x) for x in known) or k >= max_boxes:
      continue
    scores = box_scores_dense(act[..., j], proposals) if dense is not None else prob[:, j]
    out_b[k], out_c[k] = proposals[int(np.argmax(scores))], c
    k += 1
  return out_b, out_c
