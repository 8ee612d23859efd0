"""The embedded default dataset as tar shards: the procedural training split rendered once, then streamed.

`ensure_shards(options, image_size, cache_dir)` writes `num_train` samples of `SyntheticShapes('train', …)` —
PNG image, caption, UniCL content label (`.cls`) and per-object metadata (`.json`, see `object_meta`) — with
`shards.ShardWriter` into
`cache_dir/synthetic-<hash of the options>/data-{00000..}.tar` (+ `stats.json`), and returns a shard pattern for
`shards.expand_shards`. Shard i always holds samples [i·shard_size, (i+1)·shard_size), so the files do not
depend on how many processes render them (`processes` spawn workers, default: the CPU count). A finished
directory is reused; it is written under a temporary name and renamed, so concurrent or interrupted runs never
see a partial dataset.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile

from PIL import Image

from vlm_jax.errors import UserError

DEFAULT_NUM_TRAIN = 1 << 17
DEFAULT_SHARD_SIZE = 4096


def default_cache_dir() -> str:
  return os.environ.get("VLM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlm_jax")


def _phrase_pattern() -> re.Pattern:
  from vlm_jax.data import synthetic  # noqa: PLC0415
  alt = lambda words: "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))
  sizes = alt(w for syn in synthetic.SIZE_WORDS.values() for w in syn)
  colours = alt(w for _, _, syn in synthetic.COLOURS for w in syn)
  shapes = alt(w for _, syn in synthetic.SHAPES for w in syn)
  return re.compile(rf"\b(?:(?:{sizes}) )?(?:{colours}) (?:{shapes})\b")


def object_phrases(caption: str) -> list[str]:
  """The phrase naming each object of a synthetic caption, in object order: '[size] colour shape' as written
  ("a photo of a small crimson disk and a blue star" -> ['small crimson disk', 'blue star'])."""
  return _phrase_pattern().findall(caption)


def object_meta(scene, element: dict) -> dict:
  """{'image_size': [w, h], 'objects': [{'box': [x0, y0, x1, y1] (pixels of the stored image, x1/y1 exclusive),
  'class': id, 'phrase': the caption's words for it}]} of a rendered synthetic element
  (`SyntheticShapes.render(masks=True)`)."""
  phrases = object_phrases(scene.caption)
  if len(phrases) != len(scene.classes):
    raise ValueError(f"caption {scene.caption!r} names {len(phrases)} objects, the scene has {len(scene.classes)}")
  h, w = element["image"].shape[:2]
  return {"image_size": [int(w), int(h)],
          "objects": [{"box": [float(v) for v in element["boxes"][k]], "class": int(c), "phrase": p}
                      for k, (c, p) in enumerate(zip(scene.classes, phrases))]}


def _render_shard(out_dir: str, index: int, start: int, stop: int, image_size: int, opts: dict) -> dict:
  from vlm_jax.data import shards, synthetic  # noqa: PLC0415 (spawned worker)
  src = synthetic.SyntheticShapes("train", image_size=image_size, **opts)
  writer = shards.ShardWriter(out_dir, shard_size=stop - start, first_shard=index)
  for i in range(start, stop):
    scene = src.scene(i)
    el = src.render(scene, masks=True)
    buf = io.BytesIO()
    Image.fromarray(el["image"]).save(buf, "PNG")
    writer.write(f"{i:09d}", buf.getvalue(), "png", scene.caption, label=int(scene.label),
                 meta=object_meta(scene, el))
  return writer.close(stats_file=False)["per_shard"][0]


def ensure_shards(options: dict, image_size: int, cache_dir: str | None = None, processes: int | None = None,
                  quiet: bool = False) -> str:
  """Pattern of the synthetic training shards for (options, image_size), rendering them when missing."""
  opts = dict(options or {})
  num_train = int(opts.pop("num_train", DEFAULT_NUM_TRAIN))
  shard_size = int(opts.pop("shard_size", DEFAULT_SHARD_SIZE))
  if num_train < 1 or shard_size < 1:
    raise UserError(f"data.synthetic.num_train and shard_size must be >= 1, got {num_train}, {shard_size}")
  from vlm_jax.data import synthetic  # noqa: PLC0415
  try:
    synthetic.SyntheticShapes("train", image_size=image_size, **opts)
  except TypeError as e:
    raise UserError(f"bad data.synthetic options {sorted(opts)}: {e}") from None
  # v2: samples carry per-object metadata ({key}.json)
  ident = json.dumps({"v": 2, "opts": opts, "size": image_size, "n": num_train, "shard": shard_size},
                     sort_keys=True)
  name = "synthetic-" + hashlib.sha1(ident.encode()).hexdigest()[:12]
  root = cache_dir or default_cache_dir()
  final = os.path.join(root, name)
  n_shards = -(-num_train // shard_size)
  pattern = os.path.join(final, f"data-{{{0:05d}..{n_shards - 1:05d}}}.tar")
  if os.path.exists(os.path.join(final, "stats.json")):
    return pattern
  try:
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=root)
  except OSError as e:
    raise UserError(f"cannot write the synthetic dataset under {root} ({e.strerror}); set VLM_JAX_CACHE or "
                    "data.cache_dir to a writable folder") from None
  if not quiet:
    print(f"rendering the synthetic dataset ({num_train} samples, {image_size}px) into {final} …", flush=True)
  jobs = [(tmp, i, i * shard_size, min(num_train, (i + 1) * shard_size), image_size, opts)
          for i in range(n_shards)]
  workers = max(1, min(processes or os.cpu_count() or 1, n_shards))
  try:
    if workers == 1:
      per_shard = [_render_shard(*job) for job in jobs]
    else:
      with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        per_shard = list(pool.map(_render_shard, *zip(*jobs)))
    with open(os.path.join(tmp, "stats.json"), "w") as f:
      json.dump({"samples": num_train, "shards": n_shards, "per_shard": per_shard, "image_size": image_size,
                 "options": opts}, f, indent=2)
    try:
      os.rename(tmp, final)
    except OSError:  # another process finished first
      if not os.path.exists(os.path.join(final, "stats.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return pattern
