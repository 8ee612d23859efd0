"""CLIPSeg visual prompts (issue 16; Lüddecke & Ecker 2022 §3): the engineered prompt image by hand, FiLM conditioning
with a visual prompt embedding equals itself across batch layouts, a conditional vector equal to a class's text
embedding gives bit for bit the text path's mask, 'text' rows are today's rows, 'visual' / 'mixed' rows carry another
training example's prompt (interpolated with the text embedding), and a micro 'mixed' run writes the text- and
visual-prompt metrics."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from tests import train_helpers as th
from tests.test_distill_clipseg import _model


def test_prompt_image_by_hand():
  """Background at β of its (here unblurred) intensity, the crop a square around the object's box padded black."""
  from vlm_jax.distill import visual_prompts as vp
  img = np.full((1, 16, 16, 3), 200, np.uint8)
  img[0, 4:8, 2:10] = (0, 100, 250)  # the object: 4 rows × 8 columns
  mask = np.zeros((1, 16, 16), bool)
  mask[0, 4:8, 2:10] = True
  out = vp.prompt_images(img, mask, 8, background=0.1, blur=0.0, context=0.0)
  assert out.shape == (1, 8, 8, 3)
  # the 8-wide box becomes an 8 × 8 square: object in output rows 2..5 (bilinear samples mix the edge rows), black
  # bands above and below
  np.testing.assert_allclose(out[0, 3:5, 1:7], np.broadcast_to([0, 100, 250], (2, 6, 3)), atol=0.05)
  np.testing.assert_allclose(out[0, 0], 0.0, atol=1e-4)
  np.testing.assert_allclose(out[0, 7], 0.0, atol=1e-4)
  # with context the darkened background (0.1 × 200 = 20) enters the crop around the object
  ctx = vp.prompt_images(img, mask, 16, background=0.1, blur=0.0, context=0.25)
  assert abs(float(ctx[0, 8, 1, 0]) - 20.0) < 0.5 and abs(float(ctx[0, 8, 8, 2]) - 250.0) < 0.5
  # blur mixes the object's colour into the background next to it, never into the object
  blurred = vp.prompt_images(img, mask, 16, background=1.0, blur=1.0, context=0.25)
  assert blurred[0, 8, 1, 0] < 199 and abs(float(blurred[0, 8, 8, 2]) - 250.0) < 0.5


def test_film_visual_condition_equals_itself_across_batch_layouts():
  """A (image, conditional vector) pair's mask is the same wherever the pair sits (bit for bit at one batch shape,
  alone to float rounding); a vector equal to class c's normalised text embedding gives the class-id path's mask."""
  model, variables, images = _model()
  apply = jax.jit(lambda v, b: model.apply(v, b)["mask_logits"])
  rng = np.random.default_rng(1)
  v = rng.normal(size=(4, 8)).astype(np.float32)
  v /= np.linalg.norm(v, axis=-1, keepdims=True)  # stand-ins for visual prompt embeddings
  q = np.zeros((3, 2), np.int32)  # ignored when conditions are given
  alone = apply(variables, {"image": images[1:2], "queries": q[:1, :1], "conditions": v[None, None, 2]})[0, 0]
  batched = apply(variables, {"image": images, "queries": q, "conditions": v[[[0, 1], [3, 2], [2, 0]]]})
  moved = apply(variables, {"image": images[[1, 2, 0]], "queries": q, "conditions": v[[[2, 3], [1, 0], [0, 1]]]})
  diff = float(np.abs(np.asarray(batched[1, 1]) - alone).max())
  print(f"visual condition: max |alone − in batch| = {diff:.3g}; "
        f"logits {float(alone.min()):.3f}..{float(alone.max()):.3f}")
  np.testing.assert_array_equal(np.asarray(moved[0, 0]), np.asarray(batched[1, 1]))
  np.testing.assert_allclose(np.asarray(batched[1, 1]), np.asarray(alone), rtol=0, atol=1e-5)
  assert not np.allclose(np.asarray(batched[1, 0]), np.asarray(alone))  # another prompt, another mask
  # the text path: class ids looked up in the constants == those (normalised) embeddings given as conditions
  ids = np.array([[0, 1], [4, 3], [3, 2]], np.int32)
  t = jax.jit(lambda v, i: model.apply(v, i, method="query_embeddings"))(variables, ids)  # normalised t_c
  by_id = apply(variables, {"image": images, "queries": ids})
  by_vec = apply(variables, {"image": images, "queries": ids, "conditions": np.asarray(t)})
  np.testing.assert_array_equal(np.asarray(by_vec), np.asarray(by_id))


def _bank(num_classes=6, e=8, p=3):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(num_classes, p, e)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  images = np.arange(num_classes * p).reshape(num_classes, p)  # class c's examples: images 3c..3c+2
  images[5] = -1  # class 5 has no support example
  return {"embeddings": emb, "images": images}, rng.normal(size=(num_classes, e)).astype(np.float32)


def test_text_rows_are_todays_rows_and_mixed_rows_interpolate():
  from vlm_jax.distill import clipseg
  labels = np.zeros((8, 8), np.int32)
  labels[:2, :2], labels[4:, 4:] = 3, 5
  make = lambda i: {"image": np.zeros((8, 8, 3)), "labels": labels}  # noqa: E731
  base = np.array([0, 1, 2, 3, 4, 5])
  bank, text = _bank()
  assert clipseg.conditions_fn("text", text, None, 0) is None
  old = clipseg.with_queries(make, base, 3, seed=0)(3)
  new = clipseg.with_queries(make, base, 3, seed=0, conditions=clipseg.conditions_fn("text", text, None, 0))(3)
  assert sorted(new) == sorted(old) == ["image", "queries", "targets"]
  for k in old:
    np.testing.assert_array_equal(new[k], old[k])
  t = text / np.linalg.norm(text, axis=-1, keepdims=True)
  for cond in ("visual", "mixed"):
    fn = clipseg.conditions_fn(cond, text, bank, seed=0)
    i = 7  # class 2's examples are images 6, 7, 8: image 7 itself is never its own prompt
    row = clipseg.with_queries(make, base, 6, seed=0, conditions=fn)(i)
    np.testing.assert_array_equal(row["conditions"], fn(i, row["queries"]))  # deterministic per (seed, image)
    alphas = []
    for c, x in zip(row["queries"], row["conditions"]):
      if c == 5:  # no support example: the text embedding
        np.testing.assert_allclose(x, t[5], atol=1e-6)
        continue
      fits = []
      for j in range(3):
        if bank["images"][c, j] == i:
          continue
        d = bank["embeddings"][c, j] - t[c]
        a = float(np.dot(x - t[c], d) / np.dot(d, d))
        if np.allclose(a * d + t[c], x, atol=1e-5):
          fits.append(a)
      assert fits, (cond, c)
      alphas.append(fits[0])
    if cond == "visual":
      np.testing.assert_allclose(alphas, 1.0, atol=1e-5)
    else:
      assert all(0.0 <= a <= 1.0 for a in alphas) and np.std(alphas) > 0.05
    print(cond, "interpolation weights a:", np.round(alphas, 3))


def test_mixed_micro_run_writes_text_and_visual_metrics(tmp_path, pretrained_vit):
  from vlm_jax.distill import segmentation
  c = th.load_config("configs/distill/clipseg.py", "micro")
  c.teacher.checkpoint = pretrained_vit
  c.teacher_cache.dir = str(tmp_path / "cache")
  c.method.conditioning = "mixed"
  c.total_steps, c.checkpoint_every_steps, c.log_every_steps = 4, 4, 2
  c.data.num_train, c.data.num_eval, c.evals.segmentation.num_images = 16, 8, 8
  c.evals.segmentation.plots = False
  m = segmentation.distill(c, str(tmp_path / "run"), quiet=True)
  with open(os.path.join(tmp_path, "run", "results.json")) as f:
    saved = json.load(f)
  for prefix in ("segmentation/", "visual/segmentation/", "teacher/segmentation/"):
    for key in ("miou_base", "miou_novel", "hiou", "pixel_accuracy"):
      assert np.isfinite(m[prefix + key]) and saved[prefix + key] == m[prefix + key], prefix + key
  print({k: round(v, 4) for k, v in m.items() if k.endswith(("miou_base", "miou_novel", "hiou"))})
  with open(os.path.join(tmp_path, "run", "config.json")) as f:
    assert json.load(f)["method"]["conditioning"] == "mixed"


def test_support_examples_are_seeded_and_cover_the_class():
  """Support examples: images where the class covers >= min_pixels, drawn without replacement by the seed (the
  same draw every time, another one for another seed or stream); none qualifying: −1 (text fallback)."""
  from vlm_jax.distill import seg_data
  from vlm_jax.distill import visual_prompts as vp
  src = seg_data.make_source({"image_size": 64, "num_train": 24, "num_eval": 4, "seed": 0}, "support")
  idx = np.arange(len(src))
  areas = vp.class_areas(src, idx, len(src.names))
  np.testing.assert_array_equal(areas[5], np.bincount(src.mask(5).ravel(), minlength=66)[1:65])
  classes = np.nonzero(src.test_mask)[0]
  a = vp.select(areas, idx, classes, 2, min_pixels=16, seed=0, stream=2)
  np.testing.assert_array_equal(a, vp.select(areas, idx, classes, 2, min_pixels=16, seed=0, stream=2))
  assert not np.array_equal(a, vp.select(areas, idx, classes, 2, min_pixels=16, seed=1, stream=2))
  for j, c in enumerate(classes):
    for i in a[j]:
      assert i == -1 or areas[i, c] >= 16
    assert (a[j] >= 0).sum() == min(2, int((areas[:, c] >= 16).sum()))
  none = vp.select(areas, idx, classes, 1, min_pixels=10 ** 6, seed=0, stream=2)
  assert np.all(none == -1)


def test_conditioning_mistakes_are_user_errors(tmp_path):
  import pytest

  from vlm_jax import preflight
  from vlm_jax.errors import UserError
  flags = {"workdir": str(tmp_path / "run")}
  for key, value, match in (("conditioning", "both", "conditioning must be one of"),
                            ("visual_prompt.background", 2.0, "background"),
                            ("visual_prompt.blur", -1.0, "blur"), ("visual_prompt.supports", 0, "supports")):
    c = th.load_config("configs/distill/clipseg.py", "micro")
    node, *rest = key.split(".")
    if rest:
      c.method[node][rest[0]] = value
    else:
      c.method[node] = value
    with pytest.raises(UserError, match=match):
      preflight.distill(c, flags)
  c = th.load_config("configs/distill/clipseg.py", "micro")
  c.method.conditioning = "mixed"
  preflight.distill(c, flags)
