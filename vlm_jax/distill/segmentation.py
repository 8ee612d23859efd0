"""Open-vocabulary segmentation students distilled from a frozen VLM teacher: a distillation run of task
'segmentation' (`distill.run.distill` dispatches here).

  python -m vlm_jax.distill --config=configs/distill/maskclip_plus.py:tiny --workdir=DIR [--config.teacher.checkpoint=M]
  python -m vlm_jax.distill --config=configs/distill/lseg.py:tiny --workdir=DIR

Methods (`method.name`):
  maskclip_plus  MaskCLIP+ (Zhou et al. 2022, "Extract Free Dense Labels from CLIP", §3.3), annotation-free: the
                 teacher's refined MaskCLIP predictions on the training images (`pseudo_labels`: key smoothing,
                 prompt denoising) are the per-pixel labels of a student segmenter whose classifier is the teacher's
                 fixed text embeddings of every target class,  min_θ Σ_x CE(ℓ_θ(x), ŷ_MaskCLIP(x)). No mask label is
                 read (`seg_data.SyntheticSegmentation.mask` is never called for training; tested).
  lseg           LSeg (Li et al. 2022, "Language-driven Semantic Segmentation", Eq. 1–2): per-pixel embeddings f(x)
                 trained with the softmax over the text embeddings of the labelled BASE classes (and background),
                 logits = f(x)·t_c / τ; novel classes are added by name at test time.
  clipseg        CLIPSeg (Lüddecke & Ecker 2022): a FiLM-conditioned transformer decoder over the frozen ViT's
                 intermediate activations, one binary mask per (image, class query), trained on base-class queries
                 with the per-pixel binary cross-entropy (`distill.clipseg`, `models.segmentation.clipseg`), tested
                 on every class (novel ones by name); `method.conditioning` 'text' | 'visual' | 'mixed' conditions
                 on text embeddings, visual prompt embeddings or their interpolation (`distill.visual_prompts`), and
                 one visual prompt per class gives `visual/segmentation/…` beside the text-prompt numbers.
  multi_teacher  MaskCLIP+ from several frozen teachers at once (`distill.multi_teacher`): one student, a projection
                 head per teacher, Σ_k w_k(x) · CE(ℓ_k(x), ŷ_k(x)) with fixed or per-pixel confidence weights.
  closed_set     the baseline (`baselines`): the same segmenter with a learned linear classifier over background +
                 base classes; it cannot name a novel class, so its novel mIoU is 0 by construction.

Student (`models.segmentation.segmenter`): the teacher's image tower (initialised from the teacher, frozen and kept by
reference, as the detection students; `--config.frozen=''` fine-tunes it as MaskCLIP+'s DeepLab does) + an FPN +
a semantic-FPN head at stride 4 + the classifier; trained by the one loop (`train.loop.train`: checkpoints, exact
resume, metrics.jsonl). Teacher outputs that never change — the dense MaskCLIP embeddings (and keys) of the
training images, then the pseudo-labels — are cached on disk by teacher fingerprint + settings (`teacher_cache`).

Evaluation (`seg_evaluation`): mIoU on base and novel classes, their harmonic mean, pixel accuracy, of the student
(`segmentation/…`), of the MaskCLIP teacher (`teacher/…`, and with its refinements `teacher_refined/…`), of the
broadcast baseline (`broadcast/…`) and of the baselines (`closed_set/…`); overlays in DIR/plots/; DIR/results.json.
With `method.self_training.rounds` > 0 (MaskCLIP+) the student then trains on its own predictions (`self_training`)
and the first stage's numbers are kept as `before_self_training/…`.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from vlm_jax import config_lib
from vlm_jax.distill import seg_data, teacher_cache
from vlm_jax.errors import UserError

METHODS = {  # name -> (where training labels come from, which classes the training softmax covers)
    "maskclip_plus": {"labels": "teacher", "classes": "all"},
    "lseg": {"labels": "ground_truth", "classes": "base"},
    "clipseg": {"labels": "ground_truth", "classes": "base", "model": "clipseg"},
    "multi_teacher": {"labels": "teacher", "classes": "all", "model": "multi_teacher"},  # distill.multi_teacher
}
BASELINES = ("closed_set",)


def check(config) -> None:
  """Preflight of a segmentation config: method, baselines, refinement settings, data sizes."""
  name = config.method.get("name")
  if name not in METHODS:
    raise UserError(f"unknown segmentation method {name!r}; use one of {sorted(METHODS)}")
  unknown = [b for b in config.get("baselines") or () if b not in BASELINES]
  if unknown:
    raise UserError(f"unknown baseline(s) {unknown}; available: {list(BASELINES)}")
  m = config.method
  if not 0.0 <= float(m.pd_thresh) < 1.0:
    raise UserError(f"method.pd_thresh must be in [0, 1), got {m.pd_thresh}")
  if float(m.temperature) <= 0:
    raise UserError(f"method.temperature must be > 0, got {m.temperature}")
  if m.threshold != "otsu":
    try:
      float(m.threshold)
    except (TypeError, ValueError):
      raise UserError(f"method.threshold must be a number or 'otsu', got {m.threshold!r}") from None
  if int((m.get("self_training") or {}).get("rounds", 0)) and METHODS[name]["labels"] != "teacher":
    raise UserError(f"method.self_training is MaskCLIP+'s (labels from the teacher); {name} learns from ground truth")
  if METHODS[name].get("model") == "clipseg":
    from vlm_jax.distill import clipseg  # noqa: PLC0415
    clipseg.check(config)
  if METHODS[name].get("model") == "multi_teacher":
    from vlm_jax.distill import multi_teacher  # noqa: PLC0415
    multi_teacher.check(config)
  seg_data.check(config.data)  # a data.masks folder spec names existing folders and a class list
  if int(config.data.image_size) % 32:
    raise UserError(f"data.image_size must be a multiple of 32 (the backbone's stride), got {config.data.image_size}")


def resolve(config, teacher) -> ml_collections.ConfigDict:
  """`config` with the teacher placeholders filled in and the student described whole in `model` (what the run
  records in config.json)."""
  from vlm_jax.distill.teacher import fill_placeholders  # noqa: PLC0415
  d = fill_placeholders(config, teacher)
  d["model"]["embed_dim"] = int(teacher.embed_dim)
  d["model"]["temperature"] = float(d["method"]["temperature"])
  return ml_collections.ConfigDict(d)


def refine_settings(config) -> dict:
  m = config.method
  return {"pd_thresh": float(m.pd_thresh), "key_smoothing": bool(m.key_smoothing), "ks_thresh": float(m.ks_thresh)}


def teacher_dense(config, teacher, source, class_emb: np.ndarray) -> tuple[dict, float, dict]:
  """The teacher's MaskCLIP stage on the training images: ({'dense' [N, h, w, E], 'keys' when key smoothing} from
  the on-disk cache, the background threshold δ, the cache settings' common part). Reads images only."""
  from vlm_jax.distill import pseudo_labels as pl  # noqa: PLC0415
  from vlm_jax.evaluate import segmentation as seg  # noqa: PLC0415
  m, n = config.method, len(source)
  emb = class_emb[np.nonzero(source.test_mask)[0]]
  refine = refine_settings(config)
  root, chunk = config.teacher_cache.dir, int(config.teacher_cache.chunk)
  base = {"teacher": teacher.fingerprint, "data": seg_data.settings(config.data), "dense_size": int(m.dense_size)}

  def dense(idx):
    images = source.images(idx)
    out = {"dense": teacher.dense(images, int(m.dense_size)).astype(np.float32)}
    if refine["key_smoothing"]:
      out["keys"] = pl.teacher_keys(teacher, images, int(m.dense_size)).astype(np.float32)
    return out
  stage1 = teacher_cache.TeacherCache(root, {**base, "what": "maskclip_dense", "keys": refine["key_smoothing"]}, n,
                                      dense, chunk=chunk).load(progress=True)
  delta = seg.otsu_threshold(seg.objectness(stage1["dense"], emb)) if m.threshold == "otsu" else float(m.threshold)
  return stage1, delta, base


def teacher_pseudo_labels(config, teacher, source, class_emb: np.ndarray) -> np.ndarray:
  """uint8 [N, S, S] MaskCLIP+ pseudo-labels (0 = background, class id + 1) of the training images, from the
  on-disk caches (dense embeddings + keys, then labels), computed on a miss. Reads images only."""
  from vlm_jax.distill import pseudo_labels as pl  # noqa: PLC0415
  from vlm_jax.distill.seg_evaluation import to_vocab  # noqa: PLC0415
  n, s = len(source), int(config.data.image_size)
  test = np.nonzero(source.test_mask)[0]
  emb = class_emb[test]
  refine = refine_settings(config)
  root, chunk = config.teacher_cache.dir, int(config.teacher_cache.chunk)
  stage1, delta, base = teacher_dense(config, teacher, source, class_emb)

  def labels(idx):
    keys = stage1["keys"][idx] if refine["key_smoothing"] else None
    y = pl.pseudo_labels(stage1["dense"][idx], emb, (s, s), threshold=delta, keys=keys, **refine)
    return {"labels": to_vocab(y, test).astype(np.uint8)}
  settings = {**base, "what": "pseudo_labels", "templates": str(config.teacher.templates), "refine": refine,
              "threshold": delta, "classes": test.tolist()}
  return teacher_cache.TeacherCache(root, settings, n, labels, chunk=chunk).load(progress=True)["labels"]


def student_config(config, num_classes: int, *, closed_set: bool) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config_lib.plain(config))
  c.model.num_classes = int(num_classes)
  c.model.classifier = "closed_set" if closed_set else "text"
  return c


def train_one(config, workdir: str, *, teacher_out: dict, train_src, eval_src, eval_data, class_emb, labels,
              closed_set: bool, quiet: bool) -> dict:
  """One loop run (the method, or the closed-set baseline) into `workdir`; returns its final metrics."""
  from vlm_jax import runs  # noqa: PLC0415
  from vlm_jax.data import transforms  # noqa: PLC0415
  from vlm_jax.distill import seg_evaluation  # noqa: PLC0415
  from vlm_jax.distill.run import _compose  # noqa: PLC0415
  from vlm_jax.distill.seg_loss import pixel_cross_entropy  # noqa: PLC0415
  from vlm_jax.models.segmentation import segmenter  # noqa: PLC0415
  from vlm_jax.train import loop  # noqa: PLC0415
  novel, test_mask = np.asarray(train_src.novel, bool), np.asarray(train_src.test_mask, bool)
  spec = METHODS[config.method.name]
  base_mask = test_mask & ~novel
  train_mask = base_mask if closed_set or spec["classes"] == "base" else test_mask
  config = student_config(config, len(novel), closed_set=closed_set)
  clipseg = spec.get("model") == "clipseg" and not closed_set
  if clipseg:
    from vlm_jax.distill import clipseg as clipseg_lib  # noqa: PLC0415
    from vlm_jax.models.segmentation import clipseg as clipseg_model  # noqa: PLC0415
    model = clipseg_model.build({k: v for k, v in config_lib.plain(config.model).items() if k != "classifier"})
  else:
    model = segmenter.build(config.model)
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  def make_row(i: int) -> dict:
    y = labels[i] if labels is not None else train_src.mask(i)
    return {"image": transforms.normalize(train_src.image(i), mean, std), "labels": np.asarray(y, np.int32)}

  prompts = teacher_out.get("prompts") or {}
  if clipseg:  # K base-class queries per image with their binary masks (and conditional vectors: text / visual)
    cond = clipseg_lib.conditions_fn(config.method.get("conditioning", "text"), class_emb, prompts.get("train"),
                                     int(config.seed))
    make_row = clipseg_lib.with_queries(make_row, np.nonzero(base_mask)[0], int(config.method.queries),
                                        int(config.seed), conditions=cond,
                                        ignore=bool(getattr(train_src, "has_ignore", False)))

  def make_data(process_index: int, process_count: int):
    return seg_data.train_iterator(len(train_src), make_row, global_batch_size=int(config.batch_size),
                                   seed=int(config.seed), process_index=process_index, process_count=process_count)

  def constants(variables):
    variables = dict(variables)
    variables["constants"] = {"class_embeddings": np.asarray(class_emb, np.float32), "train_mask": train_mask,
                              "test_mask": base_mask if closed_set else test_mask}
    return variables
  ev = dict(config_lib.plain(config.evals).get("segmentation") or {})
  evaluator = seg_evaluation.make_evaluator(model, eval_src, eval_data, mean=mean, std=std,
                                            batch_size=int(ev.get("batch_size", 32)),
                                            plot_dir=os.path.join(workdir, "plots") if ev.get("plots", True) else None,
                                            teacher_pred=teacher_out.get("pred"), title=config.name)
  evaluators = {"segmentation": evaluator}
  if clipseg and "eval" in prompts:  # the same decoder prompted with one visual example per class
    plain = seg_evaluation.make_evaluator(model, eval_src, eval_data, mean=mean, std=std,
                                          batch_size=int(ev.get("batch_size", 32)))
    evaluators["visual"] = clipseg_lib.visual_evaluator(plain, prompts["eval"])
  init_fn = _compose(runs.initializer(config.get("init")), constants)
  return loop.train(config, workdir, make_data=make_data, model=model,
                    loss_fn=clipseg_lib.binary_mask_loss if clipseg else pixel_cross_entropy,
                    evaluators=evaluators, init_fn=init_fn, quiet=quiet)


def distill(config, workdir: str, *, quiet: bool = False) -> dict:
  """Runs (or resumes) the segmentation method of `config` and its baselines; returns the merged final metrics."""
  from vlm_jax.distill import seg_evaluation  # noqa: PLC0415
  from vlm_jax.distill import teacher as teacher_lib  # noqa: PLC0415
  check(config)
  if METHODS[config.method.name].get("model") == "multi_teacher":  # several teachers: its own run
    from vlm_jax.distill import multi_teacher  # noqa: PLC0415
    return multi_teacher.distill(config, workdir, quiet=quiet)
  teacher = teacher_lib.load_teacher(config.teacher)
  config = resolve(config, teacher)
  train_src = seg_data.make_source(config.data, "train")
  eval_src = seg_data.make_source(config.data, "eval")
  class_emb = teacher.text_embeddings(train_src.names)
  ev = dict(config_lib.plain(config.evals).get("segmentation") or {})
  eval_data = seg_evaluation.eval_data(eval_src, int(ev.get("num_images", 0)))
  result, pred = seg_evaluation.teacher_metrics(teacher, eval_src, class_emb, eval_data,
                                                dense_size=int(config.method.dense_size),
                                                refine=refine_settings(config))
  common = dict(teacher_out={"pred": pred}, train_src=train_src, eval_src=eval_src, eval_data=eval_data,
                class_emb=class_emb, quiet=quiet)
  if METHODS[config.method.name].get("model") == "clipseg":  # CLIPSeg's visual prompts (support examples)
    from vlm_jax.distill import clipseg as clipseg_lib  # noqa: PLC0415
    test = np.asarray(train_src.test_mask, bool)
    common["teacher_out"]["prompts"] = clipseg_lib.prompt_banks(
        config, teacher, seg_data.make_source(config.data, "support"),
        np.nonzero(test & ~np.asarray(train_src.novel, bool))[0], np.nonzero(test)[0])
  for name in config.get("baselines") or ():
    c = ml_collections.ConfigDict(config_lib.plain(config))
    c.name = name
    metrics = train_one(c, os.path.join(workdir, "baselines", name), labels=None, closed_set=True, **common)
    result.update({f"{name}/{k}": v for k, v in metrics.items() if k.startswith("segmentation/")})
  if METHODS[config.method.name]["labels"] == "teacher":
    labels = teacher_pseudo_labels(config, teacher, train_src, class_emb)
  else:
    labels = None
  metrics = train_one(config, workdir, labels=labels, closed_set=False, **common)
  rounds = int((config.method.get("self_training") or {}).get("rounds", 0))
  if rounds:
    result.update({f"before_self_training/{k}": v for k, v in metrics.items() if k.startswith("segmentation/")})
    metrics = self_training(config, workdir, rounds, common)
  result = {**metrics, **result}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"method": config.method.name, **result}, f, indent=2, sort_keys=True)
  return result


def student_labels(config, run_dir: str, source) -> np.ndarray:
  """uint8 [N, S, S] the trained student's own predictions (over background + the test classes) on the training
  images: the labels of a MaskCLIP+ self-training round. Reads images only."""
  from vlm_jax import runs  # noqa: PLC0415
  from vlm_jax.data import transforms  # noqa: PLC0415
  from vlm_jax.distill import seg_evaluation  # noqa: PLC0415
  from vlm_jax.models.segmentation import segmenter  # noqa: PLC0415
  model = segmenter.build(student_config(config, len(source.names), closed_set=False).model)
  variables = runs.load_variables(run_dir)
  segment = seg_evaluation.segment_fn(model)
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  out, step = [], 256
  for i in range(0, len(source), step):
    images = transforms.normalize(source.images(range(i, min(i + step, len(source)))), mean, std)
    out.append(seg_evaluation.predict(segment, variables, images).astype(np.uint8))
  return np.concatenate(out)


def self_training(config, workdir: str, rounds: int, common: dict) -> dict:
  """MaskCLIP+'s self-training (Zhou et al. 2022, §3.3): after training on the teacher's pseudo-labels, the student
  keeps training on its own predictions, ŷ_r = argmax ℓ_θ_{r−1}(x), for `rounds` rounds of
  `method.self_training.steps` steps each (run directories DIR/self_training/round<r>, each initialised from the
  previous one's head and resumable). Returns the last round's final metrics."""
  st = config_lib.plain(config.method.self_training)
  prev = workdir
  metrics: dict = {}
  for r in range(1, rounds + 1):
    labels = student_labels(config, prev, common["train_src"])
    c = ml_collections.ConfigDict(config_lib.plain(config))
    c.total_steps = int(st.get("steps", config.total_steps))
    c.init.sources = tuple(config_lib.plain(s) for s in config.init.sources) + (
        {"checkpoint": prev, "params": r"^(?!backbone/)", "rename": {}, "required": True},)
    prev = os.path.join(workdir, "self_training", f"round{r}")
    metrics = train_one(c, prev, labels=labels, closed_set=False, **common)
  return metrics
