"""Transfer datasets by name: class names, prompt templates, k-shot train / validation sets and the test split.

  ds = open_dataset('shifted_hues' | 'synthetic:NAME' | 'folder:ROOT' | 'tfds:NAME', image_size=S)
  ds.class_names, ds.templates
  train, val = few_shot(ds, shots=16, seed=1, val_shots=4, classes=…)   # Split(images uint8, labels int32)
  test = ds.load('test', classes=…)                                     # read once, after training
  it = train_iterator(train, batch_size=32, seed=1, mean=…, std=…)      # grain, checkpointable state

Sources:
- a synthetic shift task (`vlm_jax.data.synthetic_shift`: base, shifted_hues, new_colours, new_shapes,
  unseen_compositions, textured, outline), optionally written 'synthetic:NAME'. Its 'train', 'val' and 'test'
  splits are disjoint streams. The k-shot training and validation images are drawn per seed from the first
  `POOL_PER_CLASS` (32) training images of each class; the test split is `test_per_class` images per class.
- `folder:ROOT` with ROOT/train/<class>/… and ROOT/test/<class>/… (torchvision ImageFolder layout, class =
  folder name with '_' → ' '; a `classnames.txt` in ROOT, one name per line in sorted-folder order, wins).
- `tfds:NAME`: a tfds dataset prepared locally (ArrayRecord; `vlm_jax.data.sources.TfdsSource`), splits 'train'
  and 'test'; class names from its ClassLabel feature, or the bundled class-name file of that dataset.
Images get the base model's eval transform (shorter side → S, centre crop), then its normalisation.

k-shot protocol (CoOp, Zhou et al. 2022): for seed s, k training images per class and `val_shots` (default
min(k, 4)) validation images per class are sampled without replacement, disjoint, from the training split only.
Hyper-parameters and the epoch to keep are chosen on that validation set; the test split is read only by the
final evaluation (`Dataset.load('test')`; a test instruments it).

Base-to-novel (CoCoOp, Zhou et al. 2022): the base classes of a dataset are the first ⌈C/2⌉ classes in label
order, the novel classes the rest — a fixed list per dataset (`base_novel`), documented in README.

Per-dataset files (package data, `vlm_jax/transfer/data/`): `<dataset>_classnames.txt` and
`<dataset>_templates.txt` are looked up for `folder:` and `tfds:` datasets and win over the folder / ClassLabel
names and the generic templates when present. The files for CoOp's 11 datasets (imagenet, caltech101,
oxford_pets, stanford_cars, oxford_flowers, food101, fgvc_aircraft, sun397, dtd, eurosat, ucf101) are not shipped
yet; until they are, class names come from the folders / tfds and templates are the generic set.
"""

from __future__ import annotations

import importlib.resources
import os
from typing import NamedTuple, Sequence

import numpy as np

from vlm_jax.embedding import prompts
from vlm_jax.errors import UserError

POOL_PER_CLASS = 32
SUITE = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
         "sun397", "dtd", "eurosat", "ucf101")
# tfds names of the suite -> the bundled file prefix
TFDS_NAMES = {"imagenet2012": "imagenet", "caltech101": "caltech101", "oxford_iiit_pet": "oxford_pets",
              "cars196": "stanford_cars", "oxford_flowers102": "oxford_flowers", "food101": "food101",
              "sun397": "sun397", "dtd": "dtd", "eurosat": "eurosat", "ucf101": "ucf101"}


class Split(NamedTuple):
  images: np.ndarray   # uint8 [N, S, S, 3]
  labels: np.ndarray   # int32 [N]


def bundled(name: str, kind: str) -> tuple[str, ...] | None:
  """Lines of the bundled `<name>_<kind>.txt` (kind: classnames | templates), or None."""
  path = importlib.resources.files("vlm_jax.transfer") / "data" / f"{name}_{kind}.txt"
  if not path.is_file():
    return None
  lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
  return tuple(ln for ln in lines if ln and not ln.startswith("#"))


class Dataset:
  """A named classification dataset: class names, templates and `load(split)` (see the module docstring)."""

  def __init__(self, spec: str, *, image_size: int, templates: str | Sequence[str] = "",
               test_per_class: int = 16):
    self.spec, self.image_size, self.test_per_class = spec, int(image_size), int(test_per_class)
    kind, _, arg = spec.partition(":") if ":" in spec else ("synthetic", "", spec)
    if kind not in ("synthetic", "folder", "tfds"):
      raise UserError(f"unknown dataset {spec!r}: use a synthetic task name, folder:ROOT or tfds:NAME")
    self.kind, self.arg = kind, arg
    if kind == "synthetic":
      from vlm_jax.data import synthetic_shift  # noqa: PLC0415
      self.class_names = synthetic_shift.class_names(arg)
      default_templates = synthetic_shift.templates(arg)
    elif kind == "folder":
      from vlm_jax.data.image_folder import list_image_folder  # noqa: PLC0415
      for split in ("train", "test"):
        if not os.path.isdir(os.path.join(arg, split)):
          raise UserError(f"dataset folder {arg} needs {split}/<class>/… subfolders")
      folders, _ = list_image_folder(os.path.join(arg, "test"))
      names = [f.replace("_", " ") for f in folders]
      listed = os.path.join(arg, "classnames.txt")
      if os.path.exists(listed):
        with open(listed, encoding="utf-8") as f:
          names = [ln.strip() for ln in f if ln.strip()]
      self.class_names = list(names)
      default_templates = bundled(os.path.basename(os.path.normpath(arg)).lower(), "templates") or "generic"
    else:
      from vlm_jax.data.sources import TfdsSource  # noqa: PLC0415
      src = TfdsSource(arg, "test", image_size=self.image_size)
      short = TFDS_NAMES.get(arg, arg)
      self.class_names = list(bundled(short, "classnames") or [c.replace("_", " ") for c in src.class_names])
      default_templates = bundled(short, "templates") or "generic"
    self.templates = prompts.load_templates(templates or default_templates)
    self.name = arg if kind != "folder" else os.path.basename(os.path.normpath(arg))

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def load(self, split: str, *, per_class: int | None = None) -> Split:
    """All images of `split` ('train' | 'test'), or the first `per_class` per class of a synthetic task."""
    if self.kind == "synthetic":
      from vlm_jax.data import synthetic_shift  # noqa: PLC0415
      n = (per_class or (POOL_PER_CLASS if split == "train" else self.test_per_class)) * self.num_classes
      t = synthetic_shift.get_task(self.arg, split, n, image_size=self.image_size)
      return Split(t.images, t.labels)
    from vlm_jax.data import sources  # noqa: PLC0415
    root = os.path.join(self.arg, split) if self.kind == "folder" else None
    src = (sources.ImageFolder(root, image_size=self.image_size) if root else
           sources.TfdsSource(self.arg, split, image_size=self.image_size))
    arrays = sources.load_arrays(src)
    return Split(arrays["image"], arrays["label"])


def open_dataset(spec: str, *, image_size: int, templates: str | Sequence[str] = "",
                 test_per_class: int = 16) -> Dataset:
  return Dataset(spec, image_size=image_size, templates=templates, test_per_class=test_per_class)


def base_novel(num_classes: int) -> tuple[list[int], list[int]]:
  """(base, novel) class indices: the first ⌈C/2⌉ classes in label order, and the rest."""
  half = (num_classes + 1) // 2
  return list(range(half)), list(range(half, num_classes))


def restrict(split: Split, classes: Sequence[int]) -> Split:
  """The images of `classes`, relabelled 0..len(classes)−1 in that order."""
  remap = np.full(max(int(split.labels.max(initial=0)), max(classes, default=0)) + 1, -1, np.int32)
  remap[np.asarray(classes, np.int64)] = np.arange(len(classes), dtype=np.int32)
  keep = remap[split.labels] >= 0
  return Split(split.images[keep], remap[split.labels[keep]])


def few_shot(ds: Dataset, *, shots: int, seed: int, val_shots: int | None = None,
             classes: Sequence[int] | None = None) -> tuple[Split, Split]:
  """(k-shot train, k-shot validation), disjoint, sampled for `seed` from the training split of `classes`
  (default all), relabelled in `classes` order. A class with fewer than shots + val_shots images is a
  `UserError`."""
  shots = int(shots)
  val_shots = min(shots, 4) if val_shots is None or int(val_shots) < 0 else int(val_shots)
  classes = list(range(ds.num_classes)) if classes is None else list(classes)
  pool = ds.load("train", per_class=max(POOL_PER_CLASS, shots + val_shots))
  rng = np.random.default_rng((int(seed), 0x5107))
  tr, va = [], []
  for c in classes:
    idx = np.flatnonzero(pool.labels == c)
    if len(idx) < shots + val_shots:
      raise UserError(f"class {ds.class_names[c]!r} has {len(idx)} training images; {shots} shots + "
                      f"{val_shots} validation images need {shots + val_shots}")
    pick = rng.choice(idx, shots + val_shots, replace=False)
    tr.append(pick[:shots])
    va.append(pick[shots:])
  tr, va = np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))
  return (restrict(Split(pool.images[tr], pool.labels[tr]), classes),
          restrict(Split(pool.images[va], pool.labels[va]), classes))


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  from vlm_jax.data import transforms  # noqa: PLC0415
  return transforms.normalize(images, mean, std)


def train_iterator(split: Split, *, batch_size: int, seed: int, mean, std, flip: bool = False,
                   process_index: int = 0, process_count: int = 1):
  """The training stream: a grain pipeline

    MapDataset.source(range(N)).shuffle(seed).repeat() → normalise (+ random flip) → batch(B)

  (each epoch a new permutation), this process's rows of every global batch. Its iterator has
  `get_state`/`set_state`, so the loop's checkpoints resume the exact stream."""
  import grain  # noqa: PLC0415
  images = normalize(split.images, mean, std).astype(np.float32)
  labels = split.labels.astype(np.int32)
  ds = grain.MapDataset.range(len(labels)).shuffle(seed=int(seed)).repeat()

  def row(i):
    return {"image": images[i], "label": labels[i]}

  def flipped(el, rng):
    if rng.random() < 0.5:
      el = {**el, "image": el["image"][:, ::-1].copy()}
    return el

  ds = ds.map(row)
  if flip:
    ds = ds.random_map(flipped, seed=int(seed))
  per = batch_size // process_count
  ds = ds.batch(batch_size).map(lambda b: {k: v[process_index * per:(process_index + 1) * per]
                                           for k, v in b.items()})
  return iter(ds.to_iter_dataset())
