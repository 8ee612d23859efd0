"""Class-agnostic proposals for ViLD-image and PB-OVD (`vlm_jax.distill.proposals`): cross-level NMS and ranking
by hand, the 'rpn' kind's requirement of the closed-set baseline, and the 'rpn' proposals equal to the base-trained
baseline's RPN boxes, cached by its checkpoint fingerprint."""

from __future__ import annotations

import numpy as np
import pytest

from tests import train_helpers as th


def test_top_boxes_suppresses_overlaps_ranks_by_objectness_and_fills():
  from vlm_jax.distill import proposals
  boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 4, 4], [40, 40, 50, 50]], np.float32)
  scores = np.array([0.9, 0.8, 0.5, 0.7, 2.0], np.float32)
  valid = np.array([True, True, True, True, False])       # the last slot is RPN padding
  fill = np.full((4, 4), 7.0, np.float32)
  got = proposals.top_boxes(boxes, scores, valid, 4, nms_iou=0.5, fill=fill)
  # box 1 overlaps box 0 (IoU 9/11 > 0.5): suppressed; the rest by objectness; one empty slot filled
  np.testing.assert_array_equal(got, np.stack([boxes[0], boxes[3], boxes[2], fill[3]]))


def test_rpn_proposals_need_the_closed_set_baseline():
  from vlm_jax.distill import proposals
  from vlm_jax.errors import UserError
  c = th.load_config("configs/distill/vild.py", "micro")
  c.proposals.kind, c.baselines = "rpn", ()
  with pytest.raises(UserError, match="closed_set"):
    proposals.check(c)
  c.proposals.kind = "selective_search"
  with pytest.raises(UserError, match="unknown proposals.kind"):
    proposals.check(c)


def test_rpn_proposals_are_the_base_trained_baselines_and_cached_by_its_fingerprint(tmp_path, pretrained_resnet):
  """kind='rpn': the cached proposals are exactly the closed-set baseline's RPN boxes (after cross-level NMS),
  inside the image, and differ from the random ones; the cache keys on the baseline's checkpoint fingerprint."""
  import ml_collections

  from vlm_jax import runs
  from vlm_jax.distill import data as data_lib
  from vlm_jax.distill import proposals, run, teacher as teacher_lib
  from vlm_jax.errors import UserError
  from vlm_jax.models.detection.boxes import box_iou
  c = th.load_config("configs/distill/vild.py", "micro")
  c.teacher.checkpoint, c.teacher_cache.dir = pretrained_resnet, str(tmp_path / "cache")
  c.proposals.kind = "rpn"
  c.total_steps, c.checkpoint_every_steps = 8, 8
  c.evals = ml_collections.ConfigDict()
  wd = str(tmp_path / "run")
  teacher = teacher_lib.load_teacher(c.teacher)
  resolved = run.resolve(c, teacher)
  src = data_lib.make_source(resolved.data, "train")
  class_emb = teacher.text_embeddings(src.names)
  with pytest.raises(UserError, match="closed_set"):  # no baseline trained yet
    run.teacher_outputs(resolved, teacher, src, class_emb, wd)
  run.train_one(run.baseline_config(resolved, "closed_set"), proposals.source_dir(wd), teacher=teacher,
                train_src=src, eval_src=None, class_emb=class_emb, cached={}, closed_set=True, quiet=True)
  got = run.teacher_outputs(resolved, teacher, src, class_emb, wd)["proposals"]
  want = proposals.rpn_boxes(resolved, wd, src, run.build_student)
  np.testing.assert_array_equal(got, want)
  assert got.shape == (len(src), int(c.proposals.per_image), 4)
  assert not np.allclose(got, proposals.random_boxes(resolved, len(src)))
  size = float(c.data.image_size)
  assert (got >= 0).all() and (got <= size).all() and (got[..., 2:] >= got[..., :2]).all()
  settings = proposals.settings(resolved, wd)
  assert settings["source_fingerprint"] == runs.fingerprint(proposals.source_dir(wd))
  n_rpn = [int(np.sum(~np.all(g == f, -1))) for g, f in zip(got, proposals.random_boxes(resolved, len(src)))]
  iou = np.asarray(box_iou(got[0][:n_rpn[0]], got[0][:n_rpn[0]]))
  assert (iou[~np.eye(len(iou), dtype=bool)] <= float(c.proposals.nms_iou) + 1e-6).all()  # NMS across levels
  print(f"\nRPN boxes per image (of {c.proposals.per_image}): min {min(n_rpn)}, mean {np.mean(n_rpn):.1f}")


def test_vild_text_alone_needs_no_proposals_nor_baseline():
  from vlm_jax.distill import proposals
  c = th.load_config("configs/distill/vild.py", "tiny,method=vild_text")
  c.baselines = ()
  assert c.proposals.kind == "rpn" and not proposals.needed(c)
  proposals.check(c)  # no error: nothing uses the proposals
  c.method.pseudo_boxes = True
  assert proposals.needed(c) and not proposals.crops_needed(c)
  with pytest.raises(Exception, match="closed_set"):
    proposals.check(c)
