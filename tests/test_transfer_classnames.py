"""The class-name and prompt-template files of CoOp's 11-dataset suite: counts, label order against independent
sources, the public loaders, the folder / tfds class resolution and the package build config that ships them."""

from __future__ import annotations

import ast
import collections
import importlib.util
import os
import re

import numpy as np
import pytest
from PIL import Image

from tests.train_helpers import ROOT
from vlm_jax.embedding import class_names, classifier, prompts
from vlm_jax.errors import UserError
from vlm_jax.transfer import datasets
from vlm_jax.transfer.methods import prompting

COUNTS = {"imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102,
          "food101": 101, "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101}
# CLIP's curated ImageNet names (used verbatim by CoOp) repeat two names; no other file repeats any
KNOWN_REPEATS = {"imagenet": {"missile", "sunglasses"}}
COOP = {"oxford_pets": "a photo of a {}, a type of pet.", "dtd": "{} texture.",
        "eurosat": "a centered satellite photo of {}.", "food101": "a photo of {}, a type of food.",
        "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}."}
_TFDS = importlib.util.find_spec("tensorflow_datasets")   # located, not imported
TFDS_DIR = os.path.dirname(_TFDS.origin) if _TFDS and _TFDS.origin else ""


def test_counts_and_repeats():
  assert class_names.available() == sorted(COUNTS) == sorted(datasets.SUITE)
  for name, count in COUNTS.items():
    names = class_names.load_class_names(name)
    repeated = {n for n, k in collections.Counter(names).items() if k > 1}
    assert (len(names), repeated) == (count, KNOWN_REPEATS.get(name, set())), name
    assert all(n == n.strip() and n and "{" not in n and "}" not in n for n in names), name
    keys = collections.Counter(class_names.name_key(n) for n in names)   # what folder names are matched by
    assert {k for k, c in keys.items() if c > 1} == KNOWN_REPEATS.get(name, set()), name


def test_spot_checks_of_label_order():
  first_last = {"imagenet": ("tench", "toilet paper"), "caltech101": ("face", "yin yang"),
                "oxford_pets": ("abyssinian", "yorkshire terrier"),
                "stanford_cars": ("2000 AM General Hummer SUV", "2012 smart fortwo Convertible"),
                "oxford_flowers": ("pink primrose", "blackberry lily"), "food101": ("apple pie", "waffles"),
                "fgvc_aircraft": ("707-320", "Yak-42"), "sun397": ("abbey", "youth hostel"),
                "dtd": ("banded", "zigzagged"), "eurosat": ("Annual Crop Land", "Sea or Lake"),
                "ucf101": ("Apply Eye Makeup", "Yo Yo")}
  for name, (first, last) in first_last.items():
    names = class_names.load_class_names(name)
    assert (names[0], names[-1]) == (first, last), name
  food = class_names.load_class_names("food101")
  assert food.index("cheese plate") + 1 == food.index("cheesecake")   # CoOp: folders sorted by code point
  caltech = class_names.load_class_names("caltech101")
  assert caltech[:5] == ("face", "leopard", "motorbike", "accordion", "airplane")
  assert not {"background", "background google", "faces easy"} & set(caltech)
  assert class_names.load_class_names("sun397")[2:5] == ("airport terminal", "alley", "amphitheater")
  assert "outdoor apartment building" in class_names.load_class_names("sun397")


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return [ln.strip() for ln in f if ln.strip()]


@pytest.mark.skipif(not os.path.isdir(TFDS_DIR), reason="tensorflow_datasets not installed")
def test_names_agree_with_the_label_files_of_tfds():
  """An independent source of label order: the label files tensorflow_datasets ships."""
  ic = os.path.join(TFDS_DIR, "image_classification")
  assert class_names.load_class_names("food101") == tuple(
      c.replace("_", " ") for c in sorted(_lines(os.path.join(ic, "food-101_classes.txt"))))
  assert class_names.load_class_names("dtd") == tuple(_lines(os.path.join(ic, "dtd_key_attributes.txt")))
  assert class_names.load_class_names("sun397") == tuple(
      " ".join(c.split("/")[2:][::-1]).replace("_", " ") for c in _lines(os.path.join(ic, "sun397_labels.txt")))
  assert class_names.load_class_names("ucf101") == tuple(
      " ".join(re.findall("[A-Z][^A-Z]*", c)) for c in _lines(os.path.join(TFDS_DIR, "video", "ucf101_labels.txt")))
  caltech = [c for c in _lines(os.path.join(ic, "caltech101_labels.txt")) if c not in ("background_google",
                                                                                         "faces_easy")]
  assert sorted(k.replace(" ", "_") for k in class_names.load_class_names("caltech101")) == sorted(
      {"faces": "face", "airplanes": "airplane", "leopards": "leopard", "motorbikes": "motorbike"}.get(c, c)
      for c in caltech)


def test_imagenet_names_are_clips():
  """open_clip's copy of CLIP's ImageNet names, read without importing open_clip (which imports torch)."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("open_clip not installed")
  path = os.path.join(list(spec.submodule_search_locations)[0], "zero_shot_metadata.py")
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  [value] = [n.value for n in tree.body if isinstance(n, ast.Assign)
             and getattr(n.targets[0], "id", "") == "IMAGENET_CLASSNAMES"]
  assert class_names.load_class_names("imagenet") == tuple(ast.literal_eval(value))


def test_templates_by_name():
  for name in COUNTS:
    coop = prompts.load_templates(f"coop:{name}")
    clip = prompts.load_templates(f"clip:{name}")
    assert len(coop) == 1 and coop == prompts.load_templates(f"coop_{name}"), name
    assert len(clip) >= 1 and clip == prompts.load_templates(f"clip_{name}"), name
    assert all(t.count("{}") == 1 for t in coop + clip), name
  for name, template in COOP.items():
    assert prompts.load_templates(f"coop:{name}") == (template,)
  assert len(prompts.load_templates("clip:imagenet")) == 80 and len(prompts.load_templates("clip:ucf101")) == 48
  assert prompts.load_templates("clip:eurosat")[1] == "a centered satellite photo of a {}."
  # the raw files too: every non-comment line holds exactly one {}
  tdir = os.path.join(ROOT, "vlm_jax", "embedding", "templates")
  for fn in os.listdir(tdir):
    if fn.startswith(("coop_", "clip_")):
      lines = [ln for ln in _lines(os.path.join(tdir, fn)) if not ln.startswith("#")]
      assert lines and all(ln.count("{}") == 1 for ln in lines), fn
  with pytest.raises(UserError, match="unknown template set"):
    prompts.load_templates("coop:nosuch")
  with pytest.raises(UserError, match="unknown class-name file"):
    class_names.load_class_names("nosuch")


def test_resolve_rules():
  names = ("Annual Crop Land", "Forest", "Highway or Road", "Pasture Land")
  # all source names are file names: renumbered into the file's order, a subset keeps file order
  assert class_names.resolve(["annual_crop_land", "forest", "highway_or_road", "pasture-land"], names) == (
      list(names), None)
  got, order = class_names.resolve(["Highway_or_Road", "forest", "pasture_land"], names)
  assert got == ["Forest", "Highway or Road", "Pasture Land"] and order.tolist() == [1, 0, 2]
  # UCF101's own CamelCase folders, sorted by code point (HammerThrow < Hammering), land in classInd order
  ucf = class_names.load_class_names("ucf101")
  folders = ["HammerThrow", "Hammering", "HandstandPushups", "JumpRope", "JumpingJack"]
  got, order = class_names.resolve(folders, ucf)
  assert got == ["Hammering", "Hammer Throw", "Handstand Pushups", "Jumping Jack", "Jump Rope"]
  assert order.tolist() == [1, 0, 2, 4, 3] and ucf.index("Hammering") + 1 == ucf.index("Hammer Throw")
  # otherwise positional, counts must agree, and a name found on another line is an error
  assert class_names.resolve(["AnnualCrop", "Forest", "Highway", "Pasture"], names) == (list(names), None)
  with pytest.raises(UserError, match="has 3 classes but"):
    class_names.resolve(["a", "b", "c"], names)
  with pytest.raises(UserError, match="'Forest' is label 0 there but line 2"):
    class_names.resolve(["Forest", "AnnualCrop", "Highway", "Pasture"], names)


def _image_folder(root, folders, colours, per_class=2):
  for split in ("train", "test"):
    for folder, colour in zip(folders, colours):
      os.makedirs(os.path.join(root, split, folder))
      for i in range(per_class):
        Image.new("RGB", (8, 8), colour).save(os.path.join(root, split, folder, f"{i}.png"))


def _zero_shot_prompts(ds):
  """The prompts the transfer run's hand-crafted text side tokenises (zero-shot head, KgCoOp / ProGrad targets),
  checked to be what the generic zero-shot class-embedding builder tokenises up to its article fix."""
  seen, handcrafted = [], []

  def tokenizer(texts):
    seen.extend(texts)
    return np.arange(len(texts))[:, None]

  emb = classifier.class_embeddings(lambda ids: np.eye(len(seen), dtype=np.float32)[ids[:, 0]], tokenizer,
                                    ds.class_names, ds.templates)
  assert emb.shape[0] == ds.num_classes
  hc = prompting.make_handcrafted(lambda texts: handcrafted.extend(texts) or np.zeros((len(texts), 1)),
                                  ds.class_names, ds.templates)
  assert hc.n_classes == ds.num_classes and len(handcrafted) == len(seen)
  assert [classifier._article_fix(t) for t in seen] == handcrafted
  return handcrafted


def test_folder_dataset_through_a_shipped_class_file(tmp_path):
  root = str(tmp_path / "eurosat")
  # three EuroSAT classes named by the file's names in another spelling; sorted: Highway_or_Road, forest, pasture
  colours = {"Highway_or_Road": (255, 0, 0), "forest": (0, 255, 0), "pasture_land": (0, 0, 255)}
  _image_folder(root, list(colours), list(colours.values()))
  ds = datasets.open_dataset(f"folder:{root}", image_size=8, classnames="eurosat")
  assert ds.class_names == ["Forest", "Highway or Road", "Pasture Land"]   # the class file's order
  assert ds.templates == ("a centered satellite photo of {}.",)
  test = ds.load("test")
  for image, label in zip(test.images, test.labels):
    folder = {"Forest": "forest", "Highway or Road": "Highway_or_Road", "Pasture Land": "pasture_land"}
    assert tuple(image[4, 4]) == colours[folder[ds.class_names[label]]]
  assert _zero_shot_prompts(ds) == ["a centered satellite photo of Forest.",
                                    "a centered satellite photo of Highway or Road.",
                                    "a centered satellite photo of Pasture Land."]
  clip = datasets.open_dataset(f"folder:{root}", image_size=8, classnames="eurosat", templates="clip:eurosat")
  assert _zero_shot_prompts(clip)[:3] == ["a centered satellite photo of Forest.",
                                          "a centered satellite photo of a Forest.",
                                          "a centered satellite photo of the Forest."]


def test_folder_dataset_positional_and_errors(tmp_path):
  root = str(tmp_path / "pets")
  folders = [f"{i:02d}" for i in range(1, 38)]   # numbered by class id: sorted folder i is line i
  _image_folder(root, folders, [(i, i, i) for i in range(37)], per_class=1)
  ds = datasets.open_dataset(f"folder:{root}", image_size=8, classnames="oxford_pets")
  assert ds.class_names == list(class_names.load_class_names("oxford_pets")) and ds.label_map is None
  # the transfer run writes "a" as "an" before a vowel (prompting.make_handcrafted); CoOp's code does not
  assert _zero_shot_prompts(ds)[:3] == ["a photo of an abyssinian, a type of pet.",
                                        "a photo of an american bulldog, a type of pet.",
                                        "a photo of an american pit bull terrier, a type of pet."]
  assert datasets.open_dataset(f"folder:{root}", image_size=8).class_names == folders   # no file: folder names
  with pytest.raises(UserError, match="has 37 classes but class-name file 'dtd' lists 47"):
    datasets.open_dataset(f"folder:{root}", image_size=8, classnames="dtd")
  os.makedirs(os.path.join(root, "train", "38"))
  with pytest.raises(UserError, match="same class folders"):
    datasets.open_dataset(f"folder:{root}", image_size=8, classnames="oxford_pets")


class _FakeTfds:
  """Stands in for `sources.TfdsSource`: tfds food101's ClassLabel order (cheesecake before cheese_plate)."""
  names = sorted(n.replace(" ", "_") for n in class_names.load_class_names("food101"))
  names[16], names[17] = names[17], names[16]
  class_names = names

  opened: list = []

  def __init__(self, name, split, image_size=None):
    self.name = name
    self.opened.append((name, split))


def test_tfds_names_map_to_the_shipped_files(monkeypatch):
  from vlm_jax.data import sources
  assert set(datasets.TFDS_NAMES.values()) <= set(class_names.available())
  monkeypatch.setattr(sources, "TfdsSource", _FakeTfds)
  ds = datasets.open_dataset("tfds:food101", image_size=8)
  assert ds.class_names == list(class_names.load_class_names("food101"))
  assert ds.templates == ("a photo of {}, a type of food.",)
  # tfds label 16 (cheesecake) is class 17 of CoOp's order, and the other way round; the rest stay
  assert ds.label_map[[15, 16, 17, 18]].tolist() == [15, 17, 16, 18]
  assert ds.class_names[ds.label_map[16]] == "cheesecake"
  # a file that does not fit: an error when asked for, the ClassLabel names when only implied by the tfds name
  with pytest.raises(UserError, match="has 101 classes but class-name file 'dtd' lists 47"):
    datasets.open_dataset("tfds:food101", image_size=8, classnames="dtd")
  monkeypatch.setattr(_FakeTfds, "class_names", ["accordion", "background_google", "faces", "faces_easy"])
  odd = datasets.open_dataset("tfds:caltech101", image_size=8)
  assert odd.class_names == ["accordion", "background google", "faces", "faces easy"]
  assert odd.templates == ("a photo of a {}.",) and odd.label_map is None
  # the tfds split read as 'test': imagenet2012's labelled 'validation'; a config / version suffix is ignored
  monkeypatch.setattr(_FakeTfds, "class_names", [f"n{i:08d}" for i in range(1000)])
  assert datasets.open_dataset("tfds:imagenet2012:5.1.0", image_size=8).class_names[:2] == ["tench", "goldfish"]
  assert _FakeTfds.opened[-1] == ("imagenet2012:5.1.0", "validation")
  assert [datasets.tfds_split("eurosat/rgb", s) for s in ("train", "test")] == ["train[:80%]", "train[80%:]"]
  assert datasets.tfds_split("dtd", "test") == "test"


def test_build_config_ships_the_data_files(monkeypatch):
  """setup.py's package_data covers every class-name and template file (what `pip install .` copies)."""
  import setuptools  # noqa: F401  (provides distutils on Python ≥ 3.12)
  from distutils.core import run_setup
  monkeypatch.chdir(ROOT)
  dist = run_setup(os.path.join(ROOT, "setup.py"), stop_after="init")
  build_py = dist.get_command_obj("build_py")
  build_py.ensure_finalized()
  shipped = {os.path.join(src, f) for _, src, _, files in build_py.data_files for f in files}
  for sub in ("classnames", "templates"):
    folder = os.path.join("vlm_jax", "embedding", sub)
    wanted = {os.path.join(folder, f) for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".txt")}
    assert wanted and wanted <= shipped, sorted(wanted - shipped)
  assert len([f for f in shipped if "classnames" in f]) == len(COUNTS)
