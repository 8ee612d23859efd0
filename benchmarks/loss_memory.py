"""Per-device scratch memory of the contrastive losses, dense against ring, as the global batch grows.

  .venv/bin/python benchmarks/loss_memory.py [--devices 8] [--dim 512] [--batches 2048,4096,8192,16384,32768]
      [--objectives softmax,sigmoid] [--impls dense,ring] [--tile 256] [--dense-max-batch B]

For each (objective, impl, B) the forward+backward of the loss, `jax.value_and_grad` w.r.t. z^I, z^T, t (and b
for the sigmoid), is lowered and compiled (never run) for a batch-sharded [B, D] fp32 pair on a
('data',) mesh of --devices simulated CPU devices, and `compiled.memory_analysis().temp_size_in_bytes` — the
per-device scratch XLA allocates besides arguments and outputs — is printed as one JSON line:

  {"objective": "softmax"|"sigmoid", "impl": "dense"|"ring", "batch": B, "devices": 8, "dim": 512,
   "temp_mib": …, "compile_s": …}

"softmax" is `clip` (InfoNCE), "sigmoid" is `siglip`; "dense" the B/n × B logits of
`vlm_jax.objectives.contrastive`, "ring" its ring twin in the same module (machinery in `objectives/ring.py`)
with --tile rows per tile. Dense batches above --dense-max-batch are skipped (printed with "skipped": true) when
compiling them is too slow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--batches", default="2048,4096,8192,16384,32768")
  parser.add_argument("--objectives", default="softmax,sigmoid")
  parser.add_argument("--impls", default="dense,ring")
  parser.add_argument("--tile", type=int, default=256)
  parser.add_argument("--dense-max-batch", type=int, default=None)
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = _parse(argv)
  # The simulated devices must be requested before JAX is imported.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp

  from vlm_jax.objectives import get_objective
  from vlm_jax.parallel.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated

  mesh = make_mesh({"data": args.devices})
  names = {"softmax": "clip", "sigmoid": "siglip"}

  def loss(name, impl):
    hparams = {"impl": impl, "tile": args.tile} if impl == "ring" else {}

    def f(zimg, ztxt, scale, bias):
      out = {"zimg": zimg, "ztxt": ztxt, "logit_scale": scale, "logit_bias": bias}
      return get_objective(name)(out, {}, mesh_axes=BATCH_AXES, **hparams)[0]
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3))

  for objective in args.objectives.split(","):
    for impl in args.impls.split(","):
      for batch in (int(b) for b in args.batches.split(",")):
        line = {"objective": objective, "impl": impl, "batch": batch, "devices": args.devices, "dim": args.dim}
        if impl == "dense" and args.dense_max_batch and batch > args.dense_max_batch:
          print(json.dumps({**line, "skipped": True}), flush=True)
          continue
        emb = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32, sharding=batch_sharding(mesh, 2))
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated(mesh))
        start = time.perf_counter()
        with jax.set_mesh(mesh):
          compiled = jax.jit(loss(names[objective], impl)).lower(emb, emb, scalar, scalar).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        line.update(temp_mib=round(temp / 2**20, 2), compile_s=round(time.perf_counter() - start, 2))
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
