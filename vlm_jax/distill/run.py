"""A distillation run from its config: teacher, cached teacher outputs, student, data, evaluators, the one loop.

  metrics = distill(config, workdir)       # what `python -m vlm_jax.distill` runs

1. The teacher (`teacher.load_teacher`): frozen, fingerprinted; a missing one is a `UserError` naming `make demo`.
2. Data (`data.make_source`): the training view (novel objects unlabelled) and the evaluation view; the
   vocabulary's text embeddings from the teacher's prompt ensemble.
3. The baselines (below) train first; then the teacher outputs that never change, cached on disk by teacher
   fingerprint + settings (`teacher_cache`): class-agnostic proposals (`proposals`: by default the closed-set
   baseline's RPN, as ViLD's offline proposals), crop embeddings of the proposals (ViLD-image) and pseudo boxes
   (PB-OVD).
4. The student (`models.detection.open_vocab.OpenVocabDetector` around the detector, described whole by
   `config.model` with its `open_vocab` classifier settings: `student_config`) initialised from
   `config.init.sources` ('teacher' names the teacher: by default its image tower becomes the backbone, frozen and
   kept by reference with `checkpoint_frozen=False`), its constants (text embeddings, masks) written at init.
5. `vlm_jax.train.loop.train` for the method (workdir) and each baseline (workdir/baselines/<name>), each with
   its own checkpoints and exact resume; evaluators of `config.evals` (kind 'detection').
Returns the method's final metrics plus every baseline's under `<baseline>/…`.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from vlm_jax import config_lib
from vlm_jax.distill import data as data_lib
from vlm_jax.distill import proposals as proposals_lib
from vlm_jax.distill import pseudo_boxes as pb
from vlm_jax.distill import student as student_lib
from vlm_jax.distill import teacher as teacher_lib
from vlm_jax.distill import teacher_cache, vild
from vlm_jax.errors import UserError


def resolve(config, teacher) -> ml_collections.ConfigDict:
  """A copy of `config` with the teacher placeholders filled in (absolute teacher path, the teacher's image tower
  as `model.image`, its mean/std as the data normalisation): what the run records in config.json."""
  return ml_collections.ConfigDict(teacher_lib.fill_placeholders(config, teacher))


def student_config(config, num_classes: int, embed_dim: int, *, closed_set: bool = False) -> ml_collections.ConfigDict:
  """A copy of `config` whose `model` describes the whole student: the detector with `embed_dim` (the teacher's
  joint space) and `open_vocab`, its classifier over `num_classes` names (`student.open_vocab_config` of
  `config.method`, or the closed-set baseline's). This is what the run records in config.json, so
  `vlm_jax.models.build_model(config.model)` — and `python -m vlm_jax.evaluate --workdir=DIR` — rebuilds it."""
  c = ml_collections.ConfigDict(config_lib.plain(config))
  c.model.embed_dim = int(embed_dim)
  c.model.open_vocab = student_lib.open_vocab_config(config.method, num_classes, closed_set=closed_set)
  return c


def build_student(config, num_classes: int | None = None, embed_dim: int | None = None, *,
                  closed_set: bool = False):
  """The student (`models.detection.open_vocab.OpenVocabDetector`) of `student_config(config, num_classes,
  embed_dim)`; with `num_classes` None, of a config that already describes it (`student_config`'s, a saved run's)."""
  from vlm_jax import models  # noqa: PLC0415
  if num_classes is not None:
    config = student_config(config, num_classes, embed_dim, closed_set=closed_set)
  if not config_lib.plain(config.model).get("open_vocab"):
    raise ValueError("config.model has no open_vocab: give num_classes and embed_dim (see student_config)")
  return models.build_model(config.model)


def teacher_outputs(config, teacher, source, class_emb: np.ndarray, workdir: str) -> dict:
  """{'proposals', 'crops'} (when ViLD-image is on) and {'pseudo_boxes', 'pseudo_classes'} (PB-OVD) per training
  image, from the on-disk caches (computed on a miss)."""
  out: dict = {}
  m = config.method
  need_crops = proposals_lib.crops_needed(config)
  if not proposals_lib.needed(config):
    return out
  n, hw = len(source), (int(config.data.image_size),) * 2
  proposals_lib.check(config)
  p = proposals_lib.settings(config, workdir)
  base = {"teacher": teacher.fingerprint, "data": data_lib.settings(config.data), "proposals": p}
  root, chunk = config.teacher_cache.dir, int(config.teacher_cache.chunk)
  props = teacher_cache.TeacherCache(  # the whole set at once: the 'rpn' kind runs the baseline's detector
      root, {**base, "what": "proposals"}, n, lambda idx: {"proposals": proposals_lib.proposal_boxes(
          config, workdir, source, build_student)[idx]}, chunk=n)
  proposals = out["proposals"] = props.load()["proposals"]
  if need_crops:
    def crops(idx):
      images = np.stack([source[i]["image"] for i in idx])
      return {"crops": teacher.crop_embeddings(images, proposals[idx], tuple(p["scales"])).astype(np.float16)}
    cache = teacher_cache.TeacherCache(root, {**base, "what": "crops"}, n, crops, chunk=chunk)
    out["crops"] = cache.load(progress=True)["crops"]
    out["crops_cache"] = cache
  if m.pseudo_boxes:
    q = config_lib.plain(config.pseudo_boxes)
    names = source.names

    def pseudo(idx):
      els = [source[i] for i in idx]
      dense = teacher.dense(np.stack([e["image"] for e in els]), int(q["dense_size"])) \
          if q["scorer"] == "dense" else None
      boxes, classes = [], []
      for j, (i, e) in enumerate(zip(idx, els)):
        crop_emb = None if dense is not None else np.asarray(vild.teacher_targets(out["crops"][i].astype(np.float32)))
        b, c = pb.pseudo_boxes(e["caption"], names, class_emb, proposals[i], known=e["classes"][e["classes"] >= 0],
                               dense=None if dense is None else dense[j], crops=crop_emb, image_hw=hw,
                               temperature=float(q["temperature"]), max_boxes=int(q["max_boxes"]))
        boxes.append(b)
        classes.append(c)
      return {"pseudo_boxes": np.stack(boxes), "pseudo_classes": np.stack(classes)}
    if q["scorer"] not in ("dense", "crops"):
      raise UserError(f"unknown pseudo_boxes.scorer {q['scorer']!r}; use 'dense' or 'crops'")
    cache = teacher_cache.TeacherCache(root, {**base, "what": "pseudo", "pseudo": q}, n, pseudo, chunk=chunk)
    out.update(cache.load(progress=True))
  return out


def make_example_fn(config, cached: dict, mean, std):
  """fn(i, source element) -> one training row (images normalised; gt = base boxes + pseudo boxes)."""
  from vlm_jax.data import transforms  # noqa: PLC0415
  use_image = float(config.method.image_weight) > 0

  def make(i: int, el: dict) -> dict:
    boxes, classes = el["boxes"], el["classes"]
    if "pseudo_boxes" in cached:
      boxes = np.concatenate([boxes, cached["pseudo_boxes"][i]])
      classes = np.concatenate([classes, cached["pseudo_classes"][i]])
    row = {"image": transforms.normalize(el["image"], mean, std), "gt_boxes": boxes.astype(np.float32),
           "gt_classes": classes.astype(np.int32)}
    if use_image:
      row["proposals"] = cached["proposals"][i]
      row["teacher_crops"] = cached["crops"][i].astype(np.float32)
    return row

  return make


def constants(class_emb: np.ndarray, train_mask: np.ndarray, test_mask: np.ndarray, novel: np.ndarray):
  """`init_fn` part writing the student's 'constants' collection (text embeddings and masks)."""
  def write(variables: dict) -> dict:
    variables = dict(variables)
    variables["constants"] = {"class_embeddings": np.asarray(class_emb, np.float32),
                              "train_mask": np.asarray(train_mask, bool), "test_mask": np.asarray(test_mask, bool),
                              "novel": np.asarray(novel, bool)}
    return variables
  return write


def _compose(*fns):
  fns = [f for f in fns if f is not None]

  def apply(variables):
    for f in fns:
      variables = f(variables)
    return variables
  return apply


def train_one(config, workdir: str, *, teacher, train_src, eval_src, class_emb, cached, closed_set: bool,
              quiet: bool) -> dict:
  """One loop run (the method, or a baseline with `closed_set`) into `workdir`; returns its final metrics."""
  from vlm_jax import runs  # noqa: PLC0415
  from vlm_jax.distill import evaluation  # noqa: PLC0415
  from vlm_jax.train import loop  # noqa: PLC0415
  novel = np.asarray(train_src.novel, bool)
  train_mask = ~novel & train_src.test_mask
  if "pseudo_classes" in cached:
    pseudo = cached["pseudo_classes"]
    train_mask = train_mask | np.isin(np.arange(len(novel)), pseudo[pseudo >= 0])
  config = student_config(config, len(novel), teacher.embed_dim, closed_set=closed_set)  # recorded in config.json
  model = build_student(config)
  loss_fn = vild.make_loss_fn(text_weight=float(config.method.text_weight),
                              image_weight=0.0 if closed_set else float(config.method.image_weight))
  make = make_example_fn(config, cached, config.data.mean, config.data.std)

  def make_data(process_index: int, process_count: int):
    return data_lib.train_iterator(train_src, make, global_batch_size=int(config.batch_size), seed=int(config.seed),
                                   process_index=process_index, process_count=process_count)

  evaluators = evaluation.make_evaluators(config, model=model, source=eval_src,
                                          plot_dir=os.path.join(workdir, "plots"))
  init_fn = _compose(runs.initializer(config.get("init")), constants(class_emb, train_mask, train_src.test_mask, novel))
  return loop.train(config, workdir, make_data=make_data, model=model, loss_fn=loss_fn, evaluators=evaluators,
                    init_fn=init_fn, quiet=quiet)


def baseline_config(config, name: str) -> ml_collections.ConfigDict:
  """The config of baseline `name`: the method's, with a closed-set classifier and no teacher targets."""
  if name != "closed_set":
    raise UserError(f"unknown baseline {name!r}; available: closed_set")
  c = ml_collections.ConfigDict(config_lib.plain(config))
  c.name = name
  c.method.image_weight, c.method.pseudo_boxes = 0.0, False
  return c


def distill(config, workdir: str, *, quiet: bool = False) -> dict:
  """Runs (or resumes) the method of `config` and its baselines; returns the merged final metrics. A config of
  task 'segmentation' (MaskCLIP+, LSeg) runs `distill.segmentation.distill` instead, one of task 'classification'
  (knowledge distillation of a two-tower student) `distill.classification.distill`."""
  if config.get("task", "detection") == "segmentation":
    from vlm_jax.distill import segmentation  # noqa: PLC0415
    return segmentation.distill(config, workdir, quiet=quiet)
  if config.get("task", "detection") == "classification":  # KD of a two-tower student (configs/distill/clip_kd.py)
    from vlm_jax.distill import classification  # noqa: PLC0415
    return classification.distill(config, workdir, quiet=quiet)
  teacher = teacher_lib.load_teacher(config.teacher)
  config = resolve(config, teacher)
  train_src = data_lib.make_source(config.data, "train")
  eval_src = data_lib.make_source(config.data, "eval")
  proposals_lib.check(config)
  class_emb = teacher.text_embeddings(train_src.names)
  common = dict(teacher=teacher, train_src=train_src, eval_src=eval_src, class_emb=class_emb, quiet=quiet)
  result = {}
  for name in config.get("baselines") or ():  # first: the closed-set baseline's RPN proposes for kind 'rpn'
    c = baseline_config(config, name)
    metrics = train_one(c, os.path.join(workdir, "baselines", name), cached={}, closed_set=True, **common)
    result.update({f"{name}/{k}": v for k, v in metrics.items() if k.startswith("detection/")})
  cached = teacher_outputs(config, teacher, train_src, class_emb, workdir)
  if (config.method.get("detpro") or {}).get("enabled"):  # DetPro's learned prompts become the method's classifier
    from vlm_jax.distill import detpro  # noqa: PLC0415
    common["class_emb"] = detpro.class_embeddings(config, teacher, train_src, cached, handcrafted=class_emb,
                                                  quiet=quiet)
  metrics = train_one(config, workdir, cached=cached, closed_set=False, **common)
  return {**metrics, **result}
