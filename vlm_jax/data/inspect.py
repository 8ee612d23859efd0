"""Reads tar shards the way training does and reports what is in them.

  python -m vlm_jax.data.inspect 'shards/data-{00000..00009}.tar' [--samples 16] [--grid grid.png] [--limit N]

Every sample of the shards named by PATTERN (any spec `shards.expand_shards` takes; weights are ignored) is read
with `shards.read_shard` and its image decoded with `transforms.decode_image`, so the counts are exactly what the
training pipeline would keep and skip. Printed: shards and samples read, skipped samples per reason
(`shards.SKIP_REASONS`; `corrupt_image` comes from the decoder), caption length in words and characters
(min / mean / median / p95 / max), image shorter-side sizes, and label counts when the shards carry `.cls` labels.
A PNG grid of the first `--samples` valid images with their captions is saved to `--grid`, by default
`inspect_grid.png` next to the (first) shard, or in the current folder when that is not a writable local
folder. `--limit N` stops after N samples (valid or skipped). The last line printed is one JSON object:
{"samples": valid samples, "skipped": {reason: n}, "shards": shards read, "captions": …, "labels": …,
"grid": path or null}. A pattern that matches no shard is a one-line `error:` with exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys
import textwrap

import fsspec
import numpy as np
from PIL import Image

from vlm_jax.data import shards, transforms
from vlm_jax.errors import UserError, exit_on_user_error

THUMB = 128


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line `error: …`, exit 2, via exit_on_user_error
    raise UserError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m vlm_jax.data.inspect", description=__doc__.split("\n\n")[0])
  p.add_argument("pattern", help="shards: PATTERN[,PATTERN…] with globs, {00000..00009} ranges, fsspec URLs")
  p.add_argument("--samples", type=int, default=16, metavar="N", help="images in the PNG grid (default 16; 0: no grid)")
  p.add_argument("--grid", default=None, metavar="PNG", help="PNG path (default: inspect_grid.png next to the shards)")
  p.add_argument("--limit", type=int, default=None, metavar="N", help="stop after this many samples, valid or skipped")
  return p


def _length_stats(values: list[int]) -> dict:
  if not values:
    return {"min": 0, "mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0}
  v = np.asarray(values, np.float64)
  return {"min": int(v.min()), "mean": round(float(v.mean()), 2), "median": float(np.median(v)),
          "p95": round(float(np.percentile(v, 95)), 2), "max": int(v.max())}


def scan(paths: list[str], *, keep: int = 16, limit: int | None = None) -> dict:
  """Counts over the shards `paths`; 'examples' holds up to `keep` (RGB thumbnail, caption, label)."""
  skipped = collections.Counter()
  labels = collections.Counter()
  words, chars, sides, examples = [], [], [], []
  n_read, n_shards = 0, 0
  for path in paths:
    if limit is not None and n_read >= limit:
      break
    n_shards += 1
    for item, _ in shards.read_shard(path):
      if isinstance(item, shards.Skip):
        skipped[item.reason] += 1
        if item.reason in ("truncated_shard", "unreadable_shard"):
          continue  # the rest of the shard, not a sample
      else:
        try:
          img = transforms.decode_image(item.image)
        except Image.DecompressionBombError:  # the pipeline's rule: refused from its header, counted apart
          skipped["decompression_bomb"] += 1
        except Exception:  # noqa: BLE001 — the pipeline's rule: any other decoder failure is a corrupt image
          skipped["corrupt_image"] += 1
        else:
          words.append(len(item.caption.split()))
          chars.append(len(item.caption))
          sides.append(min(img.size))
          if item.label >= 0:
            labels[item.label] += 1
          if len(examples) < keep:
            img.thumbnail((THUMB, THUMB))
            examples.append((np.asarray(img), item.caption, item.label))
      n_read += 1
      if limit is not None and n_read >= limit:
        break
  return {"samples": len(words), "skipped": {r: skipped[r] for r in shards.SKIP_REASONS if skipped[r]},
          "shards": n_shards, "captions": {"words": _length_stats(words), "chars": _length_stats(chars)},
          "image_shorter_side": _length_stats(sides),
          "labels": {"labeled": sum(labels.values()), "distinct": len(labels),
                     "top": [[int(k), n] for k, n in labels.most_common(10)]},
          "examples": examples}


def save_grid(examples: list, path: str) -> None:
  """A PNG grid of (image, caption, label) examples, captions wrapped under each image (matplotlib Agg)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  cols = int(np.ceil(np.sqrt(len(examples))))
  rows = int(np.ceil(len(examples) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.0 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (img, caption, label) in zip(axes.flat, examples):
    ax.imshow(img)
    text = caption if label < 0 else f"[{label}] {caption}"
    lines = textwrap.wrap(text, 30)
    ax.set_title("\n".join(lines[:3]) + (" …" if len(lines) > 3 else ""), fontsize=7)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  with fsspec.open(path, "wb") as f:
    f.write(buf.getvalue())


def _default_grid(first_shard: str) -> str:
  folder = os.path.dirname(first_shard.removeprefix("file://"))
  if "://" not in first_shard and os.access(folder or ".", os.W_OK):
    return os.path.join(folder, "inspect_grid.png")
  return "inspect_grid.png"


def _fmt(stats: dict) -> str:
  return f"min {stats['min']}, mean {stats['mean']}, median {stats['median']}, p95 {stats['p95']}, max {stats['max']}"


def inspect(args) -> dict:
  """Scans the shards, prints the report, saves the grid; returns the summary (the last printed line)."""
  if args.samples < 0 or (args.limit is not None and args.limit < 1):
    raise UserError("--samples must be >= 0 and --limit >= 1")
  paths = [p for ps, _ in shards.expand_shards(args.pattern) for p in ps]
  result = scan(paths, keep=args.samples, limit=args.limit)
  examples = result.pop("examples")
  print(f"shards: {result['shards']} read of {len(paths)} matched")
  print(f"samples: {result['samples']} valid, {sum(result['skipped'].values())} skipped")
  for reason, n in result["skipped"].items():
    print(f"  skipped {reason}: {n}")
  print(f"caption words: {_fmt(result['captions']['words'])}")
  print(f"caption chars: {_fmt(result['captions']['chars'])}")
  print(f"image shorter side (px): {_fmt(result['image_shorter_side'])}")
  lab = result["labels"]
  if lab["labeled"]:
    top = ", ".join(f"{k}: {n}" for k, n in lab["top"])
    print(f"labels: {lab['labeled']} labeled samples, {lab['distinct']} distinct; most frequent {top}")
  result["grid"] = None
  if examples:
    path = args.grid or _default_grid(paths[0])
    try:
      save_grid(examples, path)
    except OSError as e:
      raise UserError(f"cannot write the grid {path} ({e.strerror or e})") from None
    result["grid"] = path
    print(f"grid of {len(examples)} samples: {path}")
  print(json.dumps(result), flush=True)
  return result


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
  return inspect(_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  main()
