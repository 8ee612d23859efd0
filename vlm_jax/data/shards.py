"""Image-text tar shards in the webdataset / img2dataset layout: naming patterns, a streaming reader, a writer.

Layout: a shard is a plain POSIX tar whose members are grouped by key — consecutive members sharing the name up
to the first '.' of their base name, e.g. `000010003.jpg`, `000010003.txt`, `000010003.json`. A sample has one
image member (`jpg|jpeg|png|webp`, any case), a caption (`txt`, or a field of the `json` member when
`caption_field` is given) and optionally a class label (`cls`, an integer as text).

Patterns (`expand_shards`): `PATTERN[:weight],PATTERN[:weight]…` or a list of such strings; each pattern is
brace-expanded (`data-{00000..01023}.tar`, `{a,b}`) then, when it contains glob characters, globbed through
fsspec. Any fsspec URL works (`gs://` needs the `gcs` extra, `s3://` s3fs, `https://` aiohttp).

Reading (`read_shard`) streams member by member from an fsspec file object (`tarfile` stream mode); nothing is
extracted to disk and member names are never used as filesystem paths: an absolute name or one with `..` is just
a key. A member that is not a regular file is never read or followed: directories are ignored, and a sample with
a symlink, hard link, device or FIFO member is skipped as `special_member`. Every sample boundary carries a resume
position — the byte offset of its first member header — so a reader can restart mid-shard by seeking there.
Problems never raise: a bad sample becomes a `Skip(reason)` and the stream goes on; a truncated or unreadable
shard ends with one `Skip`. Each reason is logged once per shard.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import tarfile
import time
from typing import Iterator, Sequence

import braceexpand
import fsspec

from vlm_jax.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Why a sample (or the rest of a shard) was skipped; metrics.jsonl logs `data/skipped/<reason>`.
SKIP_REASONS = ("corrupt_image", "empty_member", "missing_image", "missing_caption", "empty_caption",
                "bad_text", "bad_label", "truncated_shard", "unreadable_shard", "unreadable_file",
                "special_member", "decompression_bomb")


@dataclasses.dataclass(frozen=True)
class Sample:
  key: str
  image: bytes
  image_ext: str
  caption: str
  label: int = -1
  meta: dict | None = None


@dataclasses.dataclass(frozen=True)
class Skip:
  reason: str
  key: str = ""


# ---- patterns ------------------------------------------------------------------------------------------------

def _split_top_level(spec: str) -> list[str]:
  """Splits on commas outside braces."""
  out, depth, cur = [], 0, []
  for ch in spec:
    depth += ch == "{"
    depth -= ch == "}"
    if ch == "," and depth == 0:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  out.append("".join(cur))
  return [s.strip() for s in out if s.strip()]


def _split_weight(item: str) -> tuple[str, float]:
  head, sep, tail = item.rpartition(":")
  if sep and head and "/" not in tail:
    try:
      weight = float(tail)
    except ValueError:
      return item, 1.0
    if not weight > 0:
      raise UserError(f"shard weight must be > 0 in {item!r}")
    return head, weight
  return item, 1.0


def _expand_one(pattern: str) -> list[str]:
  paths = []
  for p in braceexpand.braceexpand(pattern):
    if any(c in p for c in "*?["):
      fs, _, _ = fsspec.get_fs_token_paths(p)
      paths.extend(sorted(fs.unstrip_protocol(g) if "://" in p else g for g in fs.glob(p)))
    else:
      paths.append(p)
  return paths


def expand_shards(spec: str | Sequence[str], *, check: bool = True) -> list[tuple[list[str], float]]:
  """[(paths, weight)] per comma-separated source of `spec`; see the module docstring.

  With `check`, a source none of whose shards exists is a `UserError` (local paths are all checked; for a
  remote source only the first, to keep start-up fast on thousands of shards).
  """
  items = []
  for s in ([spec] if isinstance(spec, str) else list(spec)):
    items.extend(_split_top_level(str(s)))
  if not items:
    raise UserError("data.shards is empty; give PATTERN[:weight],… (globs and {000..999} ranges allowed)")
  sources = []
  for item in items:
    pattern, weight = _split_weight(item)
    try:
      paths = _expand_one(pattern)
    except (OSError, ValueError, ImportError) as e:
      raise UserError(f"cannot list shards {pattern!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if check:
      local = "://" not in pattern or pattern.startswith("file://")
      exists = [p for p in paths if os.path.isfile(p.removeprefix("file://"))] if local else paths[:1]
      if not local and paths:
        try:
          fs, _, _ = fsspec.get_fs_token_paths(paths[0])
          exists = paths[:1] if fs.exists(paths[0]) else []
        except (OSError, ValueError, ImportError) as e:
          raise UserError(f"cannot reach {paths[0]!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
      if not exists:
        raise UserError(f"no shard matches {pattern!r}")
    sources.append((paths, weight))
  return sources


# ---- reading -------------------------------------------------------------------------------------------------

def _split_name(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'); the extension starts at the first '.' of the base name."""
  slash = name.rfind("/")
  dot = name.find(".", slash + 1)
  if dot < 0:
    return name, ""
  return name[:dot], name[dot + 1:].lower()


def _assemble(key: str, members: dict[str, bytes | None], caption_field: str | None) -> Sample | Skip:
  if any(v is None for v in members.values()):  # a link / device / FIFO member (never read, never followed)
    return Skip("special_member", key)
  if any(len(v) == 0 for v in members.values()):
    return Skip("empty_member", key)
  image_ext = next((e for e in IMAGE_EXTS if e in members), None)
  if image_ext is None:
    return Skip("missing_image", key)
  meta = None
  if "json" in members:
    try:
      meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
      return Skip("bad_text", key)
  if caption_field:
    caption = meta.get(caption_field) if isinstance(meta, dict) else None
    if caption is None:
      return Skip("missing_caption", key)
    caption = str(caption)
  else:
    if "txt" not in members:
      return Skip("missing_caption", key)
    try:
      caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError:
      return Skip("bad_text", key)
  caption = caption.strip()
  if not caption:
    return Skip("empty_caption", key)
  label = -1
  if "cls" in members:
    try:
      label = int(members["cls"].decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
      return Skip("bad_label", key)
  return Sample(key, members[image_ext], image_ext, caption, label, meta)


def _open(path: str, retries: int = 2):
  for attempt in range(retries + 1):
    try:
      return fsspec.open(path, "rb").open()
    except FileNotFoundError:
      raise
    except OSError:
      if attempt == retries:
        raise
      time.sleep(0.5 * 2 ** attempt)


def read_shard(path: str, offset: int = 0, *, caption_field: str | None = None
               ) -> Iterator[tuple[Sample | Skip, int]]:
  """Streams the samples of one shard from byte `offset` (a sample boundary, 0 = start).

  Yields `(item, next_offset)`: a `Sample` or a `Skip`, and the offset where the next sample starts (resume
  there to continue after this item). A truncated or unreadable shard ends with `Skip('truncated_shard' |
  'unreadable_shard')` and next_offset = -1 (nothing left to read).
  """
  warned: set[str] = set()

  def skip(item: Skip):
    if item.reason not in warned:
      warned.add(item.reason)
      if item.reason in ("truncated_shard", "unreadable_shard"):
        log.warning("shard %s: %s (%s); skipping the rest of this shard", path, item.reason, item.key)
      else:
        log.warning("shard %s: skipping sample %r (%s); further ones in this shard are counted, not logged",
                    path, item.key, item.reason)
    return item

  try:
    f = _open(path)
  except (OSError, ValueError) as e:
    yield skip(Skip("unreadable_shard", f"{type(e).__name__}: {e}"[:200])), -1
    return
  with f:
    try:
      f.seek(offset)
      tar = tarfile.open(fileobj=f, mode="r|")
    except (OSError, tarfile.TarError, EOFError) as e:
      # at a resume offset the shard is shorter than when it was read: truncated; at 0 it is no tar at all
      reason = "truncated_shard" if offset else "unreadable_shard"
      yield skip(Skip(reason, f"{type(e).__name__}: {e}"[:200])), -1
      return
    key, members = None, {}
    try:
      for info in tar:
        if info.isdir():
          continue
        k, ext = _split_name(info.name)
        if k != key:
          if key is not None:
            item = _assemble(key, members, caption_field)
            yield (skip(item) if isinstance(item, Skip) else item), offset + info.offset
          key, members = k, {}
        if not info.isfile():
          members[ext] = None
          continue
        data = tar.extractfile(info).read()
        if len(data) != info.size:
          raise EOFError("unexpected end of data")
        members[ext] = data
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
      yield skip(Skip("truncated_shard", f"{key}: {type(e).__name__}: {e}"[:200])), -1
      return
    # tarfile ends quietly when a header is cut off at a block boundary: a complete archive has its end
    # marker (a zero block) where reading stopped, a truncated one has nothing there.
    try:
      f.seek(offset + tar.offset)
      complete = f.read(512) == bytes(512)
    except OSError:
      complete = False
    if not complete:
      yield skip(Skip("truncated_shard", f"{key}: no end-of-archive marker")), -1
    elif key is not None:
      item = _assemble(key, members, caption_field)
      yield (skip(item) if isinstance(item, Skip) else item), -1


def iter_captions(spec, limit: int | None = None) -> Iterator[str]:
  """Captions of every valid sample of the shards named by `spec`, in shard order (tools, tokenizer training)."""
  n = 0
  for paths, _ in expand_shards(spec):
    for path in paths:
      for item, _ in read_shard(path):
        if isinstance(item, Sample):
          yield item.caption
          n += 1
          if limit is not None and n >= limit:
            return


# ---- writing -------------------------------------------------------------------------------------------------

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class ShardWriter:
  """Writes samples into `out_dir/{prefix}-{00000}.tar`, `shard_size` samples per shard (img2dataset layout).

  Each shard is written to a temporary name and renamed when complete, so a crash never leaves a truncated
  shard behind. `close()` writes `stats.json` (samples per shard, total) and returns it.
  """

  def __init__(self, out_dir: str, *, shard_size: int = 10000, prefix: str = "data", digits: int = 5,
               first_shard: int = 0):
    if shard_size < 1:
      raise UserError(f"shard size must be >= 1, got {shard_size}")
    self.out_dir, self.shard_size, self.prefix, self.digits = out_dir, int(shard_size), prefix, digits
    self.first_shard = int(first_shard)
    os.makedirs(out_dir, exist_ok=True)
    self.shards: list[dict] = []
    self._tar = None
    self._count = 0
    self._mtime = 0  # fixed member mtime: the same samples always give the same bytes

  @property
  def num_samples(self) -> int:
    return sum(s["samples"] for s in self.shards)

  def _next_shard(self):
    self._finish_shard()
    name = f"{self.prefix}-{self.first_shard + len(self.shards):0{self.digits}d}.tar"
    self._path = os.path.join(self.out_dir, name)
    self._tar = tarfile.open(self._path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
    self.shards.append({"shard": name, "samples": 0})

  def _finish_shard(self):
    if self._tar is not None:
      self._tar.close()
      os.replace(self._path + ".tmp", self._path)
      self._tar = None

  def _add(self, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), self._mtime, 0o644
    self._tar.addfile(info, io.BytesIO(data))

  def write(self, key: str | None, image: bytes, image_ext: str, caption: str | None, *,
            label: int | None = None, meta: dict | None = None) -> str:
    """Adds one sample (`key` defaults to shard index + position, img2dataset style); returns the key."""
    if self._tar is None or self.shards[-1]["samples"] >= self.shard_size:
      self._next_shard()
    if key is None:
      key = f"{self.first_shard + len(self.shards) - 1:0{self.digits}d}{self.shards[-1]['samples']:04d}"
    if not _KEY_RE.match(key):
      raise UserError(f"sample key {key!r} must be letters, digits, '_' or '-'")
    ext = image_ext.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
      raise UserError(f"image extension {image_ext!r} not one of {IMAGE_EXTS}")
    self._add(f"{key}.{ext}", image)
    if caption is not None:
      self._add(f"{key}.txt", caption.encode("utf-8"))
    if label is not None:
      self._add(f"{key}.cls", str(int(label)).encode())
    if meta is not None:
      self._add(f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
    self.shards[-1]["samples"] += 1
    return key

  def close(self, extra_stats: dict | None = None, *, stats_file: bool = True) -> dict:
    """Finishes the last shard; writes `stats.json` unless `stats_file=False` (one of several writers)."""
    self._finish_shard()
    stats = {"samples": self.num_samples, "shards": len(self.shards), "per_shard": self.shards,
             **(extra_stats or {})}
    if stats_file:
      with open(os.path.join(self.out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    return stats

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if exc[0] is None:
      self.close()
    elif self._tar is not None:
      self._tar.close()
