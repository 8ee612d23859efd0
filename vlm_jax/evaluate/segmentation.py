"""Zero-shot semantic segmentation from dense patch-text similarity (MaskCLIP), scored by mean IoU.

Dense features: MaskCLIP (Zhou et al. 2022, "Extract Free Dense Labels from CLIP", ECCV, §3.2). The last
attention of the image tower is reduced to its value path, no query-key attention: for a ViT every patch
token goes through the last block as x + out(v(LN(x))) followed by the block's residual MLP, the final norm
and the image projection; for CLIP's ResNet (and a MAP-pooled ViT) each position goes through the attention
pool's value and output projections. `TwoTower.encode_dense` returns these L2-normalised features
[B, h, w, D] in the joint space, so each location can be scored like an image.

Prediction: cosine similarity of every location with the class text embeddings (the zero-shot template
ensemble of `embedding.classifier.class_embeddings`), logits upsampled bilinearly to the pixels (half-pixel centres, edge
clamped: PyTorch `interpolate(..., align_corners=False)`), argmax. Labels: 0 = background, c + 1 = class c
(the encoding of `SyntheticShapes` semantic masks).

Background: a scene's background is not one of the classes, and a contrastively trained model has no
"nothing here" embedding (captions always name objects). Two rules, chosen by `background`:
  'threshold' (default)  per location, the class scores are centred over the classes,
                         s_c(x) = cos(z(x), t_c) − mean_k cos(z(x), t_k),
                         and the background gets the constant logit δ: a pixel is background when no class
                         stands out from the others by δ. (On background, a CLIP ResNet's dense features
                         match all classes alike: the raw best cosine barely differs between background and
                         objects, its margin over the class mean does — for the demo model 0.41 ± 0.06 on
                         background cells vs 0.62 ± 0.08 on object cells; briefly trained one- or two-layer
                         ViTs showed no such separation.) This follows the score thresholds
                         used for datasets with a background class (GroupViT, Xu et al. 2022; TCL, Cha et
                         al. 2023), on the centred score. δ = `threshold`, a number, or by default 'otsu':
                         Otsu's cut (Otsu 1979) of the objectness max_c s_c over all locations of the
                         evaluated images — label-free, and it follows the score scale of a model as it
                         trains (a fixed δ that suits a trained model marks everything background early on).
  'prompt'               background is one more class whose text embedding is the ensemble of
                         `background_prompts` ("a photo of the background", …) — the open-vocabulary
                         recipe MaskCLIP's demos use; works when the text tower knows such captions.
The same rule is applied to the baseline.

Baseline: the global image embedding (`encode_image`) broadcast to every pixel, scored and thresholded the
same way: one label per image.

Metric: mean IoU from a confusion matrix accumulated over the whole dataset (as mmseg / the MaskCLIP paper):
IoU_k = TP_k / (TP_k + FP_k + FN_k) over the labels {background, classes}, averaged over the labels that
occur in the ground truth or in the prediction (labels absent from both are excluded, not counted as 0 or 1).
`chance` is the expected mIoU of a uniformly random label per pixel under the same rule.

`evaluate_synthetic` runs this on held-out scenes of the procedural dataset ('eval_retrieval': 1–3 objects of
seen (shape, colour) pairs, never training images) rendered at twice the training resolution by default, so a
stride-32 ResNet trained at 32 px still yields a 2×2 grid; `write_overlays` draws image | ground truth |
prediction (| baseline) rows as a PNG.
"""

from __future__ import annotations

import colorsys
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from vlm_jax import config_lib
from vlm_jax.embedding.classifier import class_embeddings, embed_chunked, l2_normalize_rows
from vlm_jax.evaluate import zeroshot

EncodeFn = Callable[[np.ndarray], np.ndarray]

BACKGROUND_MODES = ("threshold", "prompt")
BACKGROUND_PROMPTS = ("background", "the background", "a photo of the background", "a picture of the background",
                      "a textured background")
DEFAULT_THRESHOLD = "otsu"


# ---- metric ---------------------------------------------------------------------------------------------------

def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_labels: int, ignore_index: int = -1) -> np.ndarray:
  """Pixel counts [ground-truth label, predicted label] (int64 [K, K]); pixels with gt == ignore_index skipped."""
  gt, pred = np.asarray(gt).reshape(-1), np.asarray(pred).reshape(-1)
  keep = gt != ignore_index
  idx = gt[keep].astype(np.int64) * num_labels + pred[keep].astype(np.int64)
  return np.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def iou_per_label(conf: np.ndarray) -> np.ndarray:
  """IoU of every label [K] from a confusion matrix; NaN for labels absent from ground truth and prediction."""
  conf = np.asarray(conf, np.float64)
  tp = np.diag(conf)
  union = conf.sum(axis=0) + conf.sum(axis=1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def mean_iou(conf: np.ndarray) -> float:
  """Mean IoU over the labels present in ground truth or prediction (see the module docstring)."""
  iou = iou_per_label(conf)
  return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else 0.0


def chance_miou(gt_counts: np.ndarray) -> float:
  """Expected mIoU of labelling every pixel uniformly at random among the K labels, given the ground-truth
  pixel count of each label [K] (a random labelling predicts every label, so all K are scored)."""
  n = np.asarray(gt_counts, np.float64)
  k, total = len(n), n.sum()
  tp = n / k
  return float(np.mean(tp / (n + total / k - tp)))


# ---- prediction -----------------------------------------------------------------------------------------------

def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold (Otsu 1979): the cut of a 1-D histogram maximising the between-class variance."""
  v = np.asarray(values, np.float64).reshape(-1)
  lo, hi = float(v.min()), float(v.max())
  if hi <= lo:
    return lo
  hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
  p = hist / hist.sum()
  centres = (edges[:-1] + edges[1:]) / 2
  w0 = np.cumsum(p)[:-1]  # weight below the cut after bin i
  m0 = np.cumsum(p * centres)[:-1]
  mt = float((p * centres).sum())
  with np.errstate(invalid="ignore", divide="ignore"):
    between = (mt * w0 - m0) ** 2 / (w0 * (1.0 - w0))
  return float(edges[1:-1][np.nanargmax(np.where(np.isfinite(between), between, -1.0))])


def objectness(z: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
  """max_c cos(z, t_c) − mean_k cos(z, t_k): how much the best class stands out at each location [...]."""
  sims = np.asarray(z, np.float32) @ np.asarray(class_emb, np.float32).T
  return sims.max(axis=-1) - sims.mean(axis=-1)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] linear-interpolation weights, half-pixel centres, sample positions clamped to the edges."""
  src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  w = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - w)
  np.add.at(m, (np.arange(n_out), hi), w)
  return m.astype(np.float32)


def upsample_bilinear(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bilinear resize of maps [B, h, w, C] to [B, H, W, C] (see the module docstring for the convention)."""
  my, mx = _interp_matrix(int(size[0]), x.shape[1]), _interp_matrix(int(size[1]), x.shape[2])
  y = np.einsum("yi,bijc->byjc", my, np.asarray(x, np.float32))
  return np.einsum("byjc,xj->byxc", y, mx)


def scores_with_background(z: np.ndarray, class_emb: np.ndarray, *, background: str = "threshold",
                           threshold: float = 0.5,
                           background_emb: np.ndarray | None = None) -> np.ndarray:
  """Label logits [..., 1 + C] (label 0 = background) of normalised embeddings z [..., D].

  'threshold': [δ, cos(z, t_c) − mean_k cos(z, t_k)]; 'prompt': [cos(z, t_bg), cos(z, t_c)].
  """
  sims = np.asarray(z, np.float32) @ np.asarray(class_emb, np.float32).T
  if background == "threshold":
    sims = sims - sims.mean(axis=-1, keepdims=True)
    bg = np.full(sims.shape[:-1] + (1,), threshold, np.float32)
  elif background == "prompt":
    if background_emb is None:
      raise ValueError("background='prompt' needs background_emb")
    bg = (np.asarray(z, np.float32) @ np.asarray(background_emb, np.float32))[..., None]
  else:
    raise ValueError(f"unknown background rule {background!r}; use one of {BACKGROUND_MODES}")
  return np.concatenate([bg, sims], axis=-1)


def predict_dense(zdense: np.ndarray, class_emb: np.ndarray, size: Sequence[int], chunk: int = 16,
                  **background) -> np.ndarray:
  """Label maps int32 [B, H, W] from dense embeddings [B, h, w, D]: score, upsample bilinearly, argmax."""
  out = []
  for i in range(0, len(zdense), chunk):
    logits = scores_with_background(zdense[i:i + chunk], class_emb, **background)
    out.append(upsample_bilinear(logits, size).argmax(axis=-1).astype(np.int32))
  return np.concatenate(out) if out else np.zeros((0,) + tuple(size), np.int32)


def predict_broadcast(zimg: np.ndarray, class_emb: np.ndarray, size: Sequence[int], **background) -> np.ndarray:
  """The baseline: each image's global label broadcast to all its pixels, int32 [B, H, W]."""
  labels = scores_with_background(zimg, class_emb, **background).argmax(axis=-1).astype(np.int32)
  return np.broadcast_to(labels[:, None, None], (len(labels),) + tuple(size)).copy()






# ---- the synthetic evaluation ---------------------------------------------------------------------------------

def synthetic_scenes(data_config, *, split: str = "eval_retrieval", image_size: int,
                     num_images: int) -> dict[str, np.ndarray]:
  """The first `num_images` scenes of a synthetic split with masks: {'image_uint8' [N,S,S,3], 'image' (normalised
  like the training input), 'mask' int32 [N,S,S] (0 = background, class + 1)}."""
  from vlm_jax.data import pipeline, transforms  # noqa: PLC0415 (only the synthetic evaluation needs data)

  src = pipeline.make_source(data_config, split, image_size=image_size)
  n = min(int(num_images), len(src))
  els = [src.render(src.scene(i), masks=True) for i in range(n)]
  images = np.stack([e["image"] for e in els])
  cfg = config_lib.plain(data_config)
  mean, std = tuple(cfg.get("mean", transforms.CLIP_MEAN)), tuple(cfg.get("std", transforms.CLIP_STD))
  return {"image_uint8": images, "image": transforms.normalize(images, mean, std),
          "mask": np.stack([e["semantic_mask"] for e in els]).astype(np.int32)}


def evaluate_synthetic(encode_dense_fn: EncodeFn, encode_image_fn: EncodeFn, encode_text_fn: EncodeFn, tokenizer,
                       *, data_config: Mapping | None = None, image_size: int = 64, split: str = "eval_retrieval",
                       num_images: int = 128, background: str = "threshold",
                       threshold: float | str = DEFAULT_THRESHOLD,
                       background_prompts: Sequence[str] = BACKGROUND_PROMPTS,
                       templates: Sequence[str] = zeroshot.SYNTHETIC_TEMPLATES, batch_size: int = 64,
                       prefix: str = "segmentation/", plot_path: str | None = None,
                       data: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
  """Zero-shot segmentation of synthetic scenes over ALL classes + background (see the module docstring).

  `threshold` is δ of the 'threshold' rule: a number, or 'otsu' (default) for Otsu's cut of the dense
  objectness max_c s_c over all locations of the evaluated images (label-free; the same δ serves the baseline).
  `data` (the output of `synthetic_scenes`) skips rendering. Returns, under `prefix`: miou (MaskCLIP dense),
  baseline_miou (global embedding broadcast), chance, pixel_accuracy, baseline_pixel_accuracy, background_iou
  and the threshold used. `plot_path` writes the overlays PNG there.
  """
  from vlm_jax.data import pipeline  # noqa: PLC0415
  from vlm_jax.errors import UserError  # noqa: PLC0415

  if background not in BACKGROUND_MODES:
    raise UserError(f"unknown segmentation background rule {background!r}; use one of {BACKGROUND_MODES}")
  if background == "threshold" and threshold != "otsu":
    try:
      threshold = float(threshold)
    except (TypeError, ValueError):
      raise UserError(f"segmentation threshold must be a number or 'otsu', got {threshold!r}") from None
  names = pipeline.dataset_info(data_config)["class_names"]
  class_emb = class_embeddings(encode_text_fn, tokenizer, names, templates, batch_size,
                                        fix_articles=True)
  if data is None:
    data = synthetic_scenes(data_config, split=split, image_size=image_size, num_images=num_images)
  gt, size, k = data["mask"], data["mask"].shape[1:], len(names) + 1
  zdense = embed_chunked(encode_dense_fn, data["image"], batch_size)
  bg = {"background": background}
  if background == "prompt":
    z = l2_normalize_rows(embed_chunked(encode_text_fn, tokenizer(list(background_prompts)), batch_size))
    bg["background_emb"] = l2_normalize_rows(z.mean(axis=0))
  elif threshold == "otsu":
    bg["threshold"] = otsu_threshold(objectness(zdense, class_emb))
  else:
    bg["threshold"] = threshold
  pred = predict_dense(zdense, class_emb, size, **bg)
  base = predict_broadcast(l2_normalize_rows(embed_chunked(encode_image_fn, data["image"], batch_size)), class_emb,
                           size, **bg)
  conf, conf_base = confusion_matrix(gt, pred, k), confusion_matrix(gt, base, k)
  out = {"miou": mean_iou(conf), "baseline_miou": mean_iou(conf_base), "chance": chance_miou(conf.sum(axis=1)),
         "pixel_accuracy": float(np.trace(conf) / conf.sum()),
         "baseline_pixel_accuracy": float(np.trace(conf_base) / conf_base.sum()),
         "background_iou": float(np.nan_to_num(iou_per_label(conf)[0]))}
  if "threshold" in bg:
    out["threshold"] = bg["threshold"]
  if plot_path:
    write_overlays(plot_path, data["image_uint8"], gt, pred, ["background"] + list(names), baseline=base,
                   title=f"zero-shot segmentation: MaskCLIP mIoU {100 * out['miou']:.1f}% | broadcast baseline "
                         f"{100 * out['baseline_miou']:.1f}% | chance {100 * out['chance']:.1f}%")
  return {prefix + key: v for key, v in out.items()}


# ---- plots ----------------------------------------------------------------------------------------------------

def label_palette(num_labels: int) -> np.ndarray:
  """uint8 [K, 3] colours: label 0 (background) dark grey, the others spread over hue by the golden ratio."""
  cols = [(40, 40, 40)]
  for c in range(1, num_labels):
    r, g, b = colorsys.hsv_to_rgb((c * 0.61803398875) % 1.0, 0.75 if c % 2 else 0.55, 0.95)
    cols.append((int(255 * r), int(255 * g), int(255 * b)))
  return np.asarray(cols, np.uint8)


def _annotate(ax, mask: np.ndarray, names: Sequence[str], min_fraction: float = 0.02) -> None:
  """Writes each non-background label's name at the centroid of its pixels (labels covering ≥ min_fraction)."""
  import matplotlib.patheffects as pe  # noqa: PLC0415
  for label in np.unique(mask):
    ys, xs = np.nonzero(mask == label)
    if label == 0 or len(ys) < min_fraction * mask.size:
      continue
    ax.text(xs.mean(), ys.mean(), names[label], ha="center", va="center", fontsize=6, color="white",
            path_effects=[pe.withStroke(linewidth=1.5, foreground="black")])


def write_overlays(path: str, images: np.ndarray, gt: np.ndarray, pred: np.ndarray, label_names: Sequence[str],
                   *, baseline: np.ndarray | None = None, max_images: int = 6, title: str = "") -> str:
  """PNG with one row per image: image | ground truth | prediction (| baseline), label names on the segments.

  images uint8 [N, H, W, 3]; gt, pred (, baseline) int [N, H, W] label maps with 0 = background and
  `label_names[k]` naming label k. Creates the parent directory; returns `path`.
  """
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  n = min(int(max_images), len(images))
  cols = [("image", None), ("ground truth", gt), ("prediction", pred)]
  if baseline is not None:
    cols.append(("baseline (global)", baseline))
  palette = label_palette(len(label_names))
  fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.2 * n + 0.4), dpi=100, squeeze=False)
  for r in range(n):
    for j, (name, maps) in enumerate(cols):
      ax = axes[r, j]
      if maps is None:
        ax.imshow(images[r], interpolation="nearest")
      else:
        blend = (0.35 * images[r].astype(np.float32) + 0.65 * palette[np.asarray(maps[r])]).astype(np.uint8)
        ax.imshow(blend, interpolation="nearest")
        _annotate(ax, np.asarray(maps[r]), label_names)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=9)
  fig.suptitle(title or "zero-shot segmentation", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


# ---- evaluator builder ----------------------------------------------------------------------------------------

def synthetic_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'segmentation_synthetic'. Options: batch_size, image_size (0: twice the data's), split
  ('eval_retrieval' multi-object scenes, or 'eval_seen' / 'eval_unseen' single objects), num_images,
  background ('threshold' | 'prompt'), threshold, background_prompts, templates, plots (overlays PNG)."""
  import jax  # noqa: PLC0415

  from vlm_jax.embedding import prompts  # noqa: PLC0415
  from vlm_jax.evaluate import options  # noqa: PLC0415
  from vlm_jax.embedding.batched import Embedder  # noqa: PLC0415
  o = options(cfg, {"batch_size": 64, "image_size": 0, "split": "eval_retrieval", "num_images": 128,
                    "background": "threshold", "threshold": DEFAULT_THRESHOLD,
                    "background_prompts": list(BACKGROUND_PROMPTS), "templates": "synthetic", "plots": True},
              "segmentation_synthetic")
  templates = prompts.load_templates(o["templates"])
  image_size = int(o["image_size"] or 2 * int(data_config["image_size"]))
  enc_dense = Embedder(model, "encode_dense", o["batch_size"])
  enc_img = Embedder(model, "encode_image", o["batch_size"])
  enc_txt = Embedder(model, "encode_text", o["batch_size"])
  plot_path = None
  if plot_dir and o["plots"] and jax.process_index() == 0:
    plot_path = os.path.join(plot_dir, "segmentation_overlays.png")
  cache: dict = {}

  def run(variables) -> dict:
    if "data" not in cache:  # rendered once, on the first evaluation
      cache["data"] = synthetic_scenes(data_config, split=o["split"], image_size=image_size,
                                       num_images=int(o["num_images"]))
    return evaluate_synthetic(lambda x: enc_dense(variables, x), lambda x: enc_img(variables, x),
                              lambda t: enc_txt(variables, t), tokenizer, data_config=data_config,
                              background=o["background"], threshold=o["threshold"],
                              background_prompts=tuple(o["background_prompts"]), templates=templates,
                              batch_size=int(o["batch_size"]), plot_path=plot_path, data=cache["data"])
  return run
