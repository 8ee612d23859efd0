"""Rendering speed of the procedural datasets on one core (images per second), one JSON line per case.

  .venv/bin/python benchmarks/synthetic_render.py [--sizes 32,64] [--n 300]

Cases: the pre-training source (`SyntheticShapes('train')`, masks included), every distribution-shift task
(`synthetic_shift.get_task`, rasters and textures warmed first) and the open-vocabulary scenes
(`synthetic_scenes.scene_arrays`, both annotation views' source):

  {"dataset": "shift/outline", "image_size": 32, "images_per_s": …}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlm_jax.data import synthetic, synthetic_scenes, synthetic_shift  # noqa: E402


def _rate(fn, n: int) -> float:
  fn(min(n, 64))  # warm caches (textures, every shape's raster)
  t = time.perf_counter()
  fn(n)
  return n / (time.perf_counter() - t)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="32,64")
  ap.add_argument("--n", type=int, default=300)
  args = ap.parse_args(argv)
  for size in (int(s) for s in args.sizes.split(",")):
    src = synthetic.SyntheticShapes("train", image_size=size)
    cases = {"pretrain/train": lambda n, src=src: [src[i] for i in range(n)]}
    for name in synthetic_shift.TASKS:
      cases[f"shift/{name}"] = lambda n, name=name, size=size: [
          synthetic_shift.render_one(name, "train", i, image_size=size) for i in range(n)]
    cases["scenes/train"] = lambda n, size=size: synthetic_scenes.scene_arrays("train", n, image_size=size)
    for dataset, fn in cases.items():
      print(json.dumps({"dataset": dataset, "image_size": size, "images_per_s": round(_rate(fn, args.n), 1)}),
            flush=True)


if __name__ == "__main__":
  main()
