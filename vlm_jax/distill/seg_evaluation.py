"""Open-vocabulary segmentation metrics of a distillation student, of its MaskCLIP teacher and of the broadcast
baseline, on the evaluation view of the scenes (every object labelled, base and novel).

Prediction over background + the test vocabulary (base + novel classes; the student's `segment` logits, upsampled
bilinearly to the image as `evaluate.segmentation` does, argmax). One confusion matrix over the labels
{background, every vocabulary class} accumulated over the evaluation images (mmseg / MaskCLIP's rule), then

    mIoU_base  = mean IoU over the base classes present in ground truth or prediction
    mIoU_novel = the same over the novel classes
    hIoU       = 2 · mIoU_base · mIoU_novel / (mIoU_base + mIoU_novel)    (the harmonic mean of zero-shot
                 segmentation, Xian et al. 2019 / Bucher et al. 2019's ZS3Net protocol)
    miou (all labels present, background included), pixel_accuracy, background_iou.

The teacher (`teacher/…`) is MaskCLIP as `evaluate.segmentation` runs it (dense value-path embeddings of the image
resized to `dense_size`, centred-score background threshold by Otsu's cut over the evaluation images);
`teacher_refined/…` adds MaskCLIP's key smoothing and prompt denoising (the pseudo-labels' rule, `pseudo_labels`);
`broadcast/…` is the global image embedding's label on every pixel (the same threshold). plots/ gets
segmentation_overlays.png: image | ground truth | student | teacher.
"""

from __future__ import annotations

import os

import numpy as np

from vlm_jax.evaluate import segmentation as seg


def scores(conf: np.ndarray, novel: np.ndarray, test_mask: np.ndarray) -> dict[str, float]:
  """Metrics (module docstring) of a confusion matrix over labels {0 = background, c + 1}; `novel`, `test_mask`
  are bool [C] over the vocabulary."""
  iou = seg.iou_per_label(conf)
  cls = iou[1:]
  base_iou = cls[test_mask & ~novel]
  novel_iou = cls[test_mask & novel]
  b = float(np.nanmean(base_iou)) if np.any(~np.isnan(base_iou)) else 0.0
  n = float(np.nanmean(novel_iou)) if np.any(~np.isnan(novel_iou)) else 0.0
  return {"miou_base": b, "miou_novel": n, "hiou": 2 * b * n / (b + n) if b + n > 0 else 0.0,
          "miou": seg.mean_iou(conf), "pixel_accuracy": float(np.trace(conf) / max(conf.sum(), 1)),
          "background_iou": float(np.nan_to_num(iou[0]))}


def to_vocab(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """Labels over (background, classes[j]) → labels over (background, vocabulary class id)."""
  lut = np.concatenate([[0], np.asarray(classes) + 1]).astype(np.int32)
  return lut[labels]


def eval_data(source, num_images: int | None = None) -> dict:
  n = len(source) if not num_images else min(int(num_images), len(source))
  idx = range(n)
  return {"image_uint8": source.images(idx), "mask": source.masks(idx)}


def teacher_metrics(teacher, source, class_emb: np.ndarray, data: dict, *, dense_size: int,
                    refine: dict) -> tuple[dict, np.ndarray]:
  """{'teacher/segmentation/…', 'teacher_refined/segmentation/…', 'broadcast/segmentation/…'} and the teacher's
  label maps (vocabulary labels) for the overlays."""
  from vlm_jax.distill import pseudo_labels as pl  # noqa: PLC0415
  test = np.nonzero(source.test_mask)[0]
  emb = class_emb[test]
  gt, size, k = data["mask"], data["mask"].shape[1:], len(source.names) + 1
  dense = teacher.dense(data["image_uint8"], dense_size)
  delta = seg.otsu_threshold(seg.objectness(dense, emb))
  out = {}
  preds = {"teacher": to_vocab(seg.predict_dense(dense, emb, size, threshold=delta), test)}
  keys = pl.teacher_keys(teacher, data["image_uint8"], dense_size) if refine.get("key_smoothing") else None
  preds["teacher_refined"] = to_vocab(pl.pseudo_labels(dense, emb, size, threshold=delta, keys=keys, **refine), test)
  zimg = teacher.model.encode_image(teacher.normalize(data["image_uint8"]))
  preds["broadcast"] = to_vocab(seg.predict_broadcast(zimg, emb, size, threshold=delta), test)
  for who, p in preds.items():
    m = scores(seg.confusion_matrix(gt, p, k), source.novel, source.test_mask)
    out.update({f"{who}/segmentation/{key}": v for key, v in m.items()})
  out["teacher/segmentation/threshold"] = float(delta)
  return out, preds["teacher"]


def segment_fn(model):
  """jit(variables, images) → the student's test-class logits (`DenseSegmenter.segment`)."""
  import jax  # noqa: PLC0415
  return jax.jit(lambda v, x: model.apply(v, x, method="segment"))


def predict(segment, variables, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Label maps int32 [N, H, W] (0 = background, class id + 1) of normalised images: logits upsampled bilinearly
  to the image, argmax."""
  import jax  # noqa: PLC0415
  preds = []
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size]
    n = len(x)
    if n < batch_size:  # one compiled shape
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    logits = np.asarray(jax.device_get(segment(variables, x)))[:n]
    preds.append(seg.upsample_bilinear(logits, images.shape[1:3]).argmax(axis=-1).astype(np.int32))
  return np.concatenate(preds)


def make_evaluator(model, source, data: dict, *, mean, std, batch_size: int = 32, plot_dir: str | None = None,
                   teacher_pred: np.ndarray | None = None, title: str = "student"):
  """fn(variables) → {'segmentation/…'} of the student (module docstring); writes the overlays."""
  import jax  # noqa: PLC0415

  from vlm_jax.data import transforms  # noqa: PLC0415
  segment = segment_fn(model)
  images = transforms.normalize(data["image_uint8"], tuple(mean), tuple(std))
  gt, k = data["mask"], len(source.names) + 1

  def run(variables) -> dict:
    pred = predict(segment, variables, images, batch_size)
    m = scores(seg.confusion_matrix(gt, pred, k), source.novel, source.test_mask)
    if plot_dir and jax.process_index() == 0:
      names = ["background"] + [f"{n}{'*' if nv else ''}" for n, nv in zip(source.names, source.novel)]
      seg.write_overlays(os.path.join(plot_dir, "segmentation_overlays.png"), data["image_uint8"],
                         np.maximum(gt, 0), pred, names,  # ignored pixels (−1, a mask folder's 255): unlabelled
                         baseline=teacher_pred,
                         title=f"{title}: mIoU base {100 * m['miou_base']:.1f} | novel (*) "
                               f"{100 * m['miou_novel']:.1f} | hIoU {100 * m['hiou']:.1f} (last column: teacher)")
    return {f"segmentation/{key}": v for key, v in m.items()}
  return run
