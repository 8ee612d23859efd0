"""The training input pipeline (grain) and the evaluation arrays, both config-driven.

For now the one source is the procedural dataset of `vlm_jax.data.synthetic` (data_config.name='synthetic'),
rendered on the fly from (seed, index); the tar-shard streaming source arrives with its own issue.

    stream = grain.MapDataset.source(scenes)            # cheap metadata per index
               .shuffle(seed).repeat()                   # reshuffled every epoch
               .random_map(render + augment + tokenize + normalise)   # per-element rng: seed ⊕ index
    local  = this process's rows of every global batch (see `_ProcessSlice`)
               .batch(global_batch / process_count)
               .to_iter_dataset(grain.ReadOptions(num_threads, prefetch_buffer_size))

Only the elements a process needs are rendered. The iterator is grain's checkpointable iterator:
`it.get_state()` / `it.set_state(state)` resume the exact batch stream (every random choice is a function of
the seed and the element index), and N processes together see exactly the batches of one process.

A batch is a dict of numpy arrays (CONTRACTS.md): 'image' float32 [B,S,S,3] normalised as
(x/255 − mean)/std (CLIP's mean/std by default), 'text' int32 [B,L], 'label' int32 [B] (UniCL concept id,
`synthetic.content_label`), and, with `views=True` (SimCLR/SLIP), 'image_view1'/'image_view2': two
independent random-resized crops (area fraction `view_scale`, aspect ratio 3/4–4/3, bilinear resize back to
S×S with Pillow) with a horizontal flip at probability ½ (SimCLR, Chen et al. 2020). The main image is not
augmented: the procedural source never repeats a sample, and a flip would contradict "on the left" captions.

data_config keys (a dict or ConfigDict): name='synthetic', image_size (pixels, square), shards (tar-shard
patterns: not available yet), synthetic={SyntheticShapes keyword arguments, e.g. seed, n_shapes,
object_probs}, mean, std (RGB in [0,1] units), view_scale=(0.4, 1.0), num_threads=2,
prefetch_buffer_size=2 (batches).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import grain
import numpy as np
from PIL import Image

from vlm_jax.data import synthetic
from vlm_jax.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SOURCES = ("synthetic",)
_KEYS = {"name", "shards", "image_size", "synthetic", "mean", "std", "view_scale", "num_threads",
         "prefetch_buffer_size"}


def _plain(cfg) -> dict:
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  return dict(cfg)


def _options(data_config) -> dict:
  cfg = _plain(data_config)
  unknown = sorted(set(cfg) - _KEYS)
  if unknown:
    raise UserError(f"unknown data option(s) {unknown}; valid: {sorted(_KEYS)}")
  name = cfg.get("name", "synthetic")
  if cfg.get("shards"):
    raise UserError("data.shards is set, but tar-shard streaming is not available yet; use data.name=synthetic")
  if name not in SOURCES:
    raise UserError(f"unknown data source {name!r}; available now: {list(SOURCES)}")
  return cfg


def _image_size(cfg: dict, image_size: int | None) -> int:
  size = image_size if image_size is not None else cfg.get("image_size")
  if not size or int(size) < 8:
    raise UserError(f"data image_size must be an integer >= 8, got {size!r}")
  return int(size)


def make_source(data_config, split: str, *, image_size: int | None = None) -> synthetic.SyntheticShapes:
  """The random-access source of `split` ('train', 'eval_seen', 'eval_unseen') described by data_config."""
  cfg = _options(data_config)
  image_size = _image_size(cfg, image_size)
  opts = _plain(cfg.get("synthetic"))
  if "image_size" in opts:
    raise UserError("set the resolution with the model/pipeline image_size, not data.synthetic.image_size")
  try:
    return synthetic.SyntheticShapes(split, image_size=image_size, **opts)
  except TypeError as e:
    raise UserError(f"bad data.synthetic options {sorted(opts)}: {e}") from None


class _Scenes:
  """grain source view of a SyntheticShapes: element i is its (cheap) scene metadata; pixels come later."""

  def __init__(self, src: synthetic.SyntheticShapes):
    self.src = src

  def __len__(self) -> int:
    return len(self.src)

  def __getitem__(self, index: int) -> synthetic.Scene:
    return self.src.scene(int(index))


def normalize(images: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x/255 − mean)/std."""
  mean = np.asarray(mean, np.float32) * 255.0
  inv_std = 1.0 / (np.asarray(std, np.float32) * 255.0)
  return (images.astype(np.float32) - mean) * inv_std


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, scale=(0.4, 1.0),
                        ratio=(3 / 4, 4 / 3), flip: bool = True) -> np.ndarray:
  """Inception-style crop (Szegedy et al. 2015, as SimCLR): area fraction in `scale`, log-uniform aspect ratio,
  resized back to the input size (Pillow bilinear); then a horizontal flip with probability ½."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = np.sqrt(area * aspect), np.sqrt(area / aspect)
    if cw <= w and ch <= h:
      break
  else:
    cw, ch = w, h
  x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
  out = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)))
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def _make_example(scene, rng, *, src, tokenizer, mean, std, views, view_scale) -> dict[str, Any]:
  element = src.render(scene, masks=False)
  ex = {"image": normalize(element["image"], mean, std),
        "text": tokenizer([scene.caption])[0],
        "label": np.int32(scene.label)}
  if views:
    for k in ("image_view1", "image_view2"):
      ex[k] = normalize(random_resized_crop(element["image"], rng, view_scale), mean, std)
  return ex


class _ProcessSlice:
  """This process's share of a global stream: element k is global element (k // b)·B + p·b + k mod b.

  B = b · process_count is the global batch, so the global batch g is the concatenation over processes of
  their local batches g: a run on N processes sees exactly the global batches of a run on one.
  """

  def __init__(self, stream, process_index: int, process_count: int, local_batch: int):
    self.stream, self.p, self.n, self.b = stream, process_index, process_count, local_batch

  def __len__(self) -> int:
    return len(self.stream) // self.n

  def __getitem__(self, k: int):
    k = int(k)
    return self.stream[(k // self.b) * self.b * self.n + self.p * self.b + k % self.b]


def make_train_iterator(data_config, *, global_batch_size: int, seed: int, tokenizer,
                        process_index: int = 0, process_count: int = 1, views: bool = False):
  """grain iterator over this process's slices of the global training batches.

  Each process yields batches of `global_batch_size // process_count` rows; together, step by step, they
  form the same global batches as a single-process run. `seed` drives the shuffle and the augmentations
  (the dataset's content is fixed by data.synthetic.seed). `views` adds two SimCLR views per image. The
  returned iterator supports `get_state()` / `set_state()` for exact resumption.
  """
  cfg = _options(data_config)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise UserError(f"batch_size={global_batch_size} is not divisible by the {process_count} processes")
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} not in [0, {process_count})")
  local_batch = global_batch_size // process_count
  src = make_source(cfg, "train", image_size=int(cfg["image_size"]))
  fn = functools.partial(
      _make_example, src=src, tokenizer=tokenizer, mean=tuple(cfg.get("mean", CLIP_MEAN)),
      std=tuple(cfg.get("std", CLIP_STD)), views=views, view_scale=tuple(cfg.get("view_scale", (0.4, 1.0))))
  stream = grain.MapDataset.source(_Scenes(src)).shuffle(seed=seed).repeat().random_map(fn, seed=seed)
  ds = grain.MapDataset.source(_ProcessSlice(stream, process_index, process_count, local_batch))
  ds = ds.batch(local_batch, drop_remainder=True)
  read = grain.ReadOptions(num_threads=int(cfg.get("num_threads", 2)),
                           prefetch_buffer_size=int(cfg.get("prefetch_buffer_size", 2)))
  return iter(ds.to_iter_dataset(read))


@functools.lru_cache(maxsize=8)
def _eval_arrays(data_key: str, split: str, image_size: int) -> dict[str, np.ndarray]:
  import json  # noqa: PLC0415
  cfg = json.loads(data_key)
  src = make_source(cfg, split, image_size=image_size)
  images = np.stack([src.render(src.scene(i), masks=False)["image"] for i in range(len(src))])
  classes = np.array([src.scene(i).classes[0] for i in range(len(src))], np.int32)
  return {"image": normalize(images, tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))),
          "class": classes}


def make_eval_arrays(data_config, split: str, *, image_size: int | None = None) -> dict[str, np.ndarray]:
  """Normalised single-object images of an eval split with their class ids: {'image' [N,S,S,3], 'class' [N]}.

  'eval_seen' / 'eval_unseen' hold data.synthetic.eval_per_class images per seen / held-out class. Cached
  per (config, split, size): evaluators call this every few hundred steps.
  """
  import json  # noqa: PLC0415
  if split not in ("eval_seen", "eval_unseen"):
    raise UserError(f"unknown eval split {split!r}; use 'eval_seen' or 'eval_unseen'")
  cfg = _options(data_config)
  key = json.dumps(cfg, sort_keys=True, default=list)
  out = _eval_arrays(key, split, _image_size(cfg, image_size))
  return {k: v.copy() for k, v in out.items()}


def dataset_info(data_config) -> Mapping[str, Any]:
  """Class names and the seen / held-out (unseen) class ids of the configured dataset."""
  src = make_source(data_config, "eval_seen", image_size=32)
  return {"class_names": src.class_names(), "seen_classes": src.seen_classes,
          "unseen_classes": src.unseen_classes, "num_classes": src.n_classes}
