"""Hand-built tar shards for the data tests: clean ones, and one with every kind of damage the pipeline skips."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

from vlm_jax.data import shards


def image_bytes(seed: int, fmt: str = "PNG", size: int = 24, mode: str = "RGB") -> bytes:
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
  img = Image.fromarray(arr)
  if mode == "P":
    img = img.convert("P")
    img.info["transparency"] = 0
  elif mode != "RGB":
    img = img.convert(mode)
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def write_clean(out_dir: str, n_shards: int, per_shard: int, prefix: str = "clean", seed: int = 0) -> list[str]:
  """`n_shards` valid shards; sample i has caption 'sample i' and label i."""
  w = shards.ShardWriter(out_dir, shard_size=per_shard, prefix=prefix)
  for i in range(n_shards * per_shard):
    w.write(f"{prefix}{i:06d}", image_bytes(seed * 100_000 + i), "png", f"sample {i}", label=i)
  w.close(stats_file=False)
  return [os.path.join(out_dir, s["shard"]) for s in w.shards]


def _tar(path: str, members: list[tuple[str, bytes]]) -> None:
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      t.addfile(info, io.BytesIO(data))


# what `read_shard` reports for the dirty shard; the two bad images are only found by the decoder
DIRTY_READER_SKIPS = {"empty_member": 1, "missing_caption": 1, "empty_caption": 1, "missing_image": 1,
                      "bad_text": 1, "bad_label": 1}
DIRTY_DECODE_SKIPS = {"corrupt_image": 2}


def write_dirty(path: str) -> int:
  """One shard mixing valid samples (also grayscale/CMYK/palette/RGBA/upper-case WEBP/JPEG and a key with
  '../') with every per-sample defect, each between two valid samples. Returns the number of valid samples."""
  good = iter(range(1000))

  def ok(fmt="PNG", ext="png", mode="RGB", key=None):
    i = next(good)
    key = key or f"good{i:03d}"
    return [(f"{key}.{ext}", image_bytes(500 + i, fmt, mode=mode)), (f"{key}.txt", f"good {i}".encode()),
            (f"{key}.cls", str(i).encode())]

  png = image_bytes(7)
  bad = [
      [("b1.jpg", b"this is not an image"), ("b1.txt", b"corrupt bytes")],          # corrupt_image
      [("b2.png", png[:len(png) // 2]), ("b2.txt", b"truncated image")],            # corrupt_image
      [("b3.png", b""), ("b3.txt", b"zero-byte image")],                            # empty_member
      [("b4.png", png)],                                                            # missing_caption
      [("b5.png", png), ("b5.txt", b"  \n ")],                                      # empty_caption
      [("b6.txt", b"a caption without its image")],                                 # missing_image
      [("b7.png", png), ("b7.txt", b"\xff\xfe caption")],                           # bad_text
      [("b8.png", png), ("b8.txt", b"bad label"), ("b8.cls", b"dog")],              # bad_label
  ]
  members = ok()
  for b in bad:
    members += b + ok()
  members += ok("JPEG", "JPG", "L") + ok("JPEG", "jpeg", "CMYK") + ok("PNG", "png", "P") + ok("PNG", "png", "RGBA")
  members += ok("WEBP", "WEBP") + ok(key="../../escape")
  _tar(path, members)
  return next(good)


def write_truncated(path: str, n_good: int = 3) -> None:
  """A shard with `n_good` valid samples, then cut in the middle of the next image."""
  members = []
  for i in range(n_good + 1):
    members += [(f"t{i}.png", image_bytes(900 + i)), (f"t{i}.txt", f"trunc {i}".encode())]
  _tar(path, members)
  data = open(path, "rb").read()
  with tarfile.open(path) as t:
    cut = [m for m in t.getmembers() if m.name == f"t{n_good}.png"][0].offset_data + 100
  with open(path, "wb") as f:
    f.write(data[:cut])
