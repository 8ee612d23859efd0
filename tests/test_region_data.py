"""Region annotations in the data: caption phrases of the synthetic scenes, box transform under crop and flip,
and the pipeline's 'boxes' / 'phrases' / 'region_valid' / 'region_class' (deterministic, so resume stays exact)."""

from __future__ import annotations

import numpy as np

from vlm_jax.data import pipeline, synthetic, synthetic_shards, transforms
from vlm_jax.data.tokenizers import get_tokenizer


def test_object_phrases_follow_the_caption():
  assert synthetic_shards.object_phrases("a photo of a small crimson disk, a blue star and an emerald moon") == [
      "small crimson disk", "blue star", "emerald moon"]
  assert synthetic_shards.object_phrases("there is a mid-sized golden plus on the left") == ["mid-sized golden plus"]
  src = synthetic.SyntheticShapes("train", image_size=32)
  for i in range(200):  # every scene's phrases name its classes, in order
    scene = src.scene(i)
    meta = synthetic_shards.object_meta(scene, src.render(scene))
    for obj, c in zip(meta["objects"], scene.classes):
      shape, colour = src.shape_colour(c)
      words = obj["phrase"].split(" ")
      assert words[-1] in synthetic.SHAPES[shape][1] and words[-2] in synthetic.COLOURS[colour][2]


def test_transform_boxes_crop_flip_and_drop():
  """Crop (10, 0, 30, 20) of a 40×20 image: box (10, 0, 20, 10) -> (0, 0, .5, .5); flipped -> (.5, 0, 1, .5);
  a box mostly outside the crop is dropped, one half inside is clipped and kept."""
  boxes = np.array([[10, 0, 20, 10], [0, 0, 12, 10], [25, 5, 35, 15]], np.float32)
  out, keep = transforms.transform_boxes(boxes, (10, 0, 30, 20), False)
  np.testing.assert_allclose(out, [[0, 0, .5, .5], [0, 0, 0, 0], [.75, .25, 1, .75]], atol=1e-6)
  np.testing.assert_array_equal(keep, [True, False, True])
  out, _ = transforms.transform_boxes(boxes, (10, 0, 30, 20), True)
  np.testing.assert_allclose(out[0], [.5, 0, 1, .5], atol=1e-6)


def test_crop_box_is_the_one_the_image_used():
  from PIL import Image
  img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
  a = transforms.random_resized_crop(img, 16, np.random.default_rng(5), scale=(0.3, 0.6), flip=True)
  b, box, flipped = transforms.random_resized_crop(img, 16, np.random.default_rng(5), scale=(0.3, 0.6), flip=True,
                                                   return_box=True)
  np.testing.assert_array_equal(a, b)
  ref = np.asarray(img.resize((16, 16), Image.BICUBIC, box=box))
  np.testing.assert_array_equal(b, ref[:, ::-1] if flipped else ref)


def test_pipeline_emits_regions(tmp_path):
  tok = get_tokenizer("words", context_length=24)
  data = {"name": "synthetic", "image_size": 32, "cache_dir": str(tmp_path), "regions": 3,
          "synthetic": {"num_train": 64, "shard_size": 16}, "shuffle_buffer": 8, "cycle_length": 2,
          "augment": {"crop_scale": (0.5, 1.0), "flip": True}}
  it = pipeline.make_train_iterator(data, global_batch_size=8, seed=1, tokenizer=tok)
  batches = [next(it) for _ in range(4)]
  b = batches[0]
  assert b["boxes"].shape == (8, 3, 4) and b["phrases"].shape == (8, 3, 8) and b["region_valid"].shape == (8, 3)
  valid = b["region_valid"]
  assert valid[:, 0].sum() >= 6 and (b["region_class"][~valid] == -1).all() and (b["phrases"][~valid] == 0).all()
  bx = b["boxes"][valid]
  assert (bx >= 0).all() and (bx <= 1).all() and (bx[:, 2] > bx[:, 0]).all() and (bx[:, 3] > bx[:, 1]).all()
  # the phrase is the caption's words for that object, and its class matches
  names = {c: n for c, n in enumerate(synthetic.SyntheticShapes("train", image_size=32).class_names())}
  for row in range(8):
    caption = tok.decode(b["text"][row])
    for k in np.nonzero(valid[row])[0]:
      assert tok.decode(b["phrases"][row, k]) in caption and names[int(b["region_class"][row, k])]
  # deterministic: a fresh iterator resumed from a saved state yields the same region fields
  it2 = pipeline.make_train_iterator(data, global_batch_size=8, seed=1, tokenizer=tok)
  next(it2)
  state = it2.get_state()
  it3 = pipeline.make_train_iterator(data, global_batch_size=8, seed=1, tokenizer=tok)
  it3.set_state(state)
  for want in batches[1:]:
    got = next(it3)
    for key in ("boxes", "phrases", "region_valid", "region_class", "image"):
      np.testing.assert_array_equal(got[key], want[key])
