"""Open-vocabulary scenes: the fixed base/novel split, determinism, boxes vs masks, and the two views."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_jax.data import synthetic, synthetic_scenes
from vlm_jax.errors import UserError

S = 48


def test_class_split_is_fixed_disjoint_and_balanced():
  g = synthetic_scenes.class_split()
  base, novel, held = (set(g[k].tolist()) for k in ("base", "novel", "heldout"))
  assert len(base) == 32 and len(novel) == 16 and len(held) == 16
  assert base | novel | held == set(range(64)) and not base & novel and not (base | novel) & held
  src = synthetic.SyntheticShapes("train", image_size=32)
  assert held == set(src.unseen_classes.tolist())  # pre-training's held-out pairs never appear in a scene
  names = synthetic_scenes.class_names()
  assert names == src.class_names()
  assert [names[c] for c in g["novel"][:3]] == ["orange circle", "blue circle", "yellow square"]  # as documented
  for k in range(8):  # every shape and every colour has 4 base and 2 novel partners
    assert sum(c // 8 == k for c in novel) == sum(c % 8 == k for c in novel) == 2
    assert sum(c // 8 == k for c in base) == sum(c % 8 == k for c in base) == 4


def test_deterministic_and_splits_disjoint():
  a = synthetic_scenes.OpenVocabScenes("test", seed=2, image_size=S)
  b = synthetic_scenes.OpenVocabScenes("test", seed=2, image_size=S)
  for i in (0, 5, 400):
    ea, eb = a[i], b[i]
    assert ea["caption"] == eb["caption"]
    for k in ea:
      if k != "caption":
        np.testing.assert_array_equal(ea[k], eb[k])
  assert not np.array_equal(synthetic_scenes.OpenVocabScenes("test", seed=3, image_size=S)[0]["image"],
                            a[0]["image"])
  seen = {}
  for split in synthetic_scenes.SPLITS:
    for img in synthetic_scenes.scene_arrays(split, 64, image_size=S)["image"]:
      assert seen.setdefault(img.tobytes(), split) == split
  assert len(seen) == 192
  with pytest.raises(UserError, match="unknown split"):
    synthetic_scenes.OpenVocabScenes("eval")
  with pytest.raises(UserError, match="unknown view"):
    synthetic_scenes.OpenVocabScenes("test", view="all")


def test_boxes_masks_and_pixels_agree():
  src = synthetic_scenes.OpenVocabScenes("val", image_size=S)
  counts = np.zeros(5, int)
  for i in range(60):
    e, layout = src[i], src.layout(i)
    n = int(e["valid"].sum())
    counts[n] += 1
    assert n == len(layout.classes) and e["valid"][:n].all() and not e["valid"][n:].any()
    inst, sem = e["instance_mask"], e["semantic_mask"]
    assert set(np.unique(inst)) == set(range(n + 1))  # every object is visible
    img = e["image"].astype(int)
    for k in range(n):
      m = inst == k + 1
      ys, xs = np.nonzero(m)
      np.testing.assert_array_equal(e["boxes"][k], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
      assert np.all(sem[m] == e["classes"][k] + 1)
      assert e["is_novel"][k] == (e["classes"][k] in set(src.novel_classes.tolist()))
      exact = np.all(np.abs(img - np.array(layout.rgbs[k])) <= 1, axis=-1)
      assert exact[m].mean() >= 0.3 and not exact[inst == 0].any()  # thin rings and crosses: many edge pixels
    assert np.all(sem[inst == 0] == 0) and np.all(e["classes"][n:] == -1) and not e["boxes"][n:].any()
    named = [p.strip() for p in e["caption"].replace(" and ", ", ").split(", ")]
    assert named == [f"{'an' if src.class_names()[c][0] in 'aeiou' else 'a'} {src.class_names()[c]}"
                     for c in layout.classes]
  assert counts[2] and counts[3] and counts[4]  # 2–4 objects


def test_novel_objects_unlabelled_in_training_and_annotated_for_evaluation():
  train = synthetic_scenes.OpenVocabScenes("train", image_size=S)
  assert train.view == "train" and synthetic_scenes.OpenVocabScenes("test").view == "eval"
  novel = set(train.novel_classes.tolist())
  n_novel_objects = 0
  for i in range(80):
    t, e = train[i], train.element(i, "eval")
    np.testing.assert_array_equal(t["image"], e["image"])  # the same pixels, two annotation views
    assert not novel & set(t["classes"].tolist()) and not t["is_novel"].any()
    assert not novel & {int(c) - 1 for c in np.unique(t["semantic_mask"]) if c}
    is_novel_pixel = np.isin(e["semantic_mask"] - 1, list(novel))
    assert not t["semantic_mask"][is_novel_pixel].any() and not t["instance_mask"][is_novel_pixel].any()
    base_k = np.nonzero(e["valid"] & ~e["is_novel"])[0]
    assert int(t["valid"].sum()) == len(base_k)  # base objects compacted to the first slots, in order
    np.testing.assert_array_equal(t["classes"][:len(base_k)], e["classes"][base_k])
    np.testing.assert_array_equal(t["boxes"][:len(base_k)], e["boxes"][base_k])
    for j, k in enumerate(base_k):
      np.testing.assert_array_equal(t["instance_mask"] == j + 1, e["instance_mask"] == k + 1)
    n_novel_objects += int(e["is_novel"].sum())
  print(f"{n_novel_objects} novel objects in 80 training scenes, all unlabelled in the training view")
  assert n_novel_objects > 40  # p_novel = 0.35 of ~240 objects
  arrays = synthetic_scenes.scene_arrays("test", 32, image_size=S)
  assert arrays["is_novel"].any() and (arrays["valid"] & ~arrays["is_novel"]).any()
  assert arrays["boxes"].shape == (32, 4, 4) and arrays["instance_mask"].shape == (32, S, S)

