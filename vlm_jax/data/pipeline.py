"""The training input pipeline (grain) over image-text tar shards, and the evaluation arrays.

Per process, for each data stream it owns (see "Streams"):

    ShardSamples(this stream's shards of every source)      # shard_stream.py: interleave `cycle_length` shards,
      → mix(sources, weights)                               #   shard order reshuffled per epoch or resampled
      → WindowShuffleIterDataset(shuffle_buffer)             # grain
      → DecodeSkip: decode (Pillow, JPEG draft) → augment → normalise → tokenise; bad samples are skipped and
                    counted per reason (each output row carries the counts of what was skipped before it)
      → batch(global_batch / streams, fixed shapes)          # grain
      → mp_prefetch(workers)                                # grain worker processes, when data.workers > 0
    zip the owned streams → concatenate rows → this process's rows of the global batch

Streams: the global batch is the concatenation of `data.streams` (default: the process count) equal parts; stream
s reads shards s, s+S, s+2S, … of each source with its own seed; process p owns streams [p·S/P, (p+1)·S/P). A run
therefore sees the same global batches on any number of processes P dividing S (the test of multi-host
equivalence), and each process reads a disjoint subset of the shards.

Exact resume: the iterator state (`get_state`/`set_state`, saved in every checkpoint) holds, per stream and
worker, the shard-order position, the byte offset inside every open shard, the shuffle window's start and the
augmentation counter, plus the cumulative skip counts — so a resumed run continues with exactly the samples an
uninterrupted run would have seen. `stats()` returns {'data/skipped/<reason>': n} for metrics.jsonl.

Bad data: a bad sample, a truncated tail or an unreadable shard is skipped and counted (`shards.SKIP_REASONS`)
and the run goes on; so does a source that loses some of its shards mid-run (each failed open counted as
`unreadable_shard`, its remaining shards read as before). A source that vanishes mid-run (all its shards deleted
or unreadable) is counted as `unreadable_shard` skips while its stream tries the next shards, then stops the run
with one `error:` line (`UserError`, exit 2), also when other sources of the mixture are still readable: going on
without it would silently change the mixture's weights. Restore the shards and re-launch to resume exactly (from
the last checkpoint), or drop the source from `data.shards` in a new run.

The default dataset (data.name='synthetic', no data.shards) is the procedural one of `synthetic.py`, rendered
once into tar shards by `synthetic_shards.ensure_shards` and streamed like any other. Preprocessing is exactly
that of `transforms.py`: train images get `random_resized_crop(scale=augment.crop_scale, ratio=augment.crop_ratio,
flip=augment.flip)` at image_size, then CLIP normalisation; SimCLR/SLIP views (views=True) are two more crops
with scale `view_scale` and a flip.

A batch is a dict of numpy arrays (CONTRACTS.md): 'image' float32 [B,S,S,3], 'text' int32 [B,L],
'label' int32 [B] (the `.cls` label, −1 when absent; the synthetic UniCL content label), and with views
'image_view1'/'image_view2'. With data.regions = K > 0 (GLIP-style region-word alignment) also, from the
sample's {key}.json 'objects' list ({'box': [x0, y0, x1, y1] pixels, 'phrase': str, 'class': int}; the synthetic
shards write it): 'boxes' float32 [B,K,4] normalised to the output image after the crop/flip (boxes with less
than a quarter of their area left in the crop are dropped), 'phrases' int32 [B,K,Lp] (the object's caption words,
tokenised), 'region_valid' bool [B,K], 'region_class' int32 [B,K] (−1 unknown) — zeros/False/−1 beyond the
sample's objects. They are pure functions of the sample and its crop, so exact resume is unchanged.

data_config keys: see `DEFAULTS`.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Mapping

import grain
import numpy as np
from PIL import Image

from vlm_jax.data import image_folder, shard_stream, shards, synthetic, synthetic_shards, transforms
from vlm_jax.config_lib import plain as _plain
from vlm_jax.errors import UserError

CLIP_MEAN, CLIP_STD = transforms.CLIP_MEAN, transforms.CLIP_STD
normalize = transforms.normalize
SOURCES = ("synthetic", "shards", "image_folder", "tfds")
DEFAULTS = {
    "name": "synthetic",         # 'synthetic' (the embedded default), 'shards' or 'image_folder'
    "shards": "",                # PATTERN[:weight],… (see shards.expand_shards); setting it implies 'shards'
    "image_folder": "",          # root/class_name/…/image (image_folder.py); setting it implies 'image_folder'
    "tfds": "",                  # NAME[:SPLIT] of a tfds dataset prepared as ArrayRecord; setting it implies 'tfds'
    "tfds_dir": "",              # its tfds data_dir (default: tfds' own)
    "caption_template": "{}",    # image_folder / tfds: caption from the class name, e.g. 'a photo of a {}.'
    "image_size": 224,
    "synthetic": {},             # SyntheticShapes options + num_train, shard_size
    "cache_dir": "",             # where the synthetic shards are rendered (default $VLM_JAX_CACHE or ~/.cache)
    "caption_field": "",         # read the caption from this field of {key}.json instead of {key}.txt
    "augment": {"crop_scale": (0.9, 1.0), "crop_ratio": (3 / 4, 4 / 3), "flip": False},
    "views": False,              # two more augmented crops per image, 'image_view1'/'image_view2' (SimCLR, SLIP)
    "view_scale": (0.4, 1.0),    # their random-resized-crop scale range
    "mean": CLIP_MEAN, "std": CLIP_STD,
    "cycle_length": 4,           # shards open at once per stream and worker
    "shuffle_buffer": 1000,      # window-shuffle size (samples)
    "resample": False,           # draw shards with replacement instead of epoch permutations
    "streams": 0,                # data streams (0: the process count); see the module docstring
    "workers": 0,                # grain worker processes per stream (0: decode in this process)
    "worker_buffer": 2,          # batches prefetched per worker
    "regions": 0,                # K > 0: add 'boxes', 'phrases', 'region_valid', 'region_class' (see `_regions`)
    "region_phrase_length": 8,   # tokens per phrase (SOT + words + EOT)
}


_RETIRED = ("num_threads", "prefetch_buffer_size")  # options of the pre-shard pipeline, accepted and ignored


def _options(data_config) -> dict:
  cfg = {k: v for k, v in _plain(data_config).items() if k not in _RETIRED}
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise UserError(f"unknown data option(s) {unknown}; valid: {sorted(DEFAULTS)}")
  out = {**DEFAULTS, **cfg}
  out["augment"] = {**DEFAULTS["augment"], **_plain(cfg.get("augment"))}
  bad = sorted(set(out["augment"]) - set(DEFAULTS["augment"]))
  if bad:
    raise UserError(f"unknown data.augment option(s) {bad}; valid: {sorted(DEFAULTS['augment'])}")
  if out["shards"]:
    out["name"] = "shards"
  elif out["image_folder"]:
    out["name"] = "image_folder"
  elif out["tfds"]:
    out["name"] = "tfds"
  if out["name"] not in SOURCES:
    raise UserError(f"unknown data source {out['name']!r}; available: {list(SOURCES)}")
  if out["name"] == "shards" and not out["shards"]:
    raise UserError("data.name='shards' needs data.shards=PATTERN[:weight],…")
  if out["name"] == "tfds" and not out["tfds"]:
    raise UserError("data.name='tfds' needs data.tfds=NAME[:SPLIT] (prepared with --file_format=array_record)")
  if out["name"] == "image_folder" and not out["image_folder"]:
    raise UserError("data.name='image_folder' needs data.image_folder=ROOT (ROOT/class_name/image.jpg)")
  return out


def _image_size(cfg: dict, image_size: int | None) -> int:
  size = image_size if image_size is not None else cfg.get("image_size")
  if not size or int(size) < 8:
    raise UserError(f"data image_size must be an integer >= 8, got {size!r}")
  return int(size)


def make_source(data_config, split: str, *, image_size: int | None = None) -> synthetic.SyntheticShapes:
  """The random-access synthetic source of `split` ('train', 'eval_seen', 'eval_unseen') of data_config."""
  cfg = _options({k: v for k, v in _plain(data_config).items() if k not in ("shards",)} | {"name": "synthetic"})
  image_size = _image_size(cfg, image_size)
  opts = {k: v for k, v in _plain(cfg.get("synthetic")).items() if k not in ("num_train", "shard_size")}
  if "image_size" in opts:
    raise UserError("set the resolution with the model/pipeline image_size, not data.synthetic.image_size")
  try:
    return synthetic.SyntheticShapes(split, image_size=image_size, **opts)
  except TypeError as e:
    raise UserError(f"bad data.synthetic options {sorted(opts)}: {e}") from None


def shard_sources(data_config, *, quiet: bool = False) -> list[tuple[list[str], float]]:
  """[(shard paths, weight)] of the training data; renders the synthetic default when it is selected."""
  cfg = _options(data_config)
  if cfg["name"] == "synthetic":
    spec = synthetic_shards.ensure_shards(_plain(cfg["synthetic"]), _image_size(cfg, None),
                                          cfg["cache_dir"] or None, quiet=quiet)
  else:
    spec = cfg["shards"]
  return shards.expand_shards(spec)


# ---- decode, augment, skip and count --------------------------------------------------------------------------

_REASON_INDEX = {r: i for i, r in enumerate(shards.SKIP_REASONS)}


class _DecodeSkip(grain.IterDataset):
  """Turns raw samples into model inputs; skips and counts bad ones (see the module docstring)."""

  def __init__(self, parent, fn):
    super().__init__(parent)
    self._fn = fn

  def __iter__(self):
    return _DecodeSkipIterator(self._parent.__iter__(), self._fn)


class _DecodeSkipIterator(grain.DatasetIterator):

  def __init__(self, parent, fn):
    super().__init__(parent)
    self._fn, self._count = fn, 0
    self._warned: set[str] = set()

  def __next__(self) -> dict:
    skipped = np.zeros(len(shards.SKIP_REASONS), np.int32)
    while True:
      el = next(self._parent)
      if el["skip"]:
        skipped[_REASON_INDEX[el["skip"]]] += 1
        continue
      try:
        ex = self._fn(el, self._count)
      except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # a bomb is refused from its header (transforms.decode_image), before any pixel is allocated
        bomb = isinstance(e, Image.DecompressionBombError)
        skipped[_REASON_INDEX["decompression_bomb" if bomb else "corrupt_image"]] += 1
        if (el["src"], bomb) not in self._warned:  # once per shard and kind
          self._warned.add((el["src"], bomb))
          shards.log.warning("shard %s: skipping an undecodable image (%s: %s); further ones are counted, "
                             "not logged", el["src"], type(e).__name__, str(e)[:120])
        continue
      self._count += 1
      ex["_skipped"] = skipped
      return ex

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "count": self._count}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._count = int(state["count"])


def _regions(meta, image_size: tuple[int, int], crop_box, flipped: bool, k: int, tokenizer,
             phrase_length: int) -> dict[str, np.ndarray]:
  """The first `k` objects of a sample's metadata as region arrays (see the module docstring); `image_size` is the
  decoded image's (w, h), which the stored boxes refer to (scaled when JPEG draft decoding shrank it)."""
  objects = list((meta or {}).get("objects", []) if isinstance(meta, dict) else [])[:k]
  out = {"boxes": np.zeros((k, 4), np.float32), "phrases": np.zeros((k, phrase_length), np.int32),
         "region_valid": np.zeros((k,), bool), "region_class": np.full((k,), -1, np.int32)}
  if not objects:
    return out
  stored = (meta.get("image_size") or image_size) if isinstance(meta, dict) else image_size
  sx, sy = image_size[0] / stored[0], image_size[1] / stored[1]
  boxes = np.asarray([o["box"] for o in objects], np.float64) * [sx, sy, sx, sy]
  out["boxes"][:len(objects)], keep = transforms.transform_boxes(boxes, crop_box, flipped)
  out["phrases"][:len(objects)] = tokenizer([str(o.get("phrase", "")) for o in objects], phrase_length)
  out["region_valid"][:len(objects)] = keep
  out["region_class"][:len(objects)] = [int(o.get("class", -1)) for o in objects]
  out["phrases"][~out["region_valid"]] = 0
  out["region_class"][~out["region_valid"]] = -1
  return out


def _example(el: dict, count: int, *, seed: int, size: int, tokenizer, mean, std, augment: dict, views: bool,
             view_scale, regions: int = 0, phrase_length: int = 8) -> dict[str, Any]:
  rng = np.random.default_rng((seed, zlib.crc32(el["image"][:256]), count))
  min_scale = min(augment["crop_scale"][0], view_scale[0] if views else 1.0)
  img = transforms.decode_image(el["image"], draft_size=int(np.ceil(size / np.sqrt(max(min_scale, 0.05)))))
  crop, crop_box, flipped = transforms.random_resized_crop(
      img, size, rng, scale=tuple(augment["crop_scale"]), ratio=tuple(augment["crop_ratio"]),
      flip=bool(augment["flip"]), return_box=True)
  ex = {"image": transforms.normalize(crop, mean, std), "text": tokenizer([el["caption"]])[0],
        "label": np.int32(el["label"])}
  if regions:
    ex.update(_regions(el.get("meta"), img.size, crop_box, flipped, regions, tokenizer, phrase_length))
  if views:
    for k in ("image_view1", "image_view2"):
      v = transforms.random_resized_crop(img, size, rng, scale=tuple(view_scale), flip=True)
      ex[k] = transforms.normalize(v, mean, std)
  return ex


# ---- assembling the per-process iterator ----------------------------------------------------------------------

def _concat_rows(batches: tuple) -> dict:
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class _CountSkips(grain.DatasetIterator):
  """Removes the per-row skip counts from each batch and keeps their running total (checkpointed)."""

  def __init__(self, parent):
    super().__init__(parent)
    self.skipped = np.zeros(len(shards.SKIP_REASONS), np.int64)

  def __next__(self) -> dict:
    batch = dict(next(self._parent))
    self.skipped += batch.pop("_skipped").reshape(-1, len(shards.SKIP_REASONS)).sum(0)
    return batch

  def stats(self) -> dict[str, int]:
    return {f"data/skipped/{r}": int(n) for r, n in zip(shards.SKIP_REASONS, self.skipped)}

  def get_state(self) -> dict:
    return {"pipeline": self._parent.get_state(), "skipped": [int(n) for n in self.skipped]}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["pipeline"])
    saved = np.asarray(state["skipped"], np.int64)  # a checkpoint from before a reason was added has fewer
    self.skipped = np.zeros(len(shards.SKIP_REASONS), np.int64)
    self.skipped[:len(saved)] = saved


def _absl_flags_ready() -> None:
  """grain's worker processes read absl flags; outside an absl app (tests, notebooks) use their defaults."""
  from absl import flags  # noqa: PLC0415
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(data_config, *, global_batch_size: int, seed: int, tokenizer,
                        process_index: int = 0, process_count: int = 1, views: bool = False, quiet: bool = True):
  """grain iterator over this process's rows of the global training batches (see the module docstring).

  Each process yields batches of `global_batch_size // process_count` rows. `seed` drives the shard order,
  the shuffle and the augmentations. `views` (or `data.views`) adds two SimCLR views per image. The returned
  iterator supports
  `get_state()` / `set_state()` for exact resumption and `stats()` for the skip counters.
  """
  cfg = _options(data_config)
  views = bool(views or cfg["views"])
  streams = int(cfg["streams"]) or process_count
  if streams % process_count:
    raise UserError(f"data.streams={streams} must be a multiple of the {process_count} processes")
  if global_batch_size <= 0 or global_batch_size % streams:
    raise UserError(f"batch_size={global_batch_size} is not divisible by the {streams} data streams "
                    "(data.streams, default: the process count)")
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} not in [0, {process_count})")
  size = _image_size(cfg, None)
  if cfg["name"] == "image_folder":
    classes, files = image_folder.list_image_folder(cfg["image_folder"])
    if len(files) < streams:
      raise UserError(f"{len(files)} image(s) under the class folders of {cfg['image_folder']}: not enough")
  elif cfg["name"] == "tfds":
    from vlm_jax.data import sources  # noqa: PLC0415 (tensorflow-datasets is imported only when used)
    name, _, split = cfg["tfds"].partition(":")
    table = sources.TfdsSource(name, split or "train", data_dir=cfg["tfds_dir"] or None,
                               caption_template=cfg["caption_template"])
    if len(table) < streams:
      raise UserError(f"tfds {cfg['tfds']} has {len(table)} example(s): not enough for {streams} data streams")
  else:
    sources = shard_sources(cfg, quiet=quiet)
    for paths, _ in sources:
      if len(paths) < streams:
        raise UserError(f"{len(paths)} shard(s) cannot feed {streams} data streams; use more shards")
  fn = functools.partial(
      _example, size=size, tokenizer=tokenizer, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
      augment=cfg["augment"], views=views, view_scale=tuple(cfg["view_scale"]), regions=int(cfg["regions"]),
      phrase_length=int(cfg["region_phrase_length"]))
  per_stream = global_batch_size // streams
  mine = range(process_index * streams // process_count, (process_index + 1) * streams // process_count)
  datasets = []
  for s in mine:
    stream_seed = int(seed) * 1_000_003 + s
    if cfg["name"] in ("image_folder", "tfds"):  # random access: a full shuffle per epoch, no window needed
      if cfg["name"] == "image_folder":
        src = image_folder.ImageFolderFiles(cfg["image_folder"], files[s::streams], classes,
                                            cfg["caption_template"])
      else:
        src = sources.RawRows(table, range(s, len(table), streams))
      ds = grain.MapDataset.source(src).shuffle(seed=stream_seed).repeat().to_iter_dataset()
    else:
      parts = [shard_stream.ShardSamples(paths[s::streams], seed=stream_seed, cycle_length=int(cfg["cycle_length"]),
                                         resample=bool(cfg["resample"]), caption_field=cfg["caption_field"] or None)
               for paths, _ in sources]
      ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, [w for _, w in sources])
    if int(cfg["shuffle_buffer"]) > 1 and cfg["name"] in ("synthetic", "shards"):
      ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=int(cfg["shuffle_buffer"]), seed=stream_seed)
    ds = _DecodeSkip(ds, functools.partial(fn, seed=stream_seed)).batch(per_stream, drop_remainder=True)
    if int(cfg["workers"]) > 0:
      _absl_flags_ready()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg["workers"]),
                                                       per_worker_buffer_size=int(cfg["worker_buffer"])))
    datasets.append(ds)
  ds = datasets[0] if len(datasets) == 1 else grain.experimental.ZipIterDataset(datasets).map(_concat_rows)
  return _CountSkips(iter(ds))


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
