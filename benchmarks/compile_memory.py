"""Compile time and per-device scratch memory of the full train step, per (variant, scan, remat policy).

  .venv/bin/python benchmarks/compile_memory.py [--variants B/16,L/14] [--scan true] [--remat none,full,dots_saveable]
      [--devices 8] [--mesh fsdp=8] [--batch 8]

Each variant is the two-tower CLIP config `configs/pretrain/clip.py:img=<V>,txt=<T>,res=224` (B/16 with the B
text tower, L/14 with L) with `model.scan` and `model.remat` overridden. The train step
(`vlm_jax.train.aot.compile_train_step`) is lowered and compiled against an abstract state (`jax.eval_shape`
over `create_train_state`, so no parameter is materialised) and an abstract global batch on a mesh of --devices
simulated CPU devices; one JSON line per case:

  {"variant": "B/16", "scan": true, "remat": "full", "compile_s": …, "temp_mib": …}

`temp_mib` is `compiled.memory_analysis().temp_size_in_bytes` (per device). Scan over layers (`nn.scan`) keeps
compile time flat in depth; remat (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") trades
recomputation for activation memory. Unrolled (`--scan false`) compiles are slow (B/16: ~45 s each on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_OF = {"B/16": "B", "B/32": "B", "L/14": "L", "So400m/14": "So400m"}


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="B/16,L/14")
  parser.add_argument("--scan", default="true", help="comma list of true/false")
  parser.add_argument("--remat", default="none,full,dots_saveable")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--mesh", default="fsdp=8", help="comma list axis=size over data/fsdp/model")
  parser.add_argument("--batch", type=int, default=8, help="global batch")
  parser.add_argument("--dtype", default=None, help="override model.dtype (config: bfloat16)")
  return parser.parse_args(argv)


def _load_clip_config(arg: str):
  from vlm_jax import config_lib
  return config_lib.load_file(f"configs/pretrain/clip.py:{arg}", root=ROOT)


def main(argv=None) -> None:
  args = _parse(argv)
  # The simulated devices must be requested before JAX is imported.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  from vlm_jax.parallel import partitioning
  from vlm_jax.parallel.mesh import make_mesh
  from vlm_jax.train import aot

  sizes = {k: int(v) for k, v in (p.split("=") for p in args.mesh.split(",") if p)}
  mesh = make_mesh(sizes)
  for variant in args.variants.split(","):
    for scan in (s.strip().lower() in ("1", "true", "yes") for s in args.scan.split(",")):
      for remat in args.remat.split(","):
        config = _load_clip_config(f"img={variant},txt={TEXT_OF.get(variant, 'B')},res=224")
        config.model.scan, config.model.remat = scan, remat
        if args.dtype:
          config.model.dtype = args.dtype
        out = aot.compile_train_step(config, mesh, partitioning.rules_from_config(None), args.batch)
        compile_s, temp = out.compile_s, out.compiled.memory_analysis().temp_size_in_bytes
        print(json.dumps({"variant": variant, "scan": scan, "remat": remat, "compile_s": round(compile_s, 2),
                          "temp_mib": round(temp / 2**20, 2), "mesh": sizes, "batch": args.batch,
                          "dtype": str(config.model.dtype)}), flush=True)


if __name__ == "__main__":
  main()
