"""Compile time and per-device scratch memory of the full train step, per (variant, scan, remat policy).

  .venv/bin/python benchmarks/compile_memory.py [--variants B/16,L/14] [--scan true] [--remat none,full,dots_saveable]
      [--devices 8] [--mesh fsdp=8] [--batch 8]

Each variant is the two-tower CLIP config `configs/pretrain/clip.py:img=<V>,txt=<T>,res=224` (B/16 with the B
text tower, L/14 with L) with `model.scan` and `model.remat` overridden. The train step
(`vlm_jax.train.step.make_train_step`) is lowered and compiled against an abstract state (`jax.eval_shape` over
`create_train_state`, so no parameter is materialised) and an abstract global batch on a mesh of --devices
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
import time

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
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg_clip", os.path.join(ROOT, "configs/pretrain/clip.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def compile_case(config, mesh, rules, batch_size: int):
  """(compile seconds, temp bytes) of the jitted train step for `config` on `mesh`, nothing materialised."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from vlm_jax import objectives
  from vlm_jax.models import build_model
  from vlm_jax.parallel import mesh as mesh_lib
  from vlm_jax.train.optim import make_optimizer
  from vlm_jax.train.state import create_train_state
  from vlm_jax.train.step import make_train_step

  model = build_model(config.model)
  loss_fn = objectives.make_loss_fn(config.objectives.to_dict(), config.objective_hparams.to_dict(),
                                    mesh_axes=mesh_lib.BATCH_AXES)
  tx, schedule = make_optimizer(config.optimizer, int(config.total_steps))
  res, length = int(config.model.image.image_size), int(config.model.text.max_len)
  example = {"image": np.zeros((1, res, res, 3), np.float32), "text": np.ones((1, length), np.int32)}
  shardings = []

  def create(rng):
    state, sh = create_train_state(model, tx, example, mesh=mesh, rules=rules, frozen=None, rng=rng)
    shardings.append(sh)
    return state

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(create, jax.random.PRNGKey(0))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings[0])
    batch = {"image": jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32,
                                           sharding=mesh_lib.batch_sharding(mesh, 4)),
             "text": jax.ShapeDtypeStruct((batch_size, length), jnp.int32,
                                          sharding=mesh_lib.batch_sharding(mesh, 2))}
    step = make_train_step(model, loss_fn, tx, schedule, mesh=mesh, rules=rules)
    compiled = jax.jit(step, out_shardings=(shardings[0], mesh_lib.replicated(mesh)),
                       donate_argnums=0).lower(state, batch).compile()
  return time.perf_counter() - start, compiled.memory_analysis().temp_size_in_bytes


def main(argv=None) -> None:
  args = _parse(argv)
  # The simulated devices must be requested before JAX is imported.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  from vlm_jax.parallel import partitioning
  from vlm_jax.parallel.mesh import make_mesh

  sizes = {k: int(v) for k, v in (p.split("=") for p in args.mesh.split(",") if p)}
  mesh = make_mesh(sizes)
  for variant in args.variants.split(","):
    for scan in (s.strip().lower() in ("1", "true", "yes") for s in args.scan.split(",")):
      for remat in args.remat.split(","):
        config = _load_clip_config(f"img={variant},txt={TEXT_OF.get(variant, 'B')},res=224")
        config.model.scan, config.model.remat = scan, remat
        if args.dtype:
          config.model.dtype = args.dtype
        compile_s, temp = compile_case(config, mesh, partitioning.rules_from_config(None), args.batch)
        print(json.dumps({"variant": variant, "scan": scan, "remat": remat, "compile_s": round(compile_s, 2),
                          "temp_mib": round(temp / 2**20, 2), "mesh": sizes, "batch": args.batch,
                          "dtype": str(config.model.dtype)}), flush=True)


if __name__ == "__main__":
  main()
