"""Tests of the procedural dataset, the words tokenizer, the grain pipeline and zero-shot classification."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import pipeline, synthetic
from vlm_jax.data.tokenizers import get_tokenizer
from vlm_jax.errors import UserError
from vlm_jax.evaluate import zeroshot

S = 32
DATA = {"name": "synthetic", "image_size": S, "synthetic": {"eval_per_class": 4}}


def _src(split="train", **kw):
  return synthetic.SyntheticShapes(split, image_size=S, **kw)


def _synonym_table(n_shapes=8, n_colours=8):
  shapes = {w: i for i, (_, syn) in enumerate(synthetic.SHAPES[:n_shapes]) for w in syn}
  colours = {w: i for i, (_, _, syn) in enumerate(synthetic.COLOURS[:n_colours]) for w in syn}
  return shapes, colours


def _caption_classes(caption: str, n_colours=8) -> list[int]:
  """Classes named in a caption: every '<colour word> <shape word>' bigram."""
  shapes, colours = _synonym_table()
  words = synthetic.tokenize_words(caption)
  return [shapes[b] * n_colours + colours[a] for a, b in zip(words, words[1:]) if a in colours and b in shapes]


def test_deterministic_random_access():
  a, b = _src(seed=3), _src(seed=3)
  for i in (0, 7, 12345):
    ea, eb = a[i], b[i]
    assert ea["caption"] == eb["caption"]
    for k in ("image", "classes", "boxes", "instance_mask", "semantic_mask", "label"):
      np.testing.assert_array_equal(ea[k], eb[k])
  assert not np.array_equal(_src(seed=4)[0]["image"], a[0]["image"])
  assert len(a) > 10**6 and a[0]["image"].shape == (S, S, 3) and a[0]["image"].dtype == np.uint8


def test_heldout_pairs_balanced():
  held = synthetic.heldout_pairs(8, 8, 16)
  assert len({tuple(p) for p in held}) == 16
  assert np.all(np.bincount(held[:, 0], minlength=8) == 2)
  assert np.all(np.bincount(held[:, 1], minlength=8) == 2)


def test_heldout_pairs_never_in_training_and_partners_remain():
  src = _src()
  unseen = set(src.unseen_classes.tolist())
  assert len(unseen) == 16 and len(src.seen_classes) == 48
  seen_in_train, counts = set(), np.zeros(3, int)
  for i in range(3000):
    sc = src.scene(i)
    assert not unseen & set(sc.classes), (i, sc)
    named = _caption_classes(sc.caption)
    assert not unseen & set(named), (i, sc.caption)
    assert sorted(named) == sorted(sc.classes) or len(named) < len(sc.classes), sc.caption
    assert sc.label == synthetic.content_label(sc.classes, 64)
    seen_in_train.update(sc.classes)
    counts[len(sc.classes) - 1] += 1
  assert seen_in_train == set(src.seen_classes.tolist())
  assert counts.min() > 0  # 1, 2 and 3 objects all occur
  for s in range(8):  # every shape with >= 2 colours, every colour with >= 2 shapes, in training
    assert len({c % 8 for c in seen_in_train if c // 8 == s}) >= 2
    assert len({c // 8 for c in seen_in_train if c % 8 == s}) >= 2


def test_eval_splits():
  seen, unseen = _src("eval_seen", eval_per_class=2), _src("eval_unseen", eval_per_class=2)
  assert len(seen) == 96 and len(unseen) == 32
  cs = [seen.scene(i).classes for i in range(len(seen))]
  cu = [unseen.scene(i).classes for i in range(len(unseen))]
  assert all(len(c) == 1 for c in cs + cu)
  assert sorted(c[0] for c in cs) == sorted(seen.seen_classes.tolist() * 2)
  assert sorted(c[0] for c in cu) == sorted(unseen.unseen_classes.tolist() * 2)
  # different seeds from the training split: no image is shared with the first training samples
  train = _src()
  train_imgs = {train[i]["image"].tobytes() for i in range(200)}
  assert not train_imgs & {seen[i]["image"].tobytes() for i in range(len(seen))}


def test_content_label():
  assert synthetic.content_label([5], 64) == 5
  assert synthetic.content_label([3, 9], 64) == synthetic.content_label([9, 3], 64) >= 64
  assert synthetic.content_label([3, 9, 9], 64) != synthetic.content_label([3, 9], 64)
  assert synthetic.content_label([1, 2, 3], 64) == synthetic.content_label([3, 1, 2], 64)


def test_masks_and_boxes_match_pixels():
  src = _src()
  for i in range(40):
    e = src[i]
    img, inst, sem = e["image"].astype(int), e["instance_mask"], e["semantic_mask"]
    k_objects = int(np.sum(e["classes"] >= 0))
    assert set(np.unique(inst)) <= set(range(k_objects + 1))
    sc = src.scene(i)
    for k in range(k_objects):
      m = inst == k + 1
      assert m.sum() > 10, (i, k)
      ys, xs = np.nonzero(m)
      np.testing.assert_array_equal(e["boxes"][k], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
      assert np.all(sem[m] == e["classes"][k] + 1)
      exact = np.all(np.abs(img - np.array(sc.rgbs[k])) <= 1, axis=-1)
      assert exact[m].mean() > 0.5  # most mask pixels are fully covered by the object's colour
      assert not exact[inst == 0].any()  # and never on the background
    assert np.all(sem[inst == 0] == 0)
    np.testing.assert_array_equal(e["boxes"][k_objects:], 0)


def test_words_tokenizer():
  tok = get_tokenizer("words", max_len=8)
  ids = tok(["A red circle!", "a photo of a small crimson disk on the left", "zebra"])
  assert ids.dtype == np.int32 and ids.shape == (3, 8)
  assert tok.eot_id == tok.vocab_size - 1 and tok.pad_id == 0
  assert np.all(ids[:, 0] == tok.sot_id)
  eot_pos = ids.argmax(axis=1)
  np.testing.assert_array_equal(ids[np.arange(3), eot_pos], tok.eot_id)
  assert eot_pos[0] == 4 and np.all(ids[0, 5:] == 0)
  assert eot_pos[1] == 7  # truncated: EOT kept in the last slot
  assert ids[2, 1] == tok.unk_id
  assert tok.decode(ids[0]) == "a red circle"
  assert set(synthetic.vocabulary()) <= set(tok.words)
  with pytest.raises(UserError):
    get_tokenizer("nope")


def test_synthetic_shards_stream_the_procedural_train_split(tmp_path):
  """The default dataset is rendered into tar shards once (any number of processes) and streamed back."""
  from vlm_jax.data import shards, synthetic_shards
  opts = {"num_train": 40, "shard_size": 16}
  pattern = synthetic_shards.ensure_shards(opts, S, str(tmp_path / "a"), processes=1, quiet=True)
  again = synthetic_shards.ensure_shards(opts, S, str(tmp_path / "b"), processes=2, quiet=True)
  [(paths, _)] = shards.expand_shards(pattern)
  [(paths_b, _)] = shards.expand_shards(again)
  assert len(paths) == 3
  for p, q in zip(paths, paths_b):
    assert open(p, "rb").read() == open(q, "rb").read()
  src = synthetic.SyntheticShapes("train", image_size=S)
  items = [it for p in paths for it, _ in shards.read_shard(p)]
  assert [it.caption for it in items] == [src.scene(i).caption for i in range(40)]
  assert [it.label for it in items] == [src.scene(i).label for i in range(40)]
  first = np.asarray(Image.open(io.BytesIO(items[0].image)))
  np.testing.assert_array_equal(first, src.render(src.scene(0), masks=False)["image"])
  assert synthetic_shards.ensure_shards(opts, S, str(tmp_path / "a"), quiet=True) == pattern  # reused


def _oracle_encoders(tok, n_colours=8):
  """Fake encoders that embed the TRUE class as a one-hot: images via a lookup, texts via their words."""
  lookup = {}
  for split in ("eval_seen", "eval_unseen"):
    arr = pipeline.make_eval_arrays(DATA, split)
    lookup.update({img.tobytes(): int(c) for img, c in zip(arr["image"], arr["class"])})
  shapes, colours = _synonym_table()

  def enc_image(x):
    return np.eye(64, dtype=np.float32)[[lookup[np.asarray(im).tobytes()] for im in x]]

  def enc_text(ids):
    out = []
    for row in np.asarray(ids):
      words = tok.decode(row).split()
      out.append([shapes[w] for w in words if w in shapes][0] * n_colours + [colours[w] for w in words
                                                                                 if w in colours][0])
    return np.eye(64, dtype=np.float32)[out]
  return enc_image, enc_text


def test_zeroshot_perfect_and_random_encoders():
  tok = get_tokenizer("words", max_len=16)
  enc_image, enc_text = _oracle_encoders(tok)
  r = zeroshot.evaluate_synthetic(enc_image, enc_text, tok, data_config=DATA, image_size=S, batch_size=100)
  assert r["zeroshot/seen_top1"] == r["zeroshot/unseen_top1"] == r["zeroshot/top1"] == 1.0
  assert r["zeroshot/top5"] == r["zeroshot/mean_per_class_recall"] == 1.0
  assert r["zeroshot/chance"] == 1 / 64

  rng = np.random.default_rng(0)
  table = rng.normal(size=(tok.vocab_size, 32))
  rand_image = lambda x: rng.normal(size=(len(x), 32))  # noqa: E731
  rand_text = lambda ids: table[np.asarray(ids)].sum(1)  # noqa: E731
  r = zeroshot.evaluate_synthetic(rand_image, rand_text, tok, data_config=DATA, image_size=S)
  print(f"random encoders: seen {r['zeroshot/seen_top1']:.3f} unseen {r['zeroshot/unseen_top1']:.3f} "
        f"top5 {r['zeroshot/top5']:.3f} (chance top-1 {r['zeroshot/chance']:.4f}, top-5 {5 / 64:.4f})")
  assert r["zeroshot/top1"] < 0.08 and r["zeroshot/top5"] < 0.25


def test_classification_metrics():
  logits = np.array([[3., 2., 1.], [1., 3., 2.], [3., 1., 2.], [1., 2., 3.]])
  m = zeroshot.classification_metrics(logits, np.array([0, 2, 1, 2]), ks=(1, 2))
  assert m["top1"] == 0.5 and m["top2"] == 0.75
  assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_validation_split_is_class_balanced_and_disjoint():
  """'val' (appended to SPLITS: the other splits keep their random streams) shows every class, one object per
  image, and shares no image with the training split, the eval splits or the probe-training images."""
  assert synthetic.SPLITS[:4] == ("train", "eval_seen", "eval_unseen", "eval_retrieval")
  val = _src("val", eval_per_class=2)
  assert len(val) == 128
  assert [val.scene(i).classes for i in range(len(val))] == [(i % 64,) for i in range(128)]
  val_imgs = {val[i]["image"].tobytes() for i in range(len(val))}
  assert len(val_imgs) == 128
  others = {_src()[i]["image"].tobytes() for i in range(400)}
  for split in ("eval_seen", "eval_unseen"):
    src = _src(split, num_samples=200)  # the eval images and the probe-training ones that follow them
    others |= {src[i]["image"].tobytes() for i in range(len(src))}
  assert not val_imgs & others


def test_uint8_images_agree_with_normalised_ones():
  from vlm_jax.data import synthetic_eval
  from vlm_jax.data.transforms import normalize
  data = {**DATA, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
  val = synthetic_eval.validation_set(data, image_size=S, per_class=1)
  assert val["image_uint8"].dtype == np.uint8 and val["image"].dtype == np.float32
  np.testing.assert_array_equal(val["label"], np.arange(64))
  np.testing.assert_array_equal(val["image"], normalize(val["image_uint8"], data["mean"], data["std"]))
  src = _src("val")
  np.testing.assert_array_equal(val["image_uint8"][5], src[5]["image"])
  for split in ("eval_seen", "eval_unseen"):  # the same images as the zero-shot evaluator's
    got, ref = synthetic_eval.labelled_set(data, split, image_size=S), pipeline.make_eval_arrays(data, split)
    np.testing.assert_array_equal(got["image"], ref["image"])
    np.testing.assert_array_equal(got["label"], ref["class"])
    np.testing.assert_array_equal(got["image"], normalize(got["image_uint8"], data["mean"], data["std"]))
  probe = synthetic_eval.probe_sets(data, image_size=S, train_per_class=1)
  for part in ("train", "test"):
    np.testing.assert_array_equal(probe[part]["image"],
                                  normalize(probe[part]["image_uint8"], data["mean"], data["std"]))
  ret = synthetic_eval.retrieval_set(data, image_size=S, num_images=8)
  np.testing.assert_array_equal(ret["image"], normalize(ret["image_uint8"], data["mean"], data["std"]))
  with pytest.raises(UserError, match="unknown labelled split"):
    synthetic_eval.labelled_set(data, "train", image_size=S)


def test_existing_splits_render_bit_identically():
  """Pixels, masks and captions of the original splits are pinned (cached shards and results depend on them);
  the hashes were taken before 'val' was appended and rendering moved to synthetic_paint."""
  import hashlib
  pinned = {"train": "0adc06f5666eaf4c", "eval_seen": "0084505a0c3b4071", "eval_unseen": "e6266ba3ffba1dd9",
            "eval_retrieval": "82a951aad9c79d90"}
  for split, want in pinned.items():
    h = hashlib.sha1()
    for i in range(4):
      e = _src(split)[i]
      h.update(e["image"].tobytes())
      h.update(e["instance_mask"].tobytes())
      h.update(e["caption"].encode())
    assert h.hexdigest()[:16] == want, split
