"""Real-data masks for the segmentation students (issue 16): `--config.data.masks=IMAGES:LABELS:CLASSES`. A tiny
folder written from the synthetic scenes (images, PNG label maps at twice the size with 255 for the background,
the class list) reads back exactly the written labels (nearest-neighbour resize, novel pixels ignored in the
training view), user mistakes are one-line UserErrors, and a micro LSeg run on the folder trains and evaluates."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests import train_helpers as th


def _write_folder(root, n: int = 12, size: int = 64):
  """(IMAGES:LABELS:CLASSES spec, images uint8 [n, S, S, 3], raw label values int [n, S, S], class names)."""
  from PIL import Image

  from vlm_jax.distill import seg_data
  src = seg_data.SyntheticSegmentation("train", "eval", seed=3, image_size=size, num_images=n)
  images, labels = src.images(range(n)), src.masks(range(n))
  raw = np.where(labels > 0, labels - 1, 255)  # class id, 255 = ignore (the scenes' background)
  img_dir, lab_dir = root / "images", root / "labels"
  img_dir.mkdir()
  lab_dir.mkdir()
  for i in range(n):
    Image.fromarray(images[i]).save(img_dir / f"{i:04d}.png")
    big = np.repeat(np.repeat(raw[i], 2, 0), 2, 1).astype(np.uint8)  # label maps at twice the image size
    Image.fromarray(big, mode="L").save(lab_dir / f"{i:04d}.png")
  (root / "classes.txt").write_text("\n".join(src.names) + "\n")
  return f"{img_dir}:{lab_dir}:{root / 'classes.txt'}", images, raw, src


def test_loader_returns_exactly_the_written_labels(tmp_path):
  from vlm_jax.distill import seg_data
  spec, images, raw, syn = _write_folder(tmp_path)
  novel_names = [n for n, nv in zip(syn.names, syn.novel) if nv]
  d = {"masks": spec, "image_size": 64, "num_train": 0, "num_eval": 4, "seed": 0,
       "novel_classes": ",".join(novel_names)}
  train, ev, sup = (seg_data.make_source(d, v) for v in ("train", "eval", "support"))
  assert (len(train), len(ev), len(sup)) == (8, 4, 8) and train.names == syn.names
  np.testing.assert_array_equal(train.novel, syn.novel)
  assert train.test_mask.all() and train.has_ignore
  full = np.where(raw == 255, -1, raw + 1)  # the students' labels: class i -> i + 1, ignored -> −1
  np.testing.assert_array_equal(ev.masks(range(4)), full[8:])
  np.testing.assert_array_equal(sup.masks(range(8)), full[:8])
  novel_px = np.isin(raw[:8], np.nonzero(syn.novel)[0])
  assert novel_px.any()
  np.testing.assert_array_equal(train.masks(range(8)), np.where(novel_px, -1, full[:8]))  # novel: ignored
  np.testing.assert_array_equal(train.images(range(8)), images[:8])  # same size: pixels as written
  # a count: that many novel classes, drawn by the seed; images resized bilinearly to another size
  d2 = {**d, "novel_classes": "5", "image_size": 32}
  s2 = seg_data.make_source(d2, "eval")
  assert s2.novel.sum() == 5 and s2.image(0).shape == (32, 32, 3)
  np.testing.assert_array_equal(s2.mask(0), full[8][1::2, 1::2])  # nearest neighbour (pixel centres), 4× down
  assert seg_data.settings(d)["masks"] == spec  # the folder keys the teacher caches
  assert "masks" not in seg_data.settings({"image_size": 64, "num_train": 8, "seed": 0, "masks": ""})


def test_folder_mistakes_are_one_line_user_errors(tmp_path):
  from PIL import Image

  from vlm_jax import preflight
  from vlm_jax.distill import seg_data
  from vlm_jax.errors import UserError
  spec, _, raw, _ = _write_folder(tmp_path, n=6)
  img_dir, lab_dir, classes = spec.split(":")
  d = {"masks": spec, "image_size": 64, "num_train": 0, "num_eval": 2, "seed": 0, "novel_classes": ""}
  c = th.load_config("configs/distill/lseg.py", "micro")
  c.data.masks = f"{tmp_path / 'nowhere'}:{lab_dir}:{classes}"
  with pytest.raises(UserError, match="image folder .*nowhere does not exist"):
    preflight.distill(c, {"workdir": str(tmp_path / "run")})
  for bad, match in (("a:b", "IMAGES:LABELS:CLASSES"), (f"{img_dir}:{lab_dir}:{tmp_path / 'x.txt'}", "class-list")):
    with pytest.raises(UserError, match=match):
      seg_data.make_source({**d, "masks": bad}, "train")
  Image.fromarray(np.full((8, 8), 64, np.uint8), mode="L").save(os.path.join(lab_dir, "0002.png"))  # 64 classes
  with pytest.raises(UserError, match="holds value 64, beyond the 64 classes") as e:
    seg_data.make_source(d, "support").mask(2)
  assert "\n" not in str(e.value)
  with open(os.path.join(lab_dir, "0003.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not a png")
  with pytest.raises(UserError, match="cannot read label map .*0003.png"):
    seg_data.make_source(d, "support").mask(3)
  Image.fromarray(raw[0].astype(np.uint8), mode="L").save(os.path.join(lab_dir, "orphan.png"))
  with pytest.raises(UserError, match="label map .*orphan.png has no image orphan"):
    seg_data.make_source(d, "train")
  os.remove(os.path.join(lab_dir, "orphan.png"))
  with pytest.raises(UserError, match="novel_classes names"):
    seg_data.make_source({**d, "novel_classes": "red circle,unicorn"}, "train")


def test_lseg_micro_run_on_a_mask_folder_evaluates(tmp_path, pretrained_resnet):
  """LSeg (which reads ground truth) trains on the folder's training maps and evaluates on its held-out ones."""
  from vlm_jax.distill import segmentation
  spec, _, raw, syn = _write_folder(tmp_path, n=16)
  c = th.load_config("configs/distill/lseg.py", "micro")
  c.teacher.checkpoint = pretrained_resnet
  c.teacher_cache.dir = str(tmp_path / "cache")
  c.data.masks, c.data.novel_classes = spec, ",".join(n for n, nv in zip(syn.names, syn.novel) if nv)
  c.data.num_eval, c.evals.segmentation.num_images = 8, 8
  c.baselines = ()
  c.total_steps, c.batch_size, c.checkpoint_every_steps, c.log_every_steps = 4, 8, 4, 2
  m = segmentation.distill(c, str(tmp_path / "run"), quiet=True)
  print({k: round(v, 4) for k, v in m.items() if k.endswith(("miou_base", "miou_novel", "hiou", "pixel_accuracy"))})
  for who in ("", "teacher/", "broadcast/"):
    for key in ("miou_base", "miou_novel", "hiou", "pixel_accuracy"):
      assert np.isfinite(m[f"{who}segmentation/{key}"])
  assert m["segmentation/pixel_accuracy"] > 0  # scored on labelled pixels (255 skipped)
  assert os.path.exists(tmp_path / "run" / "plots" / "segmentation_overlays.png")
