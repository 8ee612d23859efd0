"""Transfer datasets by name: class names, prompt templates, k-shot train / validation sets and the test split.

  ds = open_dataset('shifted_hues' | 'synthetic:NAME' | 'folder:ROOT' | 'tfds:NAME' | 'scenes', image_size=S)
  ds.class_names, ds.templates
  train, val = few_shot(ds, shots=16, seed=1, val_shots=4, classes=…)   # Split(images uint8, labels int32)
  test = ds.load('test', classes=…)                                     # read once, after training
  it = train_iterator(train, batch_size=32, seed=1, mean=…, std=…)      # grain, checkpointable state

Sources:
- a synthetic shift task (`vlm_jax.data.synthetic_shift`: base, shifted_hues, new_colours, new_shapes,
  unseen_compositions, textured, outline), optionally written 'synthetic:NAME'. Its 'train', 'val' and 'test'
  splits are disjoint streams. The k-shot training and validation images are drawn per seed from the first
  `POOL_PER_CLASS` (32) training images of each class; the test split is `test_per_class` images per class.
- `folder:ROOT` with ROOT/train/<class>/… and ROOT/test/<class>/… (torchvision ImageFolder layout: the same
  class folders in both; class = folder name with '_' → ' ', unless a class-name file applies, see below).
- `tfds:NAME`: a tfds dataset prepared locally (ArrayRecord; `vlm_jax.data.sources.TfdsSource`), splits 'train'
  and 'test' (`TFDS_SPLITS`: imagenet2012's and food101's test split is their 'validation', eurosat's an 80/20 cut
  of its only split); class names from its ClassLabel feature, unless a class-name file applies.
- `scenes` (or 'synthetic:scenes'): multi-label, the multi-object synthetic scenes (`SceneDataset`); labels are
  multi-hot [N, C], k-shot sets come from `few_shot_multilabel` (per class k images that contain it, union;
  `sample_multilabel`), the metric is mAP. Base-to-novel is single-label only.
Images get the base model's eval transform (shorter side → S, centre crop), then its normalisation.

k-shot protocol (CoOp, Zhou et al. 2022): for seed s, k training images per class and `val_shots` (default
min(k, 4)) validation images per class are sampled without replacement, disjoint, from the training split only.
Hyper-parameters and the epoch to keep are chosen on that validation set; the test split is read only by the
final evaluation (`Dataset.load('test')`; a test instruments it).

Base-to-novel (CoCoOp, Zhou et al. 2022): the base classes of a dataset are the first ⌈C/2⌉ classes in label
order, the novel classes the rest — a fixed list per dataset (`base_novel`), documented in README.

Class-name files (`resolve_classes`; docs/transfer_datasets.md has the layout of each dataset): a `folder:` or
`tfds:` dataset takes its class names from `classnames=` (config key `classnames`: a shipped file of CoOp's
11-dataset suite — imagenet, caltech101, oxford_pets, stanford_cars, oxford_flowers, food101, fgvc_aircraft,
sun397, dtd, eurosat, ucf101, package data `vlm_jax/embedding/classnames/` — or a .txt path), else from
ROOT/classnames.txt, else, for the tfds names in `TFDS_NAMES`, from that dataset's shipped file (falling back to
the ClassLabel names when they do not fit it, e.g. tfds caltech101's 102 classes). The dataset's labels are
related to the file by `embedding.class_names.resolve`: folders / ClassLabel names that all equal file names
(ignoring case, spaces, '_' and '-') are renumbered into the file's order (a folder holding some of the
classes gets those, in file order); otherwise sorted folder i (ClassLabel i) is line i and the counts must agree. A
suite file's templates default to `coop:<name>` (CoOp's hand-crafted prompt; `clip:<name>` is CLIP's ensemble).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np

from vlm_jax.embedding import class_names as class_files
from vlm_jax.embedding import prompts
from vlm_jax.errors import UserError

POOL_PER_CLASS = 32
SUITE = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
         "sun397", "dtd", "eurosat", "ucf101")
# tfds image datasets of the suite -> their shipped class-name file (tfds's ucf101 is video; fgvc_aircraft is absent)
TFDS_NAMES = {"imagenet2012": "imagenet", "caltech101": "caltech101", "oxford_iiit_pet": "oxford_pets",
              "cars196": "stanford_cars", "oxford_flowers102": "oxford_flowers", "food101": "food101",
              "sun397": "sun397", "dtd": "dtd", "eurosat": "eurosat"}
# the tfds split read as 'train' / 'test' where it is not the one of that name: imagenet2012's 'test' is unlabelled
# and food101 has none (their 'validation' is the test set); eurosat has only 'train' (a fixed 80/20 cut of it)
TFDS_SPLITS = {"imagenet2012": {"test": "validation"}, "food101": {"test": "validation"},
               "eurosat": {"train": "train[:80%]", "test": "train[80%:]"}}


def tfds_split(name: str, split: str) -> str:
  """The tfds split of dataset `name` ('eurosat/rgb:2.0.0' too) read as `split` ('train' | 'test')."""
  return TFDS_SPLITS.get(tfds_base(name), {}).get(split, split)


def tfds_base(name: str) -> str:
  """'eurosat/rgb:2.0.0' -> 'eurosat'."""
  return name.split("/")[0].split(":")[0]


class Split(NamedTuple):
  images: np.ndarray   # uint8 [N, S, S, 3]
  labels: np.ndarray   # int32 [N]; float32 multi-hot [N, C] for a multi-label dataset (`SceneDataset`)


def resolve_classes(source_names: Sequence[str], classnames: str = "", *, source: str,
                    auto: str = "") -> tuple[list[str], np.ndarray | None, str]:
  """(class names, label map or None, default template set) of a folder / tfds dataset whose own labels are
  `source_names` (sorted folder names, ClassLabel names), given the class-name file `classnames` (a shipped
  name or a .txt path) or, failing that, the shipped file `auto` (used only when it fits). The label map turns a
  source label into a class index (module docstring); the templates are `coop:<name>` for a suite file."""
  spec = classnames or auto
  if spec:
    try:
      names, label_map = class_files.resolve(source_names, class_files.load_class_names(spec), source=source,
                                             file=f"class-name file {spec!r}")
    except UserError:
      if classnames:
        raise
    else:
      return names, label_map, f"coop:{spec}" if spec in SUITE else "generic"
  return [n.replace("_", " ") for n in source_names], None, f"coop:{auto}" if auto in SUITE else "generic"


class Dataset:
  """A named classification dataset: class names, templates and `load(split)` (see the module docstring)."""
  multilabel = False

  def __init__(self, spec: str, *, image_size: int, templates: str | Sequence[str] = "",
               test_per_class: int = 16, classnames: str = ""):
    self.spec, self.image_size, self.test_per_class = spec, int(image_size), int(test_per_class)
    self.label_map = None   # source label -> class index (folder / tfds with a class-name file), or None
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
      train_folders = sorted(d for d in os.listdir(os.path.join(arg, "train"))
                             if not d.startswith(".") and os.path.isdir(os.path.join(arg, "train", d)))
      if train_folders != folders:
        raise UserError(f"dataset folder {arg}: train/ and test/ must hold the same class folders "
                        f"(only in train: {sorted(set(train_folders) - set(folders))[:5]}, only in test: "
                        f"{sorted(set(folders) - set(train_folders))[:5]})")
      listed = os.path.join(arg, "classnames.txt")
      self.class_names, self.label_map, default_templates = resolve_classes(
          folders, classnames or (listed if os.path.exists(listed) else ""), source=f"dataset folder {arg}")
    else:
      from vlm_jax.data.sources import TfdsSource  # noqa: PLC0415
      src = TfdsSource(arg, tfds_split(arg, "test"), image_size=self.image_size)
      self.class_names, self.label_map, default_templates = resolve_classes(
          list(src.class_names), classnames, source=f"tfds dataset {arg}", auto=TFDS_NAMES.get(tfds_base(arg), ""))
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
           sources.TfdsSource(self.arg, tfds_split(self.arg, split), image_size=self.image_size))
    arrays = sources.load_arrays(src)
    if len(arrays["label"]) and int(arrays["label"].min()) < 0:
      raise UserError(f"dataset {self.spec}: split {split!r} holds unlabelled images (label −1)")
    labels = arrays["label"] if self.label_map is None else self.label_map[arrays["label"]]
    return Split(arrays["image"], labels)


def open_dataset(spec: str, *, image_size: int, templates: str | Sequence[str] = "",
                 test_per_class: int = 16, classnames: str = "") -> Dataset:
  """The dataset `spec` (module docstring); `classnames`: a class-name file for a folder / tfds dataset."""
  if is_multilabel(spec):
    return SceneDataset(image_size=image_size, templates=templates, test_per_class=test_per_class)
  return Dataset(spec, image_size=image_size, templates=templates, test_per_class=test_per_class,
                 classnames=classnames)


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


def unlabelled_pool(ds: Dataset) -> np.ndarray:
  """The training pool the k-shot sets are drawn from (`POOL_PER_CLASS` per class of a synthetic task; all of a
  folder / tfds 'train' split), images only: what an unsupervised method (UPL) learns from. Its labels are
  never read."""
  return ds.load("train").images


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
  key = "labels" if split.labels.ndim == 2 else "label"  # multi-label: 'labels', float32 multi-hot [B, C]
  labels = split.labels.astype(np.float32 if key == "labels" else np.int32)
  ds = grain.MapDataset.range(len(labels)).shuffle(seed=int(seed)).repeat()

  def row(i):
    return {"image": images[i], key: labels[i]}

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


# --- multi-label: the multi-object synthetic scenes ------------------------------------------------------------
MULTILABEL = ("scenes", "synthetic:scenes")
SCENE_POOL = 4096  # the k-shot training and validation scenes are drawn from the first SCENE_POOL training scenes


def is_multilabel(spec: str) -> bool:
  """Whether dataset `spec` is multi-label (labels multi-hot [N, C], scored with mAP)."""
  return str(spec) in MULTILABEL


class SceneDataset:
  """'scenes' (or 'synthetic:scenes'): multi-label recognition on the multi-object synthetic scenes of
  `vlm_jax.data.synthetic_scenes` (2–4 objects on a textured background, every object annotated: its 'eval'
  view). The classes are the 48 (shape, colour) pairs that occur in scenes (base and novel of its open-vocabulary
  split, in class-id order; the 16 pre-training held-out pairs never occur); an image's positive labels are the
  classes of the objects it shows. Splits: the first `SCENE_POOL` scenes of its 'train' stream are the pool the
  k-shot sets are drawn from (`few_shot_multilabel`); 'test' is the first n scenes of its 'test' stream, n the
  smallest count in which every class is present at least `test_per_class` times. Labels come from the scene
  layouts (no rendering); images are rendered at `image_size` only for the scenes read. Templates: the
  synthetic set (`vlm_jax/embedding/templates/synthetic.txt`)."""
  multilabel = True
  kind, name = "synthetic", "scenes"

  def __init__(self, *, image_size: int, templates: str | Sequence[str] = "", test_per_class: int = 16):
    from vlm_jax.data import synthetic_scenes  # noqa: PLC0415
    self.image_size, self.test_per_class = int(image_size), int(test_per_class)
    groups = synthetic_scenes.class_split()
    self.class_ids = np.sort(np.concatenate([groups["base"], groups["novel"]])).astype(np.int32)
    names = synthetic_scenes.class_names()
    self.class_names = [names[c] for c in self.class_ids]
    self.templates = prompts.load_templates(templates or "synthetic")
    self._labels: dict[tuple[str, int], np.ndarray] = {}

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def _source(self, split: str):
    from vlm_jax.data import synthetic_scenes  # noqa: PLC0415
    return synthetic_scenes.OpenVocabScenes(split, image_size=self.image_size, view="eval", num_samples=1 << 20)

  def labels(self, split: str, n: int) -> np.ndarray:
    """Multi-hot float32 [n, C] of the first `n` scenes of `split` (from their layouts)."""
    if (split, n) not in self._labels:
      col = np.full(int(self.class_ids.max()) + 1, -1, np.int64)
      col[self.class_ids] = np.arange(self.num_classes)
      src, out = self._source(split), np.zeros((n, self.num_classes), np.float32)
      for i in range(n):
        out[i, col[list(src.layout(i).classes)]] = 1.0
      self._labels[(split, n)] = out
    return self._labels[(split, n)]

  def test_size(self) -> int:
    """The number of test scenes: the smallest n in which every class is present `test_per_class` times."""
    n = 64
    while True:
      counts = np.cumsum(self.labels("test", n), axis=0)
      enough = np.flatnonzero((counts >= self.test_per_class).all(axis=1))
      if len(enough):
        return int(enough[0]) + 1
      n *= 2

  def load(self, split: str, *, indices: Sequence[int] | None = None) -> Split:
    """The test split ('test'), or the training scenes `indices` of the pool ('train'; default: all of it)."""
    if split not in ("train", "test"):
      raise UserError(f"unknown split {split!r} of dataset scenes; use 'train' or 'test'")
    n = self.test_size() if split == "test" else SCENE_POOL
    idx = np.arange(n) if indices is None or split == "test" else np.asarray(indices, np.int64)
    labels = self.labels(split, n)[idx]
    src = self._source(split)
    images = np.stack([src.element(int(i))["image"] for i in idx]) if len(idx) else \
        np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
    return Split(images, labels)


def sample_multilabel(labels: np.ndarray, *, shots: int, val_shots: int, seed: int,
                      class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) row indices of a multi-hot pool [P, C], sorted: the multi-label k-shot rule.

  For seed s, each class c in label order draws `shots` rows that contain it, uniformly without replacement;
  the training set is the union of these draws (so every class has at least k positives, usually more, as
  images show several classes). The validation set is drawn the same way, `val_shots` per class, from the rows
  not in the training set (disjoint). A class with too few rows left is a `UserError`."""
  labels = np.asarray(labels) > 0
  rng = np.random.default_rng((int(seed), 0x5108))
  taken = np.zeros(len(labels), bool)
  out = []
  for k, what in ((int(shots), "training"), (int(val_shots), "validation")):
    pick = np.zeros(len(labels), bool)
    for c in range(labels.shape[1]):
      rows = np.flatnonzero(labels[:, c] & ~taken)
      if len(rows) < k:
        name = class_names[c] if class_names is not None else c
        raise UserError(f"class {name!r} is present in {len(rows)} unused pool images; {k} {what} images "
                        f"per class need {k} (fewer shots, or a larger pool)")
      pick[rng.choice(rows, k, replace=False)] = True
    taken |= pick
    out.append(np.flatnonzero(pick))
  return out[0], out[1]


def few_shot_multilabel(ds: SceneDataset, *, shots: int, seed: int, val_shots: int | None = None
                        ) -> tuple[Split, Split]:
  """(k-shot train, k-shot validation) of a multi-label dataset for `seed` (`sample_multilabel` over the pool of
  its training split; val_shots default min(k, 4), as `few_shot`)."""
  shots = int(shots)
  val_shots = min(shots, 4) if val_shots is None or int(val_shots) < 0 else int(val_shots)
  tr, va = sample_multilabel(ds.labels("train", SCENE_POOL), shots=shots, val_shots=val_shots, seed=seed,
                             class_names=ds.class_names)
  return ds.load("train", indices=tr), ds.load("train", indices=va)
