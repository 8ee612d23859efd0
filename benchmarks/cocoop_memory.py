"""CoCoOp vs CoOp: peak temporary memory of one training step (value and gradient w.r.t. the learned parameters,
the base frozen) from XLA's `compiled.memory_analysis()`, per `method.class_chunk`, and (tiny only) its step time.

  .venv/bin/python benchmarks/cocoop_memory.py                                  tiny CLIP, 64 classes, batch 32, timed
  .venv/bin/python benchmarks/cocoop_memory.py --model=B/16 --classes=1000 --batch=1,32 --chunks=0,100,10 --no-time

`--model=tiny` is the randomly initialised `configs/pretrain/clip.py:tiny`; `--model=B/16` is CLIP ViT-B/16 at 224 px
with the B text tower (77 tokens), built abstractly (`jax.eval_shape`: no weights are materialised) and only
compiled, so ImageNet-scale memory is measured on a laptop CPU. CoOp runs the text tower on C prompts per step,
CoCoOp (unchunked, as the reference code) on B·C; `class_chunk` K bounds it to B·K live prompts under a
rematerialised scan over ⌈C/K⌉ chunks (vlm_jax/transfer/methods/cocoop.py).

Prints one JSON line per configuration: model, method, class_chunk, batch, classes, temp_mib, vs_coop (temp memory
/ CoOp's at the same batch), compile_s, step_ms (tiny), load_average.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="tiny", choices=("tiny", "B/16"))
  p.add_argument("--classes", type=int, default=64)
  p.add_argument("--batch", default="32", help="comma list of per-step image batches")
  p.add_argument("--chunks", default="0,16,4", help="comma list of CoCoOp class_chunk values (0 = all classes)")
  p.add_argument("--no-time", dest="time", action="store_false", help="compile only (default for B/16)")
  return p.parse_args(argv)


def _config(model: str):
  from vlm_jax import config_lib  # noqa: PLC0415
  c = config_lib.load_file("configs/pretrain/clip.py:" + ("tiny" if model == "tiny" else "img=B/16,txt=B,res=224"),
                           root=ROOT)
  if c.model.image.get("kind") == "resnet":
    c.model.image.train_batch_stats = False
  return c


def main(argv=None):
  args = _parse(argv)
  sys.path.insert(0, ROOT)
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415

  from vlm_jax import assembly  # noqa: PLC0415
  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  from vlm_jax.transfer.methods import build_method  # noqa: PLC0415

  c = _config(args.model)
  tok, base = assembly.build(c)
  size = int(c.model.image.get("image_size", 224)) if args.model == "tiny" else 224
  names = [f"class {i}" for i in range(args.classes)]
  timed = args.time and args.model == "tiny"
  runs = [("coop", 0)] + [("cocoop", int(k)) for k in args.chunks.split(",")]
  for batch in (int(b) for b in args.batch.split(",")):
    images = jnp.zeros((batch, size, size, 3))
    labels = jnp.zeros((batch,), jnp.int32)
    coop_temp = None
    for name, chunk in runs:
      m = build_method(name, ml_collections.ConfigDict({"init": "a photo of a", "class_chunk": chunk}),
                       base_model=base, base_config=c, tokenizer=tok, class_names=names, templates=("a {}",))
      init = lambda: partitioning.unbox(m.module.init(jax.random.PRNGKey(0),  # noqa: E731
                                                      {"image": images[:1], "label": labels[:1]}))
      v = init() if timed else jax.eval_shape(init)
      learned = {k: x for k, x in v["params"].items() if k != "base"}
      rest = {**v, "params": {"base": v["params"]["base"]}}

      def loss(p, rest, x, y):
        out = m.module.apply({**rest, "params": {**rest["params"], **p}}, {"image": x, "label": y}, train=False)
        return m.loss_fn(out, {"label": y})[0]

      step = jax.jit(jax.value_and_grad(loss))
      t0 = time.perf_counter()
      compiled = step.lower(learned, rest, images, labels).compile()
      compile_s = time.perf_counter() - t0
      temp = compiled.memory_analysis().temp_size_in_bytes
      coop_temp = temp if name == "coop" else coop_temp
      row = {"model": args.model, "method": name, "class_chunk": chunk, "batch": batch, "classes": args.classes,
             "temp_mib": round(temp / 2**20, 1), "vs_coop": round(temp / coop_temp, 2),
             "compile_s": round(compile_s, 1)}
      if timed:
        jax.block_until_ready(compiled(learned, rest, images, labels))
        times = []
        for _ in range(5):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(learned, rest, images, labels))
          times.append(time.perf_counter() - t0)
        row["step_ms"] = round(sorted(times)[2] * 1e3, 1)
      row["load_average"] = round(os.getloadavg()[0], 2)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
