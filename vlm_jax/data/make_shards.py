"""Converts local image-caption data into tar shards in the img2dataset / webdataset layout.

  python -m vlm_jax.data.make_shards --input captions.csv --output shards/ [--resize 256]
  python -m vlm_jax.data.make_shards --input train.jsonl --output shards/ --shard-size 5000
  python -m vlm_jax.data.make_shards --input imagenet/train --output shards/   # class_name/xxx.jpg

Inputs:
- CSV (`.csv`) or TSV (`.tsv`, open_clip's CsvDataset files) with a header row. The image column is
  `--image-column` or the first of filepath|image|image_path|path in the header; the caption column is
  `--caption-column` or the first of caption|title|text; an optional integer `--label-column` (default: `label`
  when present) becomes the `.cls` member.
- JSONL (`.jsonl`): one object per line, `{"image": path, "caption": str}` plus an optional integer "label"
  (the same column options and defaults name the keys).
- An image folder `ROOT/class_name/…/xxx.jpg`: caption = the class name with '_' → ' ', label = the index of the
  class folder in sorted order; stats.json lists the class names.
Relative image paths resolve against the folder of the input file. Images are local files; URLs are skipped
(download them with img2dataset, which writes this layout itself).

Images (`load_image`): decoded fully with Pillow to reject corrupt files. With `--resize N`, an image whose
shorter side exceeds N is resized to shorter side N (bicubic, antialiased, aspect kept, longer side rounded),
converted to RGB (alpha dropped) and re-encoded as JPEG quality 95; smaller images are never upscaled. JPEG,
PNG and WebP files that need no resize keep their original bytes; other formats (BMP, GIF, TIFF, …) become
RGB JPEG quality 95. Each sample's `.json` member records the path as written in the input, the caption and the
original and stored width/height (`--no-meta` leaves it out).

Output: `OUTPUT/{prefix}-{00000..}.tar`, `--shard-size` samples each, written by `shards.ShardWriter` in input
order with img2dataset-style sequential keys, and `OUTPUT/stats.json`: samples written, shards, inputs seen,
skipped inputs per reason (`SKIP_REASONS`), resized/converted counts and, for a folder, the class names. A bad
input is skipped and counted, never fatal; a missing or unreadable input, a header without the needed columns,
or no input at all is a one-line `error:` with exit status 2. `--processes` decode in parallel (spawned
workers); the shards do not depend on their number.
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import io
import json
import multiprocessing
import os
import sys
from typing import Iterator

from PIL import Image

from vlm_jax.data import shards, transforms
from vlm_jax.data.image_folder import FOLDER_IMAGE_EXTS, list_image_folder
from vlm_jax.errors import UserError, exit_on_user_error

IMAGE_COLUMNS = ("filepath", "image", "image_path", "path")
CAPTION_COLUMNS = ("caption", "title", "text")
LABEL_COLUMNS = ("label",)
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Why an input was not written; stats.json counts them under "skipped".
SKIP_REASONS = ("bad_line", "missing_image", "not_local_path", "missing_file", "unreadable_file",
                "corrupt_image", "missing_caption", "empty_caption", "bad_text", "bad_label")


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line `error: …`, exit 2, via exit_on_user_error
    raise UserError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m vlm_jax.data.make_shards", description=__doc__.split("\n\n")[0],
              formatter_class=argparse.RawDescriptionHelpFormatter,
              epilog="Input columns: image one of " + "|".join(IMAGE_COLUMNS) + ", caption one of "
              + "|".join(CAPTION_COLUMNS) + ", optional label.")
  p.add_argument("--input", required=True, help="captions .csv / .tsv / .jsonl, or an image folder class/xxx.jpg")
  p.add_argument("--output", required=True, help="output folder for the shards and stats.json")
  p.add_argument("--shard-size", type=int, default=10000, metavar="N", help="samples per shard (default 10000)")
  p.add_argument("--resize", type=int, default=None, metavar="N",
                 help="shrink images whose shorter side exceeds N to N (bicubic, JPEG q95); never upscales")
  p.add_argument("--prefix", default="data", help="shard names PREFIX-00000.tar (default data)")
  p.add_argument("--image-column", default=None, help="image path column / JSON key")
  p.add_argument("--caption-column", default=None, help="caption column / JSON key")
  p.add_argument("--label-column", default=None, help="integer label column / JSON key (default: 'label' if present)")
  p.add_argument("--processes", type=int, default=None, metavar="N",
                 help="decoding processes (default: CPU count, at most 16)")
  p.add_argument("--no-meta", action="store_true", help="do not write the {key}.json member")
  p.add_argument("--overwrite", action="store_true", help="replace existing PREFIX-*.tar shards in --output")
  return p


# ---- inputs: each yields (path as written, resolved path, caption, label) or a skip reason ---------------------

def _caption(value) -> str | None | tuple[str]:
  """A clean caption, or ('reason',)."""
  if value is None:
    return ("missing_caption",)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    return ("bad_text",)
  try:
    value.encode("utf-8")  # lone surrogates: bytes that were not UTF-8 in the input file
  except UnicodeEncodeError:
    return ("bad_text",)
  value = value.strip()
  return value if value else ("empty_caption",)


def _label(value) -> int | None | tuple[str]:
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if isinstance(value, bool):
    return ("bad_label",)
  try:
    label = int(value.strip()) if isinstance(value, str) else int(value)
  except (TypeError, ValueError):
    return ("bad_label",)
  if label < 0 or (isinstance(value, float) and value != label):
    return ("bad_label",)
  return label


def _record(base: str, image, caption, label):
  """(given path, resolved path, caption, label) or a skip reason string."""
  if not isinstance(image, str) or not image.strip():
    return "missing_image"
  image = image.strip()
  if "://" in image:
    return "not_local_path"
  caption, label = _caption(caption), _label(label)
  for v in (caption, label):
    if isinstance(v, tuple):
      return v[0]
  return image, os.path.join(base, os.path.expanduser(image)), caption, label


def _pick(names, requested: str | None, defaults: tuple[str, ...], what: str, flag: str, optional=False):
  if requested:
    if requested not in names:
      raise UserError(f"{flag} {requested!r} is not among the input's columns {list(names)}")
    return requested
  found = next((c for c in defaults if c in names), None)
  if found is None and not optional:
    raise UserError(f"no {what} column ({'|'.join(defaults)}) among the input's columns {list(names)}; "
                    f"name it with {flag}")
  return found


def _open_text(path: str):
  try:
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
  except OSError as e:
    raise UserError(f"cannot read --input {path} ({e.strerror})") from None


def _csv_records(path: str, delimiter: str, args) -> Iterator:
  f = _open_text(path)
  base = os.path.dirname(os.path.abspath(path))
  reader = csv.reader(f, delimiter=delimiter)
  try:
    header = next(reader)
  except StopIteration:
    f.close()
    raise UserError(f"--input {path} is empty (expected a header row)") from None
  except (csv.Error, OSError) as e:
    f.close()
    raise UserError(f"cannot read the header of --input {path} ({e})") from None
  header = [h.strip() for h in header]
  image_col = _pick(header, args.image_column, IMAGE_COLUMNS, "image", "--image-column")
  caption_col = _pick(header, args.caption_column, CAPTION_COLUMNS, "caption", "--caption-column")
  label_col = _pick(header, args.label_column, LABEL_COLUMNS, "label", "--label-column", optional=True)
  cols = {c: header.index(c) for c in (image_col, caption_col, label_col) if c}

  def rows():
    with f:
      while True:
        try:
          row = next(reader)
        except StopIteration:
          return
        except csv.Error:
          yield "bad_line"
          continue
        if not row:  # blank line
          continue
        get = {c: (row[i] if i < len(row) else None) for c, i in cols.items()}
        yield _record(base, get[image_col], get[caption_col], get.get(label_col))

  return rows()


def _jsonl_records(path: str, args) -> Iterator:
  f = _open_text(path)
  base = os.path.dirname(os.path.abspath(path))
  image_keys = (args.image_column,) if args.image_column else IMAGE_COLUMNS
  caption_keys = (args.caption_column,) if args.caption_column else CAPTION_COLUMNS
  label_keys = (args.label_column,) if args.label_column else LABEL_COLUMNS

  def first(obj, keys):
    return next((obj[k] for k in keys if k in obj), None)

  def rows():
    with f:
      for line in f:
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except ValueError:
          yield "bad_line"
          continue
        if not isinstance(obj, dict):
          yield "bad_line"
          continue
        yield _record(base, first(obj, image_keys), first(obj, caption_keys), first(obj, label_keys))

  return rows()


def _folder_records(root: str, classes: list[str], files: list[tuple[str, int]]) -> Iterator:
  for rel, index in files:
    yield rel, os.path.join(root, rel), classes[index].replace("_", " ").strip() or classes[index], index


# ---- images ----------------------------------------------------------------------------------------------------

def _jpeg(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  transforms.to_rgb(img).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def load_image(path: str, resize: int | None) -> tuple[bytes, str, tuple[int, int], tuple[int, int], str] | str:
  """(bytes, ext, original (w, h), stored (w, h), 'kept'|'resized'|'converted') or a skip reason; see the
  module docstring."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    return "missing_file"
  except OSError:
    return "unreadable_file"
  try:
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()
  except Exception:  # noqa: BLE001 — arbitrary user files: any decoder failure means an undecodable image
    return "corrupt_image"
  w, h = img.size
  if resize and min(w, h) > resize:
    s = resize / min(w, h)
    size = (resize, max(1, round(h * s))) if w <= h else (max(1, round(w * s)), resize)
    return _jpeg(img.resize(size, Image.BICUBIC)), "jpg", (w, h), size, "resized"
  if fmt in _KEEP_FORMATS:
    return data, _KEEP_FORMATS[fmt], (w, h), (w, h), "kept"
  return _jpeg(img), "jpg", (w, h), (w, h), "converted"


def _load_job(job):
  given, path, caption, label, resize = job
  return given, caption, label, load_image(path, resize)


# ---- driver ----------------------------------------------------------------------------------------------------

def _records(args) -> tuple[Iterator, dict, int | None]:
  """(records, extra stats, number of inputs when known) for --input."""
  path = args.input
  if os.path.isdir(path):
    classes, files = list_image_folder(path)
    if not classes:
      raise UserError(f"no class folders in {path} (expected {path}/class_name/image.jpg)")
    if not files:
      raise UserError(f"no images ({'|'.join(e[1:] for e in FOLDER_IMAGE_EXTS)}) under the class folders of {path}")
    return _folder_records(path, classes, files), {"classes": classes}, len(files)
  if not os.path.exists(path):
    raise UserError(f"--input {path}: no such file or folder")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".csv", ".tsv"):
    return _csv_records(path, "," if ext == ".csv" else "\t", args), {}, None
  if ext in (".jsonl", ".ndjson"):
    return _jsonl_records(path, args), {}, None
  raise UserError(f"--input {path}: expected a .csv, .tsv or .jsonl file or an image folder")


def _prepare_output(args) -> None:
  try:
    os.makedirs(args.output, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --output {args.output} ({e.strerror})") from None
  old = sorted(glob.glob(os.path.join(glob.escape(args.output), f"{glob.escape(args.prefix)}-*.tar")))
  if old and not args.overwrite:
    raise UserError(f"{args.output} already holds {len(old)} shard(s) {args.prefix}-*.tar; use --overwrite, "
                    "another --output or another --prefix")
  for p in old:
    os.remove(p)
  if not os.access(args.output, os.W_OK):
    raise UserError(f"--output {args.output} is not writable")


def shard_pattern(out_dir: str, prefix: str, n_shards: int) -> str:
  """The expand_shards pattern of `n_shards` shards written by ShardWriter."""
  if n_shards == 1:
    return os.path.join(out_dir, f"{prefix}-00000.tar")
  return os.path.join(out_dir, f"{prefix}-{{00000..{n_shards - 1:05d}}}.tar")


def make_shards(args) -> dict:
  """Writes the shards and stats.json; returns the stats."""
  if args.shard_size < 1:
    raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
  if args.resize is not None and args.resize < 1:
    raise UserError(f"--resize must be >= 1, got {args.resize}")
  if args.processes is not None and args.processes < 1:
    raise UserError(f"--processes must be >= 1, got {args.processes}")
  if not args.prefix or not all(c.isalnum() or c in "_-." for c in args.prefix):
    raise UserError(f"--prefix {args.prefix!r} must be letters, digits, '_', '-' or '.'")
  records, extra, total = _records(args)
  _prepare_output(args)
  # `jobs` may run in the pool's feeder thread: it counts into its own counter, merged at the end
  read_skips, skipped, counts = collections.Counter(), collections.Counter(), collections.Counter()

  def jobs():
    for rec in records:
      read_skips["inputs"] += 1
      if isinstance(rec, str):
        read_skips[rec] += 1
      else:
        yield (*rec, args.resize)

  workers = args.processes or min(16, os.cpu_count() or 1)
  if total is not None:
    workers = min(workers, max(1, total // 64))
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
  results = pool.imap(_load_job, jobs(), chunksize=16) if pool else map(_load_job, jobs())
  writer = shards.ShardWriter(args.output, shard_size=args.shard_size, prefix=args.prefix)
  try:
    from tqdm import tqdm  # noqa: PLC0415
    for given, caption, label, loaded in tqdm(results, total=total, unit="img", disable=not sys.stderr.isatty()):
      if isinstance(loaded, str):
        skipped[loaded] += 1
        continue
      data, ext, (w0, h0), (w, h), how = loaded
      counts[how] += 1
      meta = None if args.no_meta else {"path": given, "caption": caption, "original_width": w0,
                                        "original_height": h0, "width": w, "height": h}
      writer.write(None, data, ext, caption, label=label, meta=meta)
  except OSError as e:
    raise UserError(f"cannot write shards to {args.output} ({e.strerror or e})") from None
  finally:
    if pool:
      pool.terminate()
      pool.join()
  n_inputs = read_skips.pop("inputs", 0)
  if n_inputs == 0:
    raise UserError(f"no inputs in {args.input}")
  skipped.update(read_skips)
  stats = {"input": args.input, "inputs": n_inputs,
           "skipped": {r: skipped[r] for r in SKIP_REASONS if skipped[r]},
           "resize": args.resize, "resized": counts["resized"], "converted": counts["converted"], **extra}
  try:
    stats = writer.close(stats)
  except OSError as e:
    raise UserError(f"cannot write shards to {args.output} ({e.strerror or e})") from None
  if stats["samples"] == 0:
    raise UserError(f"none of the {n_inputs} inputs of {args.input} was usable (skipped: "
                    f"{_summary(stats['skipped'])}); see {os.path.join(args.output, 'stats.json')}")
  stats["pattern"] = shard_pattern(args.output, args.prefix, stats["shards"])
  return stats


def _summary(skipped: dict) -> str:
  return ", ".join(f"{r} {n}" for r, n in skipped.items()) or "none"


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  stats = make_shards(args)
  n_skip = sum(stats["skipped"].values())
  print(f"wrote {stats['samples']} samples in {stats['shards']} shard(s) to {args.output} "
        f"({stats['resized']} resized, {stats['converted']} converted to JPEG); skipped {n_skip} of "
        f"{stats['inputs']} inputs ({_summary(stats['skipped'])})")
  if "classes" in stats:
    print(f"{len(stats['classes'])} classes (label = index): {', '.join(stats['classes'][:10])}"
          + (", …" if len(stats["classes"]) > 10 else ""))
  print(f"inspect:  python -m vlm_jax.data.inspect '{stats['pattern']}'")
  print(f"pretrain: --config.data.shards='{stats['pattern']}'", flush=True)
  return stats


if __name__ == "__main__":
  main()
