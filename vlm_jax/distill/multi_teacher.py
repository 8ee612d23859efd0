"""Multi-teacher distillation of an open-vocabulary segmenter: MaskCLIP+ from several frozen teachers at once.

  python -m vlm_jax.distill --config=configs/distill/multi_teacher.py:tiny --workdir=DIR \
      --config.teacher.checkpoints='("RUN_A", "RUN_B")' [--config.method.weighting=confidence]

Multi-teacher knowledge distillation trains one student from K teachers (You et al. 2017, "Learning from Multiple
Teacher Networks", KDD: the student matches the teachers' averaged soft outputs; Zhang et al. 2022, "Confidence-Aware
Multi-Teacher Knowledge Distillation" (CA-MKD), ICASSP: a sample-wise weight per teacher instead of the plain
average, larger for the teachers whose predictions are more reliable). Here each teacher k is a frozen VLM whose
MaskCLIP predictions on the training images are its pixel pseudo-labels ŷ_k(x), exactly as single-teacher MaskCLIP+
(Zhou et al. 2022, §3.3) makes them — `segmentation.teacher_pseudo_labels`, the same function and on-disk cache
(key smoothing / prompt denoising per `method`, background by Otsu's cut, no mask label read). The student
(`models.segmentation.multi_teacher`) is one backbone (the first teacher's image tower, frozen, as MaskCLIP+'s) + FPN
+ semantic-FPN head with one projection head per teacher, head k classifying against teacher k's fixed class text
embeddings, so ℓ_k(x) is comparable to teacher k. The loss (`seg_loss.multi_teacher_cross_entropy`):

    L = 1/|P| Σ_{x ∈ P} Σ_k w_k(x) · CE(ℓ_k(x), ŷ_k(x))                                                        (1)

with the weighting rule `method.weighting` and the prior π = `method.teacher_weights` (normalised to sum 1):

    'fixed'       w_k = π_k                                                     (You et al. 2017: a fixed average)
    'confidence'  w_k(x) = π_k exp(c_k(x)/T) / Σ_j π_j exp(c_j(x)/T),   c_k(x) = max_c p^k_c(x)                 (2)

p^k(x) is teacher k's MaskCLIP class distribution at pixel x, as its pseudo-label is made: softmax(100 · s(x)) of the
centred scores with the background score δ (`pseudo_labels`, Eq. 1), prompt-denoised, key-smoothed (then
renormalised) when `method.key_smoothing`, upsampled bilinearly to the image (`confidence_maps`, cached like the
labels); T = `method.weight_temperature`. CA-MKD's reliability is computed from the ground-truth labels (a teacher's
cross-entropy against them); MaskCLIP+ is annotation-free, so Eq. (2) replaces it with each teacher's own
confidence — per pixel and per sample, as CA-MKD's weights are per sample. T → ∞ gives the fixed weights; T → 0
follows the most confident teacher at every pixel.

Prediction (evaluation): the weighted mean of the heads' class probabilities, p(x) = Σ_k w_k softmax(ℓ_k(x)), with the
fixed π under 'fixed' and, under 'confidence', Eq. (2) on the heads' own confidences max_c softmax(ℓ_k(x))_c (no
teacher runs at test time). Results (DIR/results.json and the last stdout line): `segmentation/…` (base / novel /
harmonic mIoU, pixel accuracy) of the multi-teacher student; for each teacher k its MaskCLIP numbers
`teacher_k/…` (`teacher_k_refined/…`, `broadcast_k/…`); with `method.single_baselines` the same student trained on
teacher k alone for the same steps (π one-hot on k, rule 'fixed'; DIR/baselines/single_k) as `single_k/…`.
Whichever wins is what the numbers say. single_1 is the single-teacher MaskCLIP+ student of teacher 1 (tested
bit for bit).

Checks (`check`, before anything runs): ≥ 2 teachers, one non-negative weight each (not all 0), a known weighting, a
positive temperature; at load (`check_vocabulary`): every teacher must be able to name the same classes — a teacher
whose tokenizer maps a class name to its unknown token has a different class vocabulary (its text embedding of
that class would be the unknown word's) and is refused.
"""

from __future__ import annotations

import json
import math
import os

import ml_collections
import numpy as np

from vlm_jax import config_lib
from vlm_jax.distill import seg_data, segmentation, teacher_cache
from vlm_jax.errors import UserError

WEIGHTINGS = ("fixed", "confidence")


def teacher_paths(config) -> tuple[str, ...]:
  paths = (config.teacher.get("checkpoints") or ()) if hasattr(config.teacher, "get") else ()
  return (paths,) if isinstance(paths, str) else tuple(paths)


def check(config) -> None:
  """Preflight of `method` / `teacher.checkpoints` (module docstring); one `UserError` line per mistake."""
  m = config.method
  paths = teacher_paths(config)
  if len(paths) < 2 or not all(isinstance(p, str) and p for p in paths):
    raise UserError(f"multi_teacher needs at least 2 teacher run directories in teacher.checkpoints, got {paths!r}")
  if m.get("weighting") not in WEIGHTINGS:
    raise UserError(f"unknown method.weighting {m.get('weighting')!r}; use one of {WEIGHTINGS}")
  weights = m.get("teacher_weights")
  try:
    weights = tuple(float(w) for w in weights)
  except (TypeError, ValueError):
    raise UserError(f"method.teacher_weights must be a tuple of numbers, got {weights!r}") from None
  if len(weights) != len(paths):
    raise UserError(f"method.teacher_weights has {len(weights)} weight(s) for {len(paths)} teachers; give one each")
  if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
    raise UserError(f"method.teacher_weights must be non-negative (and not all 0), got {weights}")
  if not float(m.get("weight_temperature", 1.0)) > 0:
    raise UserError(f"method.weight_temperature must be > 0, got {m.get('weight_temperature')}")


def class_vocabulary(teacher, names) -> tuple[str, ...]:
  """The class names `teacher` can name: those its tokenizer encodes without its unknown token."""
  tok = teacher.tokenizer
  unk = getattr(tok, "unk_id", None)
  if unk is None:
    return tuple(names)
  return tuple(n for n in names if unk not in tok.encode(str(n)))


def check_vocabulary(teachers, paths, names) -> None:
  vocabs = [set(class_vocabulary(t, names)) for t in teachers]
  for k in range(1, len(teachers)):
    if vocabs[k] != vocabs[0]:
      diff = sorted(vocabs[k] ^ vocabs[0])
      raise UserError(f"teachers {paths[0]} and {paths[k]} have different class vocabularies (only one can name "
                      f"{diff[:5]}{' …' if len(diff) > 5 else ''}); multi-teacher distillation needs one label space")


def confidence_maps(dense: np.ndarray, class_emb: np.ndarray, size, *, threshold: float, keys=None,
                    pd_thresh: float = 0.0, key_smoothing: bool = False, ks_thresh: float = 1.0) -> np.ndarray:
  """c(x) = max_c p_c(x) [B, H, W] of a teacher's MaskCLIP class distribution (Eq. 2 of the module docstring): the
  pseudo-labels' refinements (`pseudo_labels`), as probabilities, upsampled bilinearly to `size`."""
  from vlm_jax.distill import pseudo_labels as pl  # noqa: PLC0415
  from vlm_jax.evaluate import segmentation as seg  # noqa: PLC0415
  s = pl.prompt_denoise(seg.scores_with_background(dense, class_emb, threshold=threshold), pd_thresh)
  if key_smoothing:
    p = pl.key_smooth(s, keys, ks_thresh)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-12)
  else:
    p = pl._softmax(pl.SCALE * np.where(np.isfinite(s), s, -1e9))  # noqa: SLF001 (the refinements' own softmax)
  return seg.upsample_bilinear(p.astype(np.float32), size).max(axis=-1)


def teacher_confidence(config, teacher, source, class_emb: np.ndarray) -> np.ndarray:
  """float16 [N, S, S] teacher confidences c(x) on the training images, cached on disk beside its pseudo-labels
  (same dense stage: `segmentation.teacher_dense`). Reads images only."""
  s = int(config.data.image_size)
  emb = class_emb[np.nonzero(source.test_mask)[0]]
  refine = segmentation.refine_settings(config)
  stage1, delta, base = segmentation.teacher_dense(config, teacher, source, class_emb)

  def confidence(idx):
    keys = stage1["keys"][idx] if refine["key_smoothing"] else None
    c = confidence_maps(stage1["dense"][idx], emb, (s, s), threshold=delta, keys=keys, **refine)
    return {"confidence": c.astype(np.float16)}
  settings = {**base, "what": "maskclip_confidence", "templates": str(config.teacher.templates), "refine": refine,
              "threshold": delta, "classes": np.nonzero(source.test_mask)[0].tolist()}
  return teacher_cache.TeacherCache(config.teacher_cache.dir, settings, len(source), confidence,
                                    chunk=int(config.teacher_cache.chunk)).load(progress=True)["confidence"]


def resolve(config, teachers) -> ml_collections.ConfigDict:
  """`config` with teacher 1's placeholders filled (`segmentation.resolve`: backbone, normalisation), the absolute
  teacher paths and the whole student in `model.teachers` (what the run records in config.json)."""
  c = ml_collections.ConfigDict(config_lib.plain(config))
  c.teacher.checkpoint = teachers[0].path
  c = segmentation.resolve(c, teachers[0])
  c.teacher.checkpoints = tuple(t.path for t in teachers)
  c.model.teachers = ml_collections.ConfigDict({
      "embed_dims": tuple(int(t.embed_dim) for t in teachers),
      "weights": tuple(float(w) for w in config.method.teacher_weights), "weighting": str(config.method.weighting),
      "temperature": float(config.method.get("weight_temperature", 1.0))})
  return c


def student_config(config, num_classes: int, *, weights=None, weighting=None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config_lib.plain(config))
  c.model.num_classes = int(num_classes)
  c.model.classifier = "text"
  if weights is not None:
    c.model.teachers.weights, c.model.teachers.weighting = tuple(float(w) for w in weights), str(weighting)
    c.method.teacher_weights, c.method.weighting = c.model.teachers.weights, c.model.teachers.weighting
  return c


def train_one(config, workdir: str, *, labels, confidences, class_embs, train_src, eval_src, eval_data,
              teacher_pred, quiet: bool) -> dict:
  """One loop run of the multi-teacher student (weights and rule from `config.model.teachers`) into `workdir`."""
  import functools  # noqa: PLC0415

  from vlm_jax import runs  # noqa: PLC0415
  from vlm_jax.data import transforms  # noqa: PLC0415
  from vlm_jax.distill import seg_evaluation  # noqa: PLC0415
  from vlm_jax.distill.run import _compose  # noqa: PLC0415
  from vlm_jax.distill.seg_loss import multi_teacher_cross_entropy  # noqa: PLC0415
  from vlm_jax.models.segmentation import multi_teacher as model_lib  # noqa: PLC0415
  model = model_lib.build(config.model)
  t = config.model.teachers
  rule = str(t.weighting)
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  test_mask = np.asarray(train_src.test_mask, bool)

  def make_row(i: int) -> dict:
    row = {"image": transforms.normalize(train_src.image(i), mean, std),
           "labels": np.stack([y[i] for y in labels], -1).astype(np.int32)}
    if rule == "confidence":
      row["teacher_confidence"] = np.stack([c[i] for c in confidences], -1).astype(np.float32)
    return row

  def make_data(process_index: int, process_count: int):
    return seg_data.train_iterator(len(train_src), make_row, global_batch_size=int(config.batch_size),
                                   seed=int(config.seed), process_index=process_index, process_count=process_count)

  def constants(variables):
    variables = dict(variables)
    variables["constants"] = {"class_embeddings": np.asarray(class_embs[0], np.float32), "train_mask": test_mask,
                              "test_mask": test_mask,
                              **{f"teacher{k + 1}": {"class_embeddings": np.asarray(e, np.float32)}
                                 for k, e in enumerate(class_embs) if k}}
    return variables
  ev = dict(config_lib.plain(config.evals).get("segmentation") or {})
  evaluator = seg_evaluation.make_evaluator(model, eval_src, eval_data, mean=mean, std=std,
                                            batch_size=int(ev.get("batch_size", 32)),
                                            plot_dir=os.path.join(workdir, "plots") if ev.get("plots", True) else None,
                                            teacher_pred=teacher_pred, title=config.name)
  loss_fn = functools.partial(multi_teacher_cross_entropy, prior=tuple(float(w) for w in t.weights), rule=rule,
                              temperature=float(t.temperature))
  from vlm_jax.train import loop  # noqa: PLC0415
  return loop.train(config, workdir, make_data=make_data, model=model, loss_fn=loss_fn,
                    evaluators={"segmentation": evaluator}, init_fn=_compose(runs.initializer(config.get("init")),
                                                                             constants), quiet=quiet)


def _renamed(metrics: dict, k: int) -> dict:
  """teacher_metrics' keys for teacher k: teacher/… → teacher_k/…, teacher_refined/… → teacher_k_refined/…,
  broadcast/… → broadcast_k/…."""
  out = {}
  for key, v in metrics.items():
    who, rest = key.split("/", 1)
    out[f"{who.replace('teacher', f'teacher_{k}')}/{rest}" if who.startswith("teacher") else f"{who}_{k}/{rest}"] = v
  return out


def distill(config, workdir: str, *, quiet: bool = False) -> dict:
  """Runs (or resumes) the multi-teacher student of `config` and its single-teacher baselines; returns the merged
  final metrics (module docstring) and writes DIR/results.json."""
  from vlm_jax.distill import seg_evaluation  # noqa: PLC0415
  from vlm_jax.distill import teacher as teacher_lib  # noqa: PLC0415
  check(config)
  paths = teacher_paths(config)
  teachers = [teacher_lib.load_teacher({**config_lib.plain(config.teacher), "checkpoint": p}) for p in paths]
  config = resolve(config, teachers)
  train_src = seg_data.make_source(config.data, "train")
  eval_src = seg_data.make_source(config.data, "eval")
  test = np.nonzero(train_src.test_mask)[0]
  check_vocabulary(teachers, paths, [train_src.names[i] for i in test])
  class_embs = [t.text_embeddings(train_src.names) for t in teachers]
  ev = dict(config_lib.plain(config.evals).get("segmentation") or {})
  eval_data = seg_evaluation.eval_data(eval_src, int(ev.get("num_images", 0)))
  refine = segmentation.refine_settings(config)
  result, preds = {}, []
  for k, (t, emb) in enumerate(zip(teachers, class_embs), 1):
    metrics, pred = seg_evaluation.teacher_metrics(t, eval_src, emb, eval_data,
                                                   dense_size=int(config.method.dense_size), refine=refine)
    result.update(_renamed(metrics, k))
    preds.append(pred)
  labels = [segmentation.teacher_pseudo_labels(config, t, train_src, e) for t, e in zip(teachers, class_embs)]
  confident = config.method.weighting == "confidence"
  confidences = [teacher_confidence(config, t, train_src, e) for t, e in zip(teachers, class_embs)] \
      if confident else None
  common = dict(labels=labels, class_embs=class_embs, train_src=train_src, eval_src=eval_src, eval_data=eval_data,
                teacher_pred=preds[0], quiet=quiet)
  num_classes = len(train_src.names)
  if config.method.get("single_baselines"):
    for k in range(len(teachers)):
      c = student_config(config, num_classes, weights=np.eye(len(teachers))[k], weighting="fixed")
      c.name = f"single_{k + 1}"
      metrics = train_one(c, os.path.join(workdir, "baselines", c.name), confidences=None, **common)
      result.update({f"{c.name}/{key}": v for key, v in metrics.items() if key.startswith("segmentation/")})
  metrics = train_one(student_config(config, num_classes), workdir, confidences=confidences, **common)
  result = {**metrics, **result}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"method": config.method.name, "weighting": str(config.method.weighting),
               "teachers": list(config.teacher.checkpoints), **result}, f, indent=2, sort_keys=True)
  return result
