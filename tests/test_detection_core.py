"""Detector core (issue 15): NMS vs a numpy reference, anchors and the box parameterisation, RPN and box-head
losses and targets by hand, COCO AP vs pycocotools, and the detector's forward/backward sharded == one device."""

from __future__ import annotations

import contextlib
import io
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.evaluate import detection as det_eval
from vlm_jax.models import build_model
from vlm_jax.models.detection import anchors as anchor_lib
from vlm_jax.models.detection import boxes as box_lib
from vlm_jax.models.detection import heads, nms as nms_lib, rpn as rpn_lib
from vlm_jax.parallel import mesh as mesh_lib, partitioning

_rpn_targets = jax.jit(rpn_lib.rpn_targets, static_argnames=("batch_per_image", "positive_fraction"))
_rpn_loss = jax.jit(rpn_lib.rpn_loss, static_argnames=("beta",))
_proposals = jax.jit(rpn_lib.proposals, static_argnames=("image_hw", "pre_nms", "post_nms", "iou", "level_counts"))
_proposal_targets = jax.jit(heads.proposal_targets, static_argnames=("batch_per_image", "fg_fraction", "add_gt"))


def _iou_np(a, b):
  return det_eval.box_iou_np(a, b)


def _nms_reference(boxes, scores, thr, max_out):
  order = np.argsort(-scores, kind="stable")
  order = [i for i in order if np.isfinite(scores[i])]
  keep, suppressed = [], np.zeros(len(scores), bool)
  for i in order:
    if suppressed[i]:
      continue
    keep.append(i)
    suppressed |= _iou_np(boxes[i:i + 1], boxes)[0] > thr
    if len(keep) == max_out:
      break
  return keep


def _random_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(2, size / 3, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_nms_matches_numpy_reference():
  rng = np.random.default_rng(0)
  fn = jax.jit(nms_lib.nms, static_argnames=("iou_threshold", "max_out"))
  for trial, thr in enumerate((0.0, 0.3, 0.5, 0.7, 0.9)):
    boxes = _random_boxes(rng, 80, size=60.0)
    scores = np.round(rng.random(80), 1).astype(np.float32)  # many ties: broken by the lower index
    scores[rng.random(80) < 0.1] = -np.inf  # padding is never kept
    max_out = 100 if trial % 2 else 12
    idx, valid = fn(jnp.asarray(boxes), jnp.asarray(scores), iou_threshold=thr, max_out=max_out)
    ref = _nms_reference(boxes, scores, thr, max_out)
    assert int(valid.sum()) == len(ref)
    assert np.asarray(idx)[np.asarray(valid)].tolist() == ref
    assert not np.asarray(valid)[len(ref):].any() and (np.asarray(idx)[len(ref):] == 0).all()
  # leading batch dims are mapped; batched_nms never suppresses across groups
  boxes = np.stack([_random_boxes(rng, 30), _random_boxes(rng, 30)])
  scores = rng.random((2, 30)).astype(np.float32)
  groups = rng.integers(0, 3, (2, 30))
  idx, valid = nms_lib.batched_nms(boxes, scores, groups, iou_threshold=0.4, max_out=30)
  for b in range(2):
    keep = []
    for g in range(3):
      sel = np.nonzero(groups[b] == g)[0]
      keep += [int(sel[i]) for i in _nms_reference(boxes[b][sel], scores[b][sel], 0.4, 30)]
    keep = sorted(keep, key=lambda i: (-scores[b, i], i))
    assert np.asarray(idx[b])[np.asarray(valid[b])].tolist() == keep


def test_anchors_and_box_coding():
  a = anchor_lib.anchors([(2, 3), (1, 2)], [16, 32], sizes=[32, (64, 128)], ratios=(0.5, 1.0, 2.0))
  assert a.shape == (2 * 3 * 3 + 1 * 2 * 6, 4)
  # level 0, cell (row 1, col 2): centre ((2 + ½) 16, (1 + ½) 16); ratios h / w = 0.5, 1, 2 of area 32²
  cell = a[(1 * 3 + 2) * 3:(1 * 3 + 2) * 3 + 3]
  np.testing.assert_allclose((cell[:, :2] + cell[:, 2:]) / 2, [[40, 24]] * 3, atol=1e-5)
  w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
  np.testing.assert_allclose(w * h, 32 ** 2, rtol=1e-5)
  np.testing.assert_allclose(h / w, [0.5, 1.0, 2.0], rtol=1e-5)
  lvl1 = a[18:]
  np.testing.assert_allclose((lvl1[6:, 0] + lvl1[6:, 2]) / 2, 48.0)  # second cell of level 1
  np.testing.assert_allclose(np.sqrt((lvl1[:6, 2] - lvl1[:6, 0]) * (lvl1[:6, 3] - lvl1[:6, 1])),
                             [64] * 3 + [128] * 3, rtol=1e-5)
  assert anchor_lib.level_counts([(2, 3), (1, 2)], 3) == [18, 6]
  with pytest.raises(UserError):
    anchor_lib.anchors([(2, 2)], [16], sizes=[32, 64])
  # encode / decode round trip, both weightings, with leading dims
  rng = np.random.default_rng(1)
  refs, targets = _random_boxes(rng, 24).reshape(2, 12, 4), _random_boxes(rng, 24).reshape(2, 12, 4)
  for weights in (box_lib.RPN_WEIGHTS, box_lib.ROI_WEIGHTS):
    t = box_lib.encode(targets, refs, weights)
    np.testing.assert_allclose(box_lib.decode(t, refs, weights), targets, rtol=1e-5, atol=1e-3)
  t = np.asarray(box_lib.encode(jnp.array([[12.0, 10, 22, 30]]), jnp.array([[0.0, 0, 20, 10]])))
  np.testing.assert_allclose(t, [[(17 - 10) / 20, (20 - 5) / 10, math.log(10 / 20), math.log(20 / 10)]], rtol=1e-6)
  # decode clamps dw, dh at log(1000/16); clip_boxes
  wild = np.asarray(box_lib.decode(jnp.array([[0.0, 0, 50, 50]]), jnp.array([[0.0, 0, 16, 16]])))
  np.testing.assert_allclose(wild[0, 2] - wild[0, 0], 1000.0, rtol=1e-5)
  np.testing.assert_allclose(box_lib.clip_boxes(jnp.array([[-5.0, 3, 70, 90]]), (64, 48)), [[0, 3, 48, 64]])


# a tiny hand-checkable case: anchors, two real ground-truth boxes and one padding slot
ANCHORS = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [20, 20, 30, 30], [5, 0, 15, 10], [40, 40, 60, 60]], np.float32)
GT = np.array([[[0, 0, 10, 10], [40, 40, 52, 52], [0, 0, 10, 10]]], np.float32)
GT_VALID = np.array([[True, True, False]])
GT_CLASSES = np.array([[3, 7, 5]])


def _bce(logit, label):
  p = 1 / (1 + np.exp(-logit))
  return -(label * np.log(p) + (1 - label) * np.log(1 - p))


def test_rpn_targets_and_loss_by_hand():
  t = _rpn_targets(jnp.asarray(ANCHORS), jnp.asarray(GT), jnp.asarray(GT_VALID), rng=jax.random.key(0))
  # IoUs with gt0: 1, .5, 0, 1/3, 0; with gt1: 0, 0, 0, 0, .36 (gt1's best anchor: a low-quality positive)
  assert t["labels"].tolist() == [[1, -1, 0, -1, 1]]
  expect4 = [(46 - 50) / 20, (46 - 50) / 20, math.log(12 / 20), math.log(12 / 20)]
  np.testing.assert_allclose(t["target_deltas"][0, 4], expect4, rtol=1e-6)
  np.testing.assert_allclose(t["target_deltas"][0, 0], 0.0, atol=1e-6)
  logits = np.array([[0.5, -1.0, 2.0, 0.3, -0.2]], np.float32)
  deltas = np.linspace(-0.5, 0.6, 20, dtype=np.float32).reshape(1, 5, 4)
  for beta in (0.0, 1 / 9):
    loss, m = _rpn_loss(jnp.asarray(logits), jnp.asarray(deltas), t, beta=beta)
    obj = (_bce(0.5, 1) + _bce(2.0, 0) + _bce(-0.2, 1)) / 3

    def sl1(x):
      x = np.abs(x)
      return x if beta == 0 else np.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)

    box = (sl1(deltas[0, 0]).sum() + sl1(deltas[0, 4] - np.asarray(expect4)).sum()) / 3
    np.testing.assert_allclose(m["rpn_objectness"], obj, rtol=1e-5)
    np.testing.assert_allclose(m["rpn_box"], box, rtol=1e-5)
    np.testing.assert_allclose(loss, obj + box, rtol=1e-5)
  # sampling: at most batch · fraction positives, the rest negatives
  many = np.concatenate([np.tile(ANCHORS[:1], (40, 1)), np.tile(ANCHORS[2:3], (40, 1))])
  t = _rpn_targets(jnp.asarray(many), jnp.asarray(GT), jnp.asarray(GT_VALID), rng=jax.random.key(1),
                          batch_per_image=16, positive_fraction=0.25)
  assert int((t["labels"] == 1).sum()) == 4 and int((t["labels"] == 0).sum()) == 12


def test_proposals_decode_clip_and_nms():
  anchors = jnp.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [-5, -5, 5, 5]], jnp.float32)
  logits = jnp.array([[3.0, 2.0, 1.0, 0.0]])
  boxes, scores, valid = _proposals(anchors, logits, jnp.zeros((1, 4, 4)), (64, 64), pre_nms=4, post_nms=4,
                                           iou=0.5)
  assert valid.tolist() == [[True, True, True, False]]  # a1 overlaps a0 at IoU .68
  np.testing.assert_allclose(boxes[0, :3], [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]])
  assert scores[0, :3].tolist() == [3.0, 1.0, 0.0] and scores[0, 3] == -np.inf
  # per level: the pre_nms best of each level, NMS within a level only
  boxes, _, valid = _proposals(anchors, logits, jnp.zeros((1, 4, 4)), (64, 64), pre_nms=1, post_nms=3,
                                      iou=0.5, level_counts=(2, 2))
  assert valid.tolist() == [[True, True, False]]
  np.testing.assert_allclose(boxes[0, :2], [[0, 0, 10, 10], [20, 20, 30, 30]])


def test_proposal_targets_and_box_loss_by_hand():
  props = jnp.array([[[0, 0, 10, 10], [0, 0, 10, 20], [20, 20, 30, 30], [1, 1, 9, 9]]], jnp.float32)
  pvalid = jnp.array([[True, True, True, False]])
  t = _proposal_targets(props, jnp.asarray(GT), jnp.asarray(GT_CLASSES), jnp.asarray(GT_VALID),
                             rng=jax.random.key(0), proposal_valid=pvalid, batch_per_image=16, fg_fraction=1.0)
  # candidates: 4 proposals + 3 gt slots = 7; fg (IoU ≥ .5): p0, p1, gt0, gt1; bg: p2; unused: p3, gt2 (invalid)
  assert t["classes"].tolist() == [[3, 3, 3, 7, -1, -1, -1]]
  assert t["fg"].tolist() == [[True] * 4 + [False] * 3]
  assert t["weights"].tolist() == [[1, 1, 1, 1, 1, 0, 0]]
  np.testing.assert_allclose(t["boxes"][0, :5], [[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 10],
                                                 [40, 40, 52, 52], [20, 20, 30, 30]])
  np.testing.assert_allclose(t["target_deltas"][0, 1], [0, 10 * (5 - 10) / 20, 0, 5 * math.log(10 / 20)],
                             rtol=1e-6)
  np.testing.assert_allclose(t["target_deltas"][0, [0, 2, 3, 4]], 0.0, atol=1e-6)
  d = jnp.asarray(np.linspace(-1, 1, 28, dtype=np.float32).reshape(1, 7, 4))
  expect = np.abs(np.asarray(d)[0, :4] - np.asarray(t["target_deltas"])[0, :4]).sum() / 5
  np.testing.assert_allclose(heads.box_loss(d, t), expect, rtol=1e-6)
  # fg fraction: 25 % of the minibatch at most
  many = jnp.tile(props[:, :1], (1, 40, 1))
  t = _proposal_targets(many, jnp.asarray(GT), jnp.asarray(GT_CLASSES), jnp.asarray(GT_VALID),
                             rng=jax.random.key(1), batch_per_image=8, add_gt=False)
  assert int(t["fg"].sum()) == 2 and t["boxes"].shape == (1, 8, 4)
  # FPN eq. 1: 224² → k0 = 4 (index 2 of strides 4..32), 112² → 3, tiny boxes clamp to P2, huge ones to P5
  lv = heads.level_of(jnp.array([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 4, 4], [0, 0, 2000, 2000.]]),
                      [4, 8, 16, 32])
  assert lv.tolist() == [2, 1, 0, 3]


def test_average_precision_equals_pycocotools():
  from pycocotools.coco import COCO  # noqa: PLC0415
  from pycocotools.cocoeval import COCOeval  # noqa: PLC0415
  rng = np.random.default_rng(0)
  n_img, n_cls = 40, 6
  gts, dts = [], []
  for _ in range(n_img):
    g = int(rng.integers(0, 6))
    gb = _random_boxes(rng, g).astype(np.float64)
    gc = rng.integers(0, n_cls - 1, g)  # class 5 never has ground truth
    k = int(rng.integers(0, 8))
    jitter = gb + rng.normal(0, 3, gb.shape)
    jitter = np.concatenate([np.minimum(jitter[:, :2], jitter[:, 2:]), np.maximum(jitter[:, :2], jitter[:, 2:])], 1)
    db = np.concatenate([jitter, _random_boxes(rng, k)])
    dc = np.concatenate([np.where(rng.random(g) < 0.8, gc, rng.integers(0, n_cls, g)), rng.integers(0, n_cls, k)])
    gts.append({"boxes": gb, "classes": gc})
    dts.append({"boxes": db, "scores": np.round(rng.random(len(db)), 2), "classes": dc})  # score ties
  groups = {"base": [0, 1, 2], "novel": [3, 4, 5]}
  gt_json, res = det_eval.coco_json(dts, gts, class_names=[f"c{i}" for i in range(n_cls)])

  def coco(cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
      cg = COCO()
      cg.dataset = gt_json
      cg.createIndex()
      e = COCOeval(cg, cg.loadRes(res), "bbox")
      e.params.maxDets = [1, 5, 100]
      if cat_ids is not None:
        e.params.catIds = [c + 1 for c in cat_ids]
      e.evaluate()
      e.accumulate()
      e.summarize()
    return e

  def mean_valid(p):
    return float(np.mean(p[p > -1])) if (p > -1).any() else -1.0

  e = coco()
  ours = det_eval.average_precision(dts, gts, class_groups=groups)
  for key, value in zip(("AP", "AP50", "AP75"), e.stats[:3]):  # area 'all', maxDets 100
    np.testing.assert_allclose(ours[key], value, atol=1e-6)
  # per image and class only the 5 best count (precision [T, R, K, area, maxDets]: area 'all', maxDets 5)
  ours = det_eval.average_precision(dts, gts, class_groups=groups, max_dets=5)
  np.testing.assert_allclose(ours["AP"], mean_valid(e.eval["precision"][:, :, :, 0, 1]), atol=1e-6)
  np.testing.assert_allclose(ours["AP50"], mean_valid(e.eval["precision"][0, :, :, 0, 1]), atol=1e-6)
  for name, ids in groups.items():
    p = coco(ids).eval["precision"][:, :, :, 0, 1]
    np.testing.assert_allclose(ours[f"AP_{name}"], mean_valid(p), atol=1e-6)
    np.testing.assert_allclose(ours[f"AP50_{name}"], mean_valid(p[0]), atol=1e-6)
  assert ours["APr"] == ours["AP_novel"] and 0 < ours["AP50"] < 1
  # stacked arrays with a valid mask give the same numbers; perfect detections give AP 1
  stacked = {"boxes": np.zeros((n_img, 16, 4)), "scores": np.zeros((n_img, 16)),
             "classes": np.zeros((n_img, 16), int), "valid": np.zeros((n_img, 16), bool)}
  for i, d in enumerate(dts):
    m = len(d["scores"])
    for k in ("boxes", "scores", "classes"):
      stacked[k][i, :m] = d[k]
    stacked["valid"][i, :m] = True
  assert det_eval.average_precision(stacked, gts, class_groups=groups, max_dets=5) == ours
  perfect = [{"boxes": g["boxes"], "scores": np.ones(len(g["classes"])), "classes": g["classes"]} for g in gts]
  assert det_eval.average_precision(perfect, gts)["AP"] == pytest.approx(1.0)


def test_detection_plot_and_json(tmp_path):
  images = np.zeros((2, 32, 32, 3), np.uint8)
  dets = {"boxes": np.array([[[2, 2, 12, 12]], [[4, 4, 20, 20]]], float), "scores": np.array([[0.9], [0.1]]),
          "classes": np.array([[0], [1]])}
  gt = {"boxes": np.array([[[2, 2, 12, 12]], [[0, 0, 0, 0]]], float), "classes": np.array([[0], [-1]]),
        "valid": np.array([[True], [False]])}
  path = det_eval.draw_detections(str(tmp_path / "plots" / "detections.png"), images, dets, ["a", "b"],
                                  ground_truth=gt, novel=[1])
  assert open(path, "rb").read(4) == b"\x89PNG"
  det_eval.write_coco_json(str(tmp_path / "d.json"), dets, gt, class_names=["a", "b"], image_hw=(32, 32))
  gt_json, res = det_eval.coco_json(dets, gt, class_names=["a", "b"])
  assert len(gt_json["annotations"]) == 1 and res[1] == {"image_id": 2, "category_id": 2,
                                                         "bbox": [4.0, 4.0, 16.0, 16.0], "score": 0.1}


# ---- the detector ---------------------------------------------------------------------------------------------

TINY = {"framework": "detector", "embed_dim": 16, "pyramid_channels": 16, "fc_dim": 32, "roi_size": 2,
        "canonical_size": 32.0, "pre_nms_train": 24, "post_nms_train": 16, "pre_nms_test": 24, "post_nms_test": 16,
        "rpn_batch_per_image": 32, "roi_batch_per_image": 16}


def _INIT_KEY():  # noqa: N802
  """rbg keys: the backbone's truncated-normal initialisers compile ~3× faster than with threefry on CPU."""
  return jax.random.key(0, impl="rbg")


def _gt(b):
  rng = np.random.default_rng(3)
  boxes = np.stack([_random_boxes(rng, 3, size=40.0) for _ in range(b)])
  valid = rng.random((b, 3)) < 0.8
  return {"boxes": jnp.asarray(boxes), "classes": jnp.asarray(rng.integers(0, 10, (b, 3))),
          "valid": jnp.asarray(valid)}


def test_detector_vit_simple_pyramid_forward():
  model = build_model({**TINY, "image": {"kind": "vit", "variant": "tiny", "patch_size": 8, "image_size": 32}})
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  v = jax.jit(lambda x: model.init(_INIT_KEY(), x))(x)
  out = jax.jit(model.apply)(v, x)
  assert out["region_embeddings"].shape == (2, 16, 16) and out["boxes"].shape == (2, 16, 4)
  # ViTDet scales 4, 2, 1, ½ of the stride-8 grid (+ P6): strides 2, 4, 8, 16, 32
  assert out["anchors"].shape == ((16 ** 2 + 8 ** 2 + 4 ** 2 + 2 ** 2 + 1) * 3, 4)
  with pytest.raises(UserError):
    build_model({**TINY, "image": {"kind": "vit", "variant": "tiny"}, "pyramid": "fpn"})
  with pytest.raises(UserError):
    build_model({**TINY, "image": {"kind": "resnet", "variant": "tiny"}, "bogus": 1})


def test_detector_train_step_sharded_equals_single_device():
  model = build_model({**TINY, "image": {"kind": "resnet", "layers": (1, 1, 1, 1), "width": 8, "heads": 2,
                                         "output_dim": 16, "image_size": 64}})
  b = 8
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, 64, 64, 3)), jnp.float32)
  gt = _gt(b)
  boxed = jax.eval_shape(lambda: model.init(_INIT_KEY(), x))
  variables = nn.meta.unbox(jax.jit(lambda: model.init(_INIT_KEY(), x))())

  def loss_fn(params, rest, x, gt):
    out = model.apply({"params": params, **rest}, x, gt=gt, train=True, rng=jax.random.key(5))
    emb = jnp.sum(out["region_embeddings"] ** 2 * out["targets"]["weights"][..., None]) * 1e-2
    return out["rpn_loss"] + out["box_loss"] + emb, out["losses"]

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  (ref_loss, ref_aux), ref_grads = step(params, rest, x, gt)
  assert np.isfinite(float(ref_loss)) and float(ref_aux["rpn_num_pos"]) > 0
  assert float(jnp.abs(ref_grads["box_head"]["region_proj"]["kernel"]).sum()) > 0
  assert float(jnp.abs(ref_grads["backbone"]["conv1"]["kernel"]).sum()) > 0

  mesh = mesh_lib.make_mesh({"data": 8})
  rules = partitioning.DEFAULT_RULES
  shardings = partitioning.logical_to_shardings(boxed, mesh, rules)
  sharded = partitioning.shard_like(variables, shardings)
  xs = jax.device_put(x, mesh_lib.batch_sharding(mesh, 4))
  gts = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.ndim)) for k, v in gt.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        sharded["params"], {k: v for k, v in sharded.items() if k != "params"}, xs, gts)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for k in ref_aux:
    np.testing.assert_allclose(float(aux[k]), float(ref_aux[k]), rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=2e-4, atol=1e-6),
               grads, ref_grads)
