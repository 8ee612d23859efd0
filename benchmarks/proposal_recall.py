"""How well the distillation's class-agnostic proposals and PB-OVD pseudo boxes cover the objects of the training
images, base (labelled) and novel (present but unlabelled), on the synthetic open-vocabulary scenes.

  .venv/bin/python benchmarks/proposal_recall.py --workdir=DIR [--per_image=24] [--scorer=dense|crops]

DIR is a finished `python -m vlm_jax.distill` run of the synthetic scenes with its closed-set baseline
(DIR/baselines/closed_set). For each proposal kind ('random' boxes, 'rpn' = the baseline's base-trained RPN,
`vlm_jax.distill.proposals`) prints one JSON line: recall of base and novel objects at IoU ≥ 0.5 (the fraction of
objects some proposal covers) and mean best IoU; and, when the run has pseudo boxes in its teacher cache, one line
with their precision (a pseudo box of class c with IoU ≥ 0.5 with an unlabelled object of class c) and the novel
objects they recall. The ground truth is the scenes' 'eval' view of the same training images (every object).
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)  # noqa: E731
  return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--per_image", type=int, default=0, help="0: the run's proposals.per_image")
  p.add_argument("--scorer", default="", help="pseudo_boxes.scorer to measure ('dense' | 'crops'; '': the run's)")
  args = p.parse_args(argv)
  sys.path.insert(0, ROOT)
  import ml_collections  # noqa: PLC0415

  from vlm_jax import runs  # noqa: PLC0415
  from vlm_jax.distill import data as data_lib  # noqa: PLC0415
  from vlm_jax.distill import proposals, run  # noqa: PLC0415
  from vlm_jax.errors import UserError  # noqa: PLC0415
  try:
    config = runs.read_config(args.workdir)
  except (FileNotFoundError, ValueError, UserError):  # the method has not checkpointed yet: its baseline's data and proposals
    config = runs.read_config(proposals.source_dir(args.workdir))
  config = ml_collections.ConfigDict(config.to_dict())
  if args.per_image:
    config.proposals.per_image = args.per_image
  if args.scorer:
    config.pseudo_boxes.scorer = args.scorer
  train = data_lib.make_source(config.data, "train")
  full = data_lib.SyntheticDetection(  # the same training images, every object annotated
      "train", "eval", seed=int(config.data.seed), image_size=int(config.data.image_size),
      num_images=int(config.data.num_train), objects=tuple(config.data.objects), p_novel=float(config.data.p_novel))
  novel_cls = np.asarray(train.novel, bool)
  gt = [full[i] for i in range(len(full))]
  kinds = {"random": proposals.random_boxes(config, len(train)),
           "rpn": proposals.rpn_boxes(config, args.workdir, train, run.build_student)}
  for kind, boxes in kinds.items():
    best = {"base": [], "novel": []}
    for i, el in enumerate(gt):
      valid = el["classes"] >= 0
      if not valid.any():
        continue
      iou = _iou(el["boxes"][valid], boxes[i]).max(1)
      for c, v in zip(el["classes"][valid], iou):
        best["novel" if novel_cls[c] else "base"].append(v)
    row = {"proposals": kind, "per_image": int(boxes.shape[1]), "images": len(gt)}
    for g, v in best.items():
      v = np.asarray(v)
      row.update({f"{g}_objects": int(v.size), f"{g}_recall@0.5": round(float((v >= 0.5).mean()), 4),
                  f"{g}_mean_best_iou": round(float(v.mean()), 4)})
    print(json.dumps(row), flush=True)
  if config.method.get("pseudo_boxes"):
    from vlm_jax.distill import teacher as teacher_lib  # noqa: PLC0415
    teacher = teacher_lib.load_teacher(config.teacher)
    cached = run.teacher_outputs(config, teacher, train, teacher.text_embeddings(train.names), args.workdir)
    hits = total = matched = novel_total = 0
    for i, el in enumerate(gt):
      valid = (el["classes"] >= 0) & novel_cls[np.maximum(el["classes"], 0)]
      novel_total += int(valid.sum())
      pc = cached["pseudo_classes"][i]
      ok = pc >= 0
      if not ok.any():
        continue
      total += int(ok.sum())
      if not valid.any():
        continue
      iou = _iou(cached["pseudo_boxes"][i][ok], el["boxes"][valid])
      same = pc[ok][:, None] == el["classes"][valid][None]
      good = (iou >= 0.5) & same
      hits += int(good.any(1).sum())
      matched += int(good.any(0).sum())
    print(json.dumps({"pseudo_boxes": total, "precision@0.5": round(hits / max(total, 1), 4),
                      "novel_objects": novel_total, "novel_recall@0.5": round(matched / max(novel_total, 1), 4),
                      "proposals": config.proposals.kind, "scorer": config.pseudo_boxes.scorer}), flush=True)


if __name__ == "__main__":
  main()
