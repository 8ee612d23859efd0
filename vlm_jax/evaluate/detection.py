"""COCO-style box AP for (open-vocabulary) detection, COCO JSON export, detection plots, and the 'detection'
evaluator.

Metric (the COCO detection protocol, Lin et al. 2014; pycocotools `COCOeval` with iouType='bbox', area 'all',
maxDets 100 — reimplemented in numpy and tested equal to pycocotools): per image and class, detections are sorted
by score (stable) and cut to `max_dets`; each, in that order, is matched to the not-yet-matched ground-truth box of
highest IoU ≥ t (IoU of xyxy boxes, no +1; ties go to the later box, as pycocotools). Per class, over all images,
detections are ranked by score; precision p(r) is made monotone (p(r) = max_{r' ≥ r} p(r')) and read at the 101
recall points 0, 0.01, …, 1 (0 beyond the highest recall reached):

    AP_c(t) = 1/101 Σ_{r ∈ {0, .01, …, 1}} p_c^interp(r),     AP = mean over c and t ∈ {.50, .55, …, .95}

Classes without ground truth in the evaluated images are left out (COCO's −1). AP50 / AP75: t = .5 / .75 only.
Class groups (open-vocabulary detection, Zareian et al. 2021 OVR-CNN; Gu et al. 2022 ViLD): AP_base, AP50_base,
AP_novel, AP50_novel average over the classes of each group; APr = AP_novel, the analogue of LVIS's rare-class AP
that ViLD reports for its novel (rare) classes (AP@[.5:.95] over the novel group). A metric with no class to
average over is −1 (as pycocotools).

Inputs: detections as a list (one per image) of {'boxes' [D, 4] xyxy pixels, 'scores' [D], 'classes' [D]} or one
dict of stacked arrays [N, D, …] with an optional 'valid' [N, D] mask; ground truth likewise with
{'boxes', 'classes'} (+ 'valid'). `coco_json` writes both in COCO format (category id = class id + 1, image id =
index + 1, bbox [x, y, w, h]).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping, Sequence

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 100


# ---- inputs ---------------------------------------------------------------------------------------------------

def per_image(items, keys: Sequence[str]) -> list[dict]:
  """A list of per-image dicts of numpy arrays from a list of dicts or a dict of stacked [N, D, …] arrays with an
  optional 'valid' [N, D] mask (rows where it is False are dropped)."""
  if isinstance(items, Mapping):
    n = len(items[keys[0]])
    items = [{k: np.asarray(items[k])[i] for k in list(keys) + (["valid"] if "valid" in items else [])}
             for i in range(n)]
  out = []
  for it in items:
    keep = np.asarray(it["valid"], bool).reshape(-1) if "valid" in it else None
    row = {}
    for k in keys:
      v = np.asarray(it[k])
      row[k] = v[keep] if keep is not None else v
    row["boxes"] = row["boxes"].reshape(-1, 4).astype(np.float64)
    row["classes"] = row["classes"].reshape(-1).astype(np.int64)
    if "scores" in row:
      row["scores"] = row["scores"].reshape(-1).astype(np.float64)
    out.append(row)
  return out


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU [N, M] of xyxy boxes (float64, 0 for an empty union)."""
  a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# ---- matching and AP ------------------------------------------------------------------------------------------

def match_image(dt_boxes, dt_scores, gt_boxes, iou_thresholds=IOU_THRESHOLDS, max_dets: int = MAX_DETS):
  """One image and class: (scores [D'] of the kept detections in rank order, matched bool [T, D'])."""
  order = np.argsort(-np.asarray(dt_scores), kind="mergesort")[:max_dets]
  scores = np.asarray(dt_scores)[order]
  ious = box_iou_np(np.asarray(dt_boxes)[order], gt_boxes)  # [D', G]
  t_n, (d_n, g_n) = len(iou_thresholds), ious.shape
  matched = np.zeros((t_n, d_n), bool)
  for ti, t in enumerate(iou_thresholds):
    taken = np.zeros(g_n, bool)
    thr = min(t, 1 - 1e-10)
    for d in range(d_n):
      cand = np.where(~taken & (ious[d] >= thr), ious[d], -1.0)
      if g_n == 0 or cand.max() < 0:
        continue
      g = g_n - 1 - int(np.argmax(cand[::-1]))  # the highest IoU; the later box on ties (pycocotools)
      taken[g] = True
      matched[ti, d] = True
  return scores, matched


def precision_curve(scores: np.ndarray, matched: np.ndarray, num_gt: int) -> np.ndarray:
  """Interpolated precision [T, 101] at the COCO recall points of one class (detections of all images)."""
  order = np.argsort(-scores, kind="mergesort")
  tp = np.cumsum(matched[:, order], axis=1).astype(np.float64)
  fp = np.cumsum(~matched[:, order], axis=1).astype(np.float64)
  out = np.zeros((matched.shape[0], len(RECALL_POINTS)))
  for t in range(matched.shape[0]):
    if not len(order):
      continue
    rc = tp[t] / num_gt
    pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
    pr = np.maximum.accumulate(pr[::-1])[::-1]
    idx = np.searchsorted(rc, RECALL_POINTS, side="left")
    ok = idx < len(pr)
    out[t, ok] = pr[idx[ok]]
  return out


def per_class_precision(detections, ground_truth, *, class_ids: Sequence[int] | None = None,
                        iou_thresholds=IOU_THRESHOLDS, max_dets: int = MAX_DETS) -> dict[int, np.ndarray]:
  """{class id: interpolated precision [T, 101]} for every class with ground truth (module docstring)."""
  dts = per_image(detections, ("boxes", "scores", "classes"))
  gts = per_image(ground_truth, ("boxes", "classes"))
  if len(dts) != len(gts):
    raise ValueError(f"{len(dts)} images of detections but {len(gts)} of ground truth")
  present = sorted({int(c) for g in gts for c in g["classes"]})
  classes = present if class_ids is None else [int(c) for c in class_ids if int(c) in set(present)]
  out = {}
  for c in classes:
    scores, matched, num_gt = [], [], 0
    for dt, gt in zip(dts, gts):
      g = gt["boxes"][gt["classes"] == c]
      d = dt["classes"] == c
      num_gt += len(g)
      s, m = match_image(dt["boxes"][d], dt["scores"][d], g, iou_thresholds, max_dets)
      scores.append(s)
      matched.append(m)
    out[c] = precision_curve(np.concatenate(scores), np.concatenate(matched, axis=1), num_gt)
  return out


def _mean(curves: list[np.ndarray], t_index=None) -> float:
  if not curves:
    return -1.0
  stack = np.stack(curves)  # [K, T, R]
  return float(stack.mean() if t_index is None else stack[:, t_index].mean())


def average_precision(detections, ground_truth, *, class_groups: Mapping[str, Sequence[int]] | None = None,
                      max_dets: int = MAX_DETS, prefix: str = "") -> dict[str, float]:
  """COCO AP, AP50, AP75 over all classes with ground truth, and AP_<group>, AP50_<group> per class group (plus
  APr = AP_novel when a 'novel' group is given); −1 where no class has ground truth. Keys start with `prefix`."""
  prec = per_class_precision(detections, ground_truth, max_dets=max_dets)
  t50 = int(np.argmin(np.abs(IOU_THRESHOLDS - 0.5)))
  t75 = int(np.argmin(np.abs(IOU_THRESHOLDS - 0.75)))
  allc = list(prec.values())
  out = {"AP": _mean(allc), "AP50": _mean(allc, t50), "AP75": _mean(allc, t75)}
  for name, ids in (class_groups or {}).items():
    curves = [prec[int(c)] for c in ids if int(c) in prec]
    out[f"AP_{name}"] = _mean(curves)
    out[f"AP50_{name}"] = _mean(curves, t50)
  if class_groups and "novel" in class_groups:
    out["APr"] = out["AP_novel"]
  return {prefix + k: v for k, v in out.items()}


# ---- COCO JSON ------------------------------------------------------------------------------------------------

def _xywh(boxes: np.ndarray) -> list[list[float]]:
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).tolist()


def coco_json(detections, ground_truth=None, *, class_names: Sequence[str] | None = None,
              image_hw: tuple[int, int] | None = None) -> tuple[dict | None, list[dict]]:
  """(ground-truth dataset dict or None, detection results list) in COCO format: category id = class + 1, image id
  = index + 1, bbox [x, y, w, h], area w·h, iscrowd 0; loadable by pycocotools' COCO / COCO.loadRes."""
  dts = per_image(detections, ("boxes", "scores", "classes"))
  results = []
  for i, dt in enumerate(dts):
    for box, s, c in zip(_xywh(dt["boxes"]), dt["scores"], dt["classes"]):
      results.append({"image_id": i + 1, "category_id": int(c) + 1, "bbox": box, "score": float(s)})
  if ground_truth is None:
    return None, results
  gts = per_image(ground_truth, ("boxes", "classes"))
  used = sorted({int(c) for g in gts for c in g["classes"]} | {int(c) for d in dts for c in d["classes"]})
  n_classes = len(class_names) if class_names is not None else (max(used) + 1 if used else 0)
  images, anns = [], []
  for i, gt in enumerate(gts):
    img = {"id": i + 1}
    if image_hw is not None:
      img.update(height=int(image_hw[0]), width=int(image_hw[1]))
    images.append(img)
    for box, c in zip(_xywh(gt["boxes"]), gt["classes"]):
      anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "bbox": box,
                   "area": float(box[2] * box[3]), "iscrowd": 0})
  cats = [{"id": c + 1, "name": class_names[c] if class_names is not None else str(c)} for c in range(n_classes)]
  return {"images": images, "annotations": anns, "categories": cats}, results


def write_coco_json(path: str, detections, ground_truth=None, **kwargs) -> str:
  """Writes {'ground_truth': …, 'detections': […]} (see `coco_json`) to `path`; returns it."""
  gt, res = coco_json(detections, ground_truth, **kwargs)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"ground_truth": gt, "detections": res}, f)
  return path


# ---- plots ----------------------------------------------------------------------------------------------------

def draw_detections(path: str, images: np.ndarray, detections, class_names: Sequence[str], *, ground_truth=None,
                    novel: Sequence[int] = (), score_threshold: float = 0.3, max_per_image: int = 10,
                    max_images: int = 8, title: str = "") -> str:
  """PNG grid of images with the detections scoring ≥ `score_threshold` (at most `max_per_image`), labelled
  '<class> <score>' (novel classes in orange, base in cyan) and ground-truth boxes dashed white. Returns `path`."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.patheffects as pe  # noqa: PLC0415
  import matplotlib.pyplot as plt  # noqa: PLC0415
  dts = per_image(detections, ("boxes", "scores", "classes"))
  gts = per_image(ground_truth, ("boxes", "classes")) if ground_truth is not None else None
  n = min(int(max_images), len(images))
  cols = min(4, max(n, 1))
  rows = max(1, -(-n // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.4), dpi=100, squeeze=False)
  novel = {int(c) for c in novel}
  for i, ax in enumerate(axes.reshape(-1)):
    ax.set_xticks([])
    ax.set_yticks([])
    if i >= n:
      ax.axis("off")
      continue
    ax.imshow(images[i], interpolation="nearest")
    if gts is not None:
      for x0, y0, x1, y1 in gts[i]["boxes"]:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=0.8, ls="--"))
    dt = dts[i]
    order = np.argsort(-dt["scores"], kind="mergesort")[:max_per_image]
    for j in order:
      if dt["scores"][j] < score_threshold:
        continue
      (x0, y0, x1, y1), c = dt["boxes"][j], int(dt["classes"][j])
      colour = "tab:orange" if c in novel else "cyan"
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.2))
      name = class_names[c] if 0 <= c < len(class_names) else str(c)
      ax.text(x0, y0, f"{name} {dt['scores'][j]:.2f}", fontsize=5, color=colour, va="bottom",
              path_effects=[pe.withStroke(linewidth=1.2, foreground="black")])
  fig.suptitle(title or "detections (cyan: base, orange: novel; dashed: ground truth)", fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


# ---- evaluator ------------------------------------------------------------------------------------------------

def evaluate_detector(detect_fn: Callable[[np.ndarray], Mapping[str, np.ndarray]], images: np.ndarray,
                      ground_truth, *, batch_size: int = 32, class_groups=None, max_dets: int = MAX_DETS,
                      prefix: str = "detection/", images_uint8: np.ndarray | None = None,
                      class_names: Sequence[str] | None = None, plot_path: str | None = None,
                      json_path: str | None = None) -> dict[str, float]:
  """Runs `detect_fn(images [b, H, W, 3]) -> {'boxes' [b, D, 4], 'scores' [b, D], 'classes' [b, D] (, 'valid')}`
  over `images` in fixed-size batches (the last padded: one compilation), scores it with `average_precision`,
  optionally draws `plot_path` and writes COCO JSON to `json_path`. Returns metrics under `prefix`."""
  parts = []
  for s in range(0, len(images), batch_size):
    x = images[s:s + batch_size]
    n = len(x)
    if n < batch_size:
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, 0)])
    out = {k: np.asarray(v)[:n] for k, v in detect_fn(x).items() if k in ("boxes", "scores", "classes", "valid")}
    parts.append(out)
  dets = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  metrics = average_precision(dets, ground_truth, class_groups=class_groups, max_dets=max_dets, prefix=prefix)
  names = list(class_names) if class_names is not None else []
  if plot_path and images_uint8 is not None:
    novel = (class_groups or {}).get("novel", ())
    draw_detections(plot_path, images_uint8, dets, names, ground_truth=ground_truth, novel=novel,
                    title=f"detections: AP50 {100 * metrics[prefix + 'AP50']:.1f}"
                          + (f" | novel AP50 {100 * metrics[prefix + 'AP50_novel']:.1f}"
                             if prefix + "AP50_novel" in metrics else ""))
  if json_path:
    write_coco_json(json_path, dets, ground_truth, class_names=names or None, image_hw=images.shape[1:3])
  return metrics


def synthetic_scenes(data_config, *, split: str = "val", num_images: int = 128, image_size: int = 0) -> dict:
  """Held-out open-vocabulary scenes (eval view: base and novel objects labelled) as arrays: image (normalised),
  image_uint8, ground truth {'boxes', 'classes', 'valid'}, class groups {'base', 'novel'}, class names."""
  from vlm_jax.data import synthetic_scenes as scenes  # noqa: PLC0415
  from vlm_jax.data import transforms  # noqa: PLC0415
  cfg = dict(data_config or {})
  size = int(image_size or cfg.get("image_size", 64))
  arr = scenes.scene_arrays(split, int(num_images), seed=int(cfg.get("seed", 0)), image_size=size, view="eval")
  mean, std = tuple(cfg.get("mean", transforms.CLIP_MEAN)), tuple(cfg.get("std", transforms.CLIP_STD))
  groups = scenes.class_split()
  return {"image": transforms.normalize(arr["image"], mean, std), "image_uint8": arr["image"],
          "ground_truth": {"boxes": arr["boxes"], "classes": arr["classes"], "valid": arr["valid"]},
          "class_groups": {"base": groups["base"].tolist(), "novel": groups["novel"].tolist()},
          "class_names": scenes.class_names()}


def detection_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'detection': COCO AP on held-out open-vocabulary scenes (module docstring). The model must
  have a method (option `method`, default 'detect') with `model.apply(variables, images, method=…)` ->
  {'boxes' [B, D, 4] xyxy pixels, 'scores' [B, D], 'classes' [B, D] (, 'valid' [B, D])}: the final detections
  over all (base + novel) classes. Options: split ('val' | 'test'), num_images, image_size (0: the data's),
  batch_size, max_dets, plots (plots/detections.png), coco_json (DIR/detections_coco.json next to plots/).
  The scenes are `data_config`'s (seed, image_size, mean / std); COCO-format data (`data_config['coco']`, a
  distillation run's) is a `UserError`: the distillation command evaluates it."""
  import jax  # noqa: PLC0415

  from vlm_jax.errors import UserError  # noqa: PLC0415
  from vlm_jax.evaluate import options  # noqa: PLC0415
  del tokenizer
  if dict(data_config or {}).get("coco"):
    raise UserError("the 'detection' evaluator scores synthetic open-vocabulary scenes, but this run's data is "
                    "COCO-format (data.coco): its own command evaluates it (rerunning `python -m vlm_jax.distill` "
                    "on its workdir resumes at the last step and runs its COCO evaluator)")
  o = options(cfg, {"split": "val", "num_images": 128, "image_size": 0, "batch_size": 32, "max_dets": MAX_DETS,
                    "method": "detect", "plots": True, "coco_json": True}, "detection")
  if not hasattr(model, o["method"]):
    raise UserError(f"the detection evaluator needs a model with a `{o['method']}` method (images -> boxes, "
                    f"scores, classes); {type(model).__name__} has none")
  detect = jax.jit(lambda v, x: model.apply(v, x, method=o["method"]))
  main = jax.process_index() == 0
  plot_path = os.path.join(plot_dir, "detections.png") if plot_dir and o["plots"] and main else None
  json_path = (os.path.join(os.path.dirname(os.path.abspath(plot_dir)), "detections_coco.json")
               if plot_dir and o["coco_json"] and main else None)
  cache: dict = {}

  def run(variables) -> dict:
    if "data" not in cache:  # rendered once, on the first evaluation
      cache["data"] = synthetic_scenes(data_config, split=o["split"], num_images=int(o["num_images"]),
                                       image_size=int(o["image_size"]))
    d = cache["data"]
    return evaluate_detector(lambda x: jax.device_get(detect(variables, x)), d["image"], d["ground_truth"],
                             batch_size=int(o["batch_size"]), class_groups=d["class_groups"],
                             max_dets=int(o["max_dets"]), images_uint8=d["image_uint8"],
                             class_names=d["class_names"], plot_path=plot_path, json_path=json_path)
  return run
