"""Random-access labelled image sources — an image folder and a prepared tfds dataset — for evaluation sets and
as alternative training sources, decoded to one element format.

Both are grain random-access sources (`__len__`, `__getitem__`; `grain.MapDataset.source(src)`) whose element i is

    {'image': uint8 [H, W, 3] RGB, 'label': int32 [], 'caption': str}

or None when its image cannot be decoded: grain treats None as a filtered-out element and skips it when
iterating, so a bad file never crashes a run; it is counted in `source.skipped` ({reason: n}). Decoding is
`transforms.decode_image` (Pillow; grayscale, CMYK, palette and alpha images become RGB). With `image_size=S`
the image gets CLIP's eval transform `transforms.resize_center_crop` (shorter side → S, bicubic, central S×S
crop), so elements batch; without it the decoded size is kept. The caption is the class name with '_' → ' '
written into `caption_template` ('{}' by default: "hot_dog" → "hot dog").

- `ImageFolder(root)`: `root/class_name/…/image.{jpg,png,webp,…}`, label = index of the class folder in sorted
  order (torchvision `ImageFolder` convention; the listing is `image_folder.list_image_folder`, shared with the
  training source). Other files are ignored. A missing root or one without images is a `UserError`.
- `TfdsSource(name, split, data_dir=…)`: a tfds dataset prepared locally in a random-access file format
  (ArrayRecord or Parquet) read through tfds' data source (`builder.as_data_source`), with no TensorFlow import
  and never a download: a dataset that is not prepared is a `UserError` saying how to prepare it. The image
  feature is read as encoded bytes and decoded as above; class names come from the label's `ClassLabel`.
- `open_source('tfds:NAME[:SPLIT]' | 'folder:ROOT' | ROOT, …)` picks one from a string; `load_arrays` decodes a
  source into stacked arrays for the evaluators (skipping and counting bad images).
"""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from vlm_jax.data import transforms
from vlm_jax.data.image_folder import list_image_folder
from vlm_jax.errors import UserError


class _Decoder:
  """Shared decoding, eval transform, captions and thread-safe skip counting of the sources."""

  def __init__(self, class_names: Sequence[str] | None, image_size: int | None, caption_template: str):
    if image_size is not None and int(image_size) < 1:
      raise UserError(f"image_size must be a positive integer or None, got {image_size!r}")
    self.class_names = list(class_names) if class_names is not None else None
    self.image_size = None if image_size is None else int(image_size)
    self.caption_template = caption_template
    self.skipped: collections.Counter = collections.Counter()
    self._lock = threading.Lock()

  def _skip(self, reason: str) -> None:
    with self._lock:
      self.skipped[reason] += 1

  def caption(self, label: int) -> str:
    if self.class_names is not None and 0 <= label < len(self.class_names):
      name = self.class_names[label]
    else:
      name = str(label)
    return self.caption_template.format(name.replace("_", " "))

  def element(self, data: bytes, label: int) -> dict[str, Any] | None:
    """The element of encoded image bytes, or None (counted as 'undecodable') when Pillow cannot decode them."""
    try:
      img = transforms.decode_image(data, draft_size=self.image_size)
      image = (transforms.resize_center_crop(img, self.image_size) if self.image_size
               else np.asarray(img, np.uint8))
    except Exception:  # noqa: BLE001 (any decoder failure on user data is a skipped sample, never a crash)
      self._skip("undecodable")
      return None
    return {"image": np.ascontiguousarray(image, np.uint8), "label": np.int32(label), "caption": self.caption(label)}


class ImageFolder(_Decoder):
  """`root/class_name/…/image` as labelled elements (see the module docstring)."""

  def __init__(self, root: str, *, image_size: int | None = None, caption_template: str = "{}"):
    if not os.path.isdir(root):
      raise UserError(f"image folder {root} does not exist or is not a directory")
    classes, files = list_image_folder(root)
    if not files:
      raise UserError(f"image folder {root} has no images: expected {root}/<class_name>/<image>.jpg|png|webp|…")
    super().__init__(classes, image_size, caption_template)
    self.root, self.files = root, files
    self.labels = np.asarray([label for _, label in files], np.int32)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    rel, label = self.files[int(index)]
    try:
      with open(os.path.join(self.root, rel), "rb") as f:
        data = f.read()
    except OSError:
      self._skip("unreadable_file")
      return None
    return self.element(data, label)


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415
  except ImportError:
    raise UserError("tfds datasets need the tensorflow-datasets package (TensorFlow itself is not needed)") from None
  return tfds


class TfdsSource(_Decoder):
  """A locally prepared tfds dataset split as labelled elements (see the module docstring)."""

  def __init__(self, name: str, split: str = "test", *, data_dir: str | None = None, image_key: str = "image",
               label_key: str | None = "label", image_size: int | None = None, caption_template: str = "{}"):
    tfds = _import_tfds()
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(f"tfds dataset {name!r} not found: not a tfds dataset name and not prepared in "
                      f"{data_dir or 'the default tfds data_dir'}") from None
    where = os.path.dirname(os.path.dirname(str(builder.data_dir)))
    if not builder.is_prepared():
      raise UserError(f"tfds dataset {name!r} is not prepared in {where} (nothing is downloaded here): prepare it "
                      f"with `tfds build {name} --data_dir={where} --file_format=array_record`")
    info = builder.info
    fmt = str(getattr(info.file_format, "value", info.file_format))
    if fmt not in ("array_record", "parquet"):
      raise UserError(f"tfds dataset {name!r} in {where} is stored as {fmt}, which has no random access: prepare "
                      f"it again with --file_format=array_record")
    base_split = split.split("[")[0]
    if base_split not in info.splits:
      raise UserError(f"tfds dataset {name!r} has no split {base_split!r}; splits: {sorted(info.splits)}")
    features = info.features
    if image_key not in features:
      raise UserError(f"tfds dataset {name!r} has no feature {image_key!r}; features: {sorted(features)}")
    if label_key is not None and label_key not in features:
      raise UserError(f"tfds dataset {name!r} has no feature {label_key!r}; features: {sorted(features)}")
    names = getattr(features[label_key], "names", None) if label_key is not None else None
    super().__init__(names, image_size, caption_template)
    try:
      self.source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except ValueError as e:
      raise UserError(f"tfds dataset {name!r}: bad split {split!r} ({e})") from None
    self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    record = self.source[int(index)]
    label = int(record[self.label_key]) if self.label_key is not None else -1
    return self.element(bytes(record[self.image_key]), label)

  def raw(self, index: int) -> dict[str, Any]:
    """Element `index` undecoded, in the training stream's raw format (decoded and skipped by the pipeline)."""
    record = self.source[int(index)]
    label = int(record[self.label_key]) if self.label_key is not None else -1
    data = bytes(record[self.image_key])
    return {"image": data, "ext": "", "caption": self.caption(label), "label": label,
            "skip": "" if data else "empty_member", "src": f"tfds:{self.name}:{self.split}"}


class RawRows:
  """The rows `indices` of a `TfdsSource` as a grain random-access source of raw training elements."""

  def __init__(self, source: TfdsSource, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.source.raw(self.indices[int(i)])


def open_source(spec: str, *, split: str = "test", data_dir: str | None = None, image_size: int | None = None,
                caption_template: str = "{}") -> ImageFolder | TfdsSource:
  """'tfds:NAME' / 'tfds:NAME:SPLIT' (the split in the spec wins over `split`), 'folder:ROOT' or a folder path."""
  if spec.startswith("tfds:"):
    name, _, spec_split = spec[len("tfds:"):].partition(":")
    if not name:
      raise UserError(f"bad source {spec!r}: write tfds:NAME or tfds:NAME:SPLIT")
    return TfdsSource(name, spec_split or split, data_dir=data_dir, image_size=image_size,
                      caption_template=caption_template)
  root = spec[len("folder:"):] if spec.startswith("folder:") else spec
  return ImageFolder(root, image_size=image_size, caption_template=caption_template)


def load_arrays(source: ImageFolder | TfdsSource, *, limit: int | None = None,
                num_threads: int = 4) -> dict[str, Any]:
  """Decodes the first `limit` elements (all by default) of a source with a fixed `image_size`.

  Returns {'image': uint8 [N, S, S, 3], 'label': int32 [N], 'caption': [N] str, 'index': int64 [N] (source
  indices of the kept elements)}; undecodable elements are left out and counted in `source.skipped`.
  """
  if source.image_size is None:
    raise UserError("load_arrays needs a source with a fixed image_size (e.g. ImageFolder(root, image_size=224))")
  n = len(source) if limit is None else min(int(limit), len(source))
  with ThreadPoolExecutor(max(1, int(num_threads))) as pool:  # Pillow decodes with the GIL released
    elements = list(pool.map(source.__getitem__, range(n)))
  keep = [i for i, e in enumerate(elements) if e is not None]
  s = source.image_size
  return {"image": np.stack([elements[i]["image"] for i in keep]) if keep else np.zeros((0, s, s, 3), np.uint8),
          "label": np.asarray([elements[i]["label"] for i in keep], np.int32),
          "caption": [elements[i]["caption"] for i in keep], "index": np.asarray(keep, np.int64)}
