"""Distribution-shift tasks of the procedural dataset: names, class lists, splits, determinism and real shifts."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from vlm_jax.data import synthetic, synthetic_shift
from vlm_jax.errors import UserError

S = 32


def _task(name, split="test", n=128, seed=0):
  return synthetic_shift.get_task(name, split, n, seed, image_size=S)


def test_tasks_have_class_lists_in_the_tokenizer_vocabulary():
  vocab = set(synthetic.vocabulary())
  sizes = {"base": 64, "shifted_hues": 64, "new_colours": 16, "new_shapes": 16, "unseen_compositions": 16,
           "textured": 64, "outline": 64}
  assert set(sizes) == set(synthetic_shift.TASKS)
  base_names = synthetic.SyntheticShapes("eval_seen", image_size=S).class_names()
  for name, c in sizes.items():
    images, labels, names, templates = _task(name, n=2 * c)
    assert images.shape == (2 * c, S, S, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
    assert len(names) == len(set(names)) == c
    np.testing.assert_array_equal(np.bincount(labels, minlength=c), 2)  # n = k·C gives k shots per class
    for t in templates:
      assert "{}" in t and set(synthetic.tokenize_words(t.format(names[0]))) <= vocab, t
    assert all(set(synthetic.tokenize_words(n)) <= vocab for n in names)
  assert _task("base", n=1).class_names == base_names
  # the data package keeps a copy of the bundled synthetic prompt set (templates/synthetic.txt)
  [bundled] = pathlib.Path(synthetic.__file__).parents[1].glob("**/templates/synthetic.txt")
  lines = [ln.strip() for ln in bundled.read_text().splitlines()]
  assert synthetic_shift.TEMPLATES == tuple(ln for ln in lines if ln and not ln.startswith("#"))
  train_classes = set(synthetic.SyntheticShapes("train", image_size=S).seen_classes.tolist())
  unseen = _task("unseen_compositions", n=1).class_names
  assert not {base_names.index(n) for n in unseen} & train_classes  # held-out pairs only
  assert not set(_task("new_colours", n=1).class_names) & set(base_names)
  assert not set(_task("new_shapes", n=1).class_names) & set(base_names)
  with pytest.raises(UserError, match="unknown synthetic shift task"):
    synthetic_shift.get_task("nope", "train", 4)
  with pytest.raises(UserError, match="unknown split"):
    synthetic_shift.get_task("base", "eval", 4)


def test_deterministic_and_splits_disjoint():
  a = _task("textured", "train", 64, seed=3)
  b = synthetic_shift.get_task("textured", "train", 64, 3, image_size=S)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(synthetic_shift.render_one("textured", "train", 5, seed=3, image_size=S),
                                a.images[5])
  assert not np.array_equal(_task("textured", "train", 64, seed=4).images, a.images)
  seen = {}
  for split in synthetic_shift.SPLITS:
    for img in _task("base", split, 256).images:
      assert seen.setdefault(img.tobytes(), split) == split, "an image is in two splits"
  pretrain = synthetic.SyntheticShapes("val", image_size=S)
  assert not {pretrain[i]["image"].tobytes() for i in range(64)} & set(seen)
  assert len(seen) == 3 * 256


def _stats(images: np.ndarray) -> dict:
  x = images.astype(np.float32) / 255
  hsv_sat = x.max(-1) - x.min(-1)
  border = np.concatenate([x[:, :2].reshape(len(x), -1, 3), x[:, -2:].reshape(len(x), -1, 3)], 1)
  sat = hsv_sat > 0.4  # object pixels (backgrounds are near grey or muted)
  inner = sat[:, 1:-1, 1:-1] & sat[:, :-2, 1:-1] & sat[:, 2:, 1:-1] & sat[:, 1:-1, :-2] & sat[:, 1:-1, 2:]
  return {"background_std": float(border.std(1).mean()), "mean_saturation": float(hsv_sat.mean()),
          "saturated_fraction": float(sat.mean()),
          "interior_fraction": float(inner.sum() / max(sat.sum(), 1))}  # object pixels not on an edge


def test_shift_variants_differ_from_the_base_distribution():
  """A simple statistic per variant moves well past its spread between two base samples."""
  base, base2 = _stats(_task("base", n=256).images), _stats(_task("base", "val", n=256).images)
  shifted = {name: _stats(_task(name, n=256).images)
             for name in ("textured", "outline", "shifted_hues", "new_colours")}
  print({"base": base, "base (val split)": base2, **shifted})
  for k in base:  # the statistics are stable across two samples of one distribution (well within the margins below)
    assert abs(base[k] - base2[k]) < 0.15 * base[k], k
  assert shifted["textured"]["background_std"] > 3 * base["background_std"]
  assert shifted["outline"]["interior_fraction"] < 0.5 * base["interior_fraction"]  # thin strokes: mostly edge
  assert shifted["shifted_hues"]["mean_saturation"] < base["mean_saturation"] - 0.02
  assert shifted["new_colours"]["saturated_fraction"] < 0.5 * base["saturated_fraction"]  # brown and black
  # the hue shift moves every colour: mean object colour per class differs from the base one
  a, b = _task("base", n=640), _task("shifted_hues", n=640)
  for c in range(8):
    fa = a.images[a.labels % 8 == c].reshape(-1, 3).astype(float)
    fb = b.images[b.labels % 8 == c].reshape(-1, 3).astype(float)
    obj = lambda f: f[(f.max(1) - f.min(1)) > 60].mean(0)  # noqa: E731 (saturated pixels: the objects)
    assert np.abs(obj(fa) - obj(fb)).max() > 15, synthetic.COLOURS[c][0]
  # unseen compositions are drawn exactly like base images of the same classes (only the class set shifts)
  u = _task("unseen_compositions", n=16)
  assert _stats(u.images)["background_std"] == pytest.approx(base["background_std"], abs=0.01)

