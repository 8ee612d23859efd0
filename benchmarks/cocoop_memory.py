"""CoCoOp vs CoOp: peak temporary memory (XLA's compiled.memory_analysis()) and step time of one training step
(value and gradient w.r.t. the learned parameters) on a randomly initialised tiny CLIP, per class_chunk.

  .venv/bin/python benchmarks/cocoop_memory.py [--classes=64] [--batch=32]

Prints one JSON line per configuration: method, class_chunk, batch, classes, temp_mib, step_ms.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from vlm_jax import assembly  # noqa: E402
from vlm_jax.parallel import partitioning  # noqa: E402
from vlm_jax.transfer.methods import build_method  # noqa: E402
from tests.train_helpers import load_config  # noqa: E402


def main():
  args = dict(a[2:].split("=") for a in sys.argv[1:])
  classes, batch = int(args.get("classes", 64)), int(args.get("batch", 32))
  c = load_config("configs/pretrain/clip.py", "tiny")
  c.model.image.train_batch_stats = False
  tok, base = assembly.build(c)
  from vlm_jax.data import synthetic_shift  # noqa: PLC0415
  names = (synthetic_shift.class_names("base") * 4)[:classes]
  images = jnp.zeros((batch, 32, 32, 3))
  labels = jnp.zeros((batch,), jnp.int32)
  for name, chunk in [("coop", 0), ("cocoop", 0), ("cocoop", 16), ("cocoop", 4)]:
    m = build_method(name, ml_collections.ConfigDict({"init": "a photo of a", "class_chunk": chunk}),
                     base_model=base, base_config=c, tokenizer=tok, class_names=names, templates=("a {}",))
    v = partitioning.unbox(m.module.init(jax.random.PRNGKey(0), {"image": images[:1], "label": labels[:1]}))
    learned = {k: x for k, x in v["params"].items() if k != "base"}
    rest = {**v, "params": {"base": v["params"]["base"]}}

    def loss(p, rest, x, y):
      out = m.module.apply({**rest, "params": {**rest["params"], **p}}, {"image": x, "label": y}, train=False)
      return m.loss_fn(out, {"label": y})[0]

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(learned, rest, images, labels).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(step(learned, rest, images, labels))
    t0 = time.perf_counter()
    for _ in range(5):
      jax.block_until_ready(step(learned, rest, images, labels))
    print(json.dumps({"method": name, "class_chunk": chunk, "batch": batch, "classes": classes,
                      "temp_mib": round(temp / 2**20, 2), "step_ms": round((time.perf_counter() - t0) / 5 * 1e3, 1),
                      "load_average": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
  main()
