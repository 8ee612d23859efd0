"""Labelled random-access image sources: an image folder with every Pillow mode and broken files, and a tiny tfds
dataset written in ArrayRecord format in the test (no network, no TensorFlow)."""

from __future__ import annotations

import io
import os
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import sources, transforms
from vlm_jax.errors import UserError


def _encode(img: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def _rgb(h, w, seed):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture
def folder(tmp_path):
  """cat: RGB png, grayscale jpg, CMYK jpg; hot_dog: palette png with transparency, RGBA png, webp, nested
  upper-case .JPEG, a text file, a corrupt jpg and a truncated png; a hidden folder."""
  root = str(tmp_path / "imgs")
  _write(f"{root}/cat/a.png", _encode(_rgb(10, 12, 0), "PNG"))
  _write(f"{root}/cat/b.jpg", _encode(_rgb(20, 16, 1).convert("L"), "JPEG"))
  _write(f"{root}/cat/c.jpg", _encode(_rgb(16, 16, 2).convert("CMYK"), "JPEG"))
  pal = _rgb(8, 8, 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
  pal.info["transparency"] = 0
  _write(f"{root}/hot_dog/d.png", _encode(pal, "PNG"))
  _write(f"{root}/hot_dog/e.png", _encode(_rgb(9, 7, 4).convert("RGBA"), "PNG"))
  _write(f"{root}/hot_dog/f.webp", _encode(_rgb(12, 12, 5), "WEBP"))
  _write(f"{root}/hot_dog/sub/g.JPEG", _encode(_rgb(30, 40, 6), "JPEG"))
  _write(f"{root}/hot_dog/notes.txt", b"not an image")
  _write(f"{root}/hot_dog/broken.jpg", b"\xff\xd8\xff garbage")
  _write(f"{root}/hot_dog/trunc.png", _encode(_rgb(32, 32, 7), "PNG")[:200])
  _write(f"{root}/.cache/x.png", _encode(_rgb(4, 4, 8), "PNG"))
  return root


def test_image_folder_elements_modes_and_skips(folder):
  src = sources.ImageFolder(folder)
  assert src.class_names == ["cat", "hot_dog"]
  assert len(src) == 9  # image extensions only; hidden folders and the .txt file are not samples
  np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 1, 1, 1, 1, 1])
  elements = [src[i] for i in range(len(src))]
  good = [e for e in elements if e is not None]
  assert len(good) == 7 and dict(src.skipped) == {"undecodable": 2}
  for e in good:
    assert e["image"].dtype == np.uint8 and e["image"].ndim == 3 and e["image"].shape[2] == 3
    assert e["label"].dtype == np.int32
    assert e["caption"] == ("cat" if e["label"] == 0 else "hot dog")
  assert good[0]["image"].shape == (10, 12, 3)
  np.testing.assert_array_equal(good[0]["image"], np.asarray(_rgb(10, 12, 0)))  # PNG is lossless
  gray = good[1]["image"]
  assert gray.shape == (20, 16, 3) and np.array_equal(gray[..., 0], gray[..., 1])  # grayscale -> RGB
  # the sorted listing: a folder's own files, then its subfolders
  names = [os.path.basename(p) for p, _ in src.files]
  assert names == ["a.png", "b.jpg", "c.jpg", "broken.jpg", "d.png", "e.png", "f.webp", "trunc.png", "g.JPEG"]
  assert elements[3] is None and elements[7] is None


def test_image_folder_eval_transform_grain_and_arrays(folder):
  src = sources.ImageFolder(folder, image_size=8, caption_template="a photo of a {}.")
  e = src[8]  # hot_dog/sub/g.JPEG, 30x40
  assert e["image"].shape == (8, 8, 3) and e["caption"] == "a photo of a hot dog."
  want = transforms.resize_center_crop(transforms.decode_image(open(f"{folder}/hot_dog/sub/g.JPEG", "rb").read(),
                                                               draft_size=8), 8)
  np.testing.assert_array_equal(e["image"], want)
  streamed = list(grain.MapDataset.source(src).to_iter_dataset())  # None elements are filtered out
  assert len(streamed) == 7
  arrays = sources.load_arrays(sources.open_source("folder:" + folder, image_size=8), num_threads=2)
  assert arrays["image"].shape == (7, 8, 8, 3)
  np.testing.assert_array_equal(arrays["label"], [0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(arrays["index"], [0, 1, 2, 4, 5, 6, 8])
  assert arrays["caption"][0] == "cat"
  with pytest.raises(UserError, match="image_size"):
    sources.load_arrays(sources.ImageFolder(folder))


def test_image_folder_user_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    sources.ImageFolder(str(tmp_path / "missing"))
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
  with pytest.raises(UserError, match="has no images"):
    sources.open_source(str(tmp_path / "empty"))
  _write(str(tmp_path / "ok" / "cls" / "a.png"), _encode(_rgb(4, 4, 0), "PNG"))
  with pytest.raises(UserError, match="image_size"):
    sources.ImageFolder(str(tmp_path / "ok"), image_size=0)


# --- tfds ------------------------------------------------------------------------------------------------------

tfds = pytest.importorskip("tensorflow_datasets")


class VlmJaxTestPets(tfds.core.GeneratorBasedBuilder):
  """Six labelled images per split (one record of undecodable bytes), images given as encoded PNG bytes: the
  tfds writer then needs no TensorFlow (only encoding numpy arrays would)."""
  VERSION = tfds.core.Version("1.0.0")
  # no checksums file to look up: tfds 4.9.10 would import `importlib_resources` (absent on Python >= 3.9) to
  # locate one next to a builder defined inside a package such as `tests`
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["cat", "hot_dog", "golden_retriever"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0), "test": self._generate_examples(100)}

  def _generate_examples(self, offset):
    for i in range(6):
      data = b"not an image" if i == 4 else _encode(_rgb(6 + i, 9, offset + i), "PNG")
      yield i, {"image": data, "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  VlmJaxTestPets(data_dir=root, file_format="array_record").download_and_prepare()
  return root


def test_tfds_source_reads_array_record_without_tensorflow(tfds_dir):
  src = sources.TfdsSource("vlm_jax_test_pets", "test", data_dir=tfds_dir)
  assert len(src) == 6 and src.class_names == ["cat", "hot_dog", "golden_retriever"]
  elements = {int(e["label"]) * 10 + e["image"].shape[0]: e for e in (src[i] for i in range(6)) if e is not None}
  assert dict(src.skipped) == {"undecodable": 1} and len(elements) == 5
  want = {i % 3 * 10 + 6 + i: np.asarray(_rgb(6 + i, 9, 100 + i)) for i in range(6) if i != 4}
  assert sorted(elements) == sorted(want)
  for key, e in elements.items():
    np.testing.assert_array_equal(e["image"], want[key])
    assert e["label"].dtype == np.int32
    assert e["caption"] == ["cat", "hot dog", "golden retriever"][int(e["label"])]
  assert "tensorflow" not in sys.modules
  sized = sources.open_source("tfds:vlm_jax_test_pets:train", data_dir=tfds_dir, image_size=4)
  arrays = sources.load_arrays(sized)
  assert arrays["image"].shape == (5, 4, 4, 3) and dict(sized.skipped) == {"undecodable": 1}
  assert len(sources.TfdsSource("vlm_jax_test_pets", "train[:3]", data_dir=tfds_dir)) == 3
  assert len(list(grain.MapDataset.source(src).to_iter_dataset())) == 5


def test_tfds_user_errors(tfds_dir, tmp_path):
  empty = str(tmp_path / "nothing_here")
  with pytest.raises(UserError, match="not prepared"):
    sources.TfdsSource("mnist", "test", data_dir=empty)
  assert not os.path.exists(os.path.join(empty, "downloads"))  # no download was attempted
  with pytest.raises(UserError, match="not found"):
    sources.TfdsSource("no_such_dataset_xyz", "test", data_dir=empty)
  with pytest.raises(UserError, match="no split 'validation'"):
    sources.TfdsSource("vlm_jax_test_pets", "validation", data_dir=tfds_dir)
  with pytest.raises(UserError, match="no feature 'img'"):
    sources.TfdsSource("vlm_jax_test_pets", "test", data_dir=tfds_dir, image_key="img")
  with pytest.raises(UserError, match="tfds:NAME"):
    sources.open_source("tfds:")


def test_tfds_as_training_source_resumes_exactly(tfds_dir):
  from vlm_jax.data import pipeline
  from vlm_jax.data.tokenizers import get_tokenizer
  tok = get_tokenizer("bytes", context_length=40)
  data = {"tfds": "vlm_jax_test_pets:train", "tfds_dir": tfds_dir, "image_size": 8,
          "caption_template": "a photo of a {}"}
  n = len(sources.TfdsSource("vlm_jax_test_pets", "train", data_dir=tfds_dir))
  it = pipeline.make_train_iterator(data, global_batch_size=n, seed=0, tokenizer=tok)
  b = next(it)  # one epoch (5 decodable examples) and the first of the next
  assert b["image"].shape == (n, 8, 8, 3) and it.stats()["data/skipped/corrupt_image"] == 1
  names = ["cat", "hot dog", "golden retriever"]
  assert {tok.decode(t) for t in b["text"]} <= {f"a photo of a {c}" for c in names}
  state = it.get_state()
  more = [next(it) for _ in range(2)]
  it2 = pipeline.make_train_iterator(data, global_batch_size=n, seed=0, tokenizer=tok)
  it2.set_state(state)
  for x, y in zip(more, [next(it2) for _ in range(2)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
