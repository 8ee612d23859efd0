"""The training loop's steps/s against the bare jitted step in a tight loop: what the loop costs on top of the step.

  .venv/bin/python benchmarks/loop_overhead.py [--config=configs/pretrain/clip.py:micro] [--steps=300]

Three systems on the same devices, in one process, alternating round by round so load on a shared machine hits
all alike:
  bare           the config's jitted train step (benchmarks/train_throughput.py) called back to back over K
                 batches already on the devices: no data, no logging, no checkpoints
  loop           `vlm_jax.train.loop.train` over the same K batches (an in-memory grain iterator): host → mesh
                 placement, metrics leaving the device only at log steps, the final checkpoint — the loop's cost
  loop_pipeline  `vlm_jax.runner.pretrain`: the loop with the real data pipeline (decode, augment, tokenize)
The loop's rates come from its metrics.jsonl (`images_per_sec` of every logged window after the first, which
holds the compilation). Lines: one per system and round, then {"ratio": loop / bare, "ratio_pipeline":
loop_pipeline / bare, …} (medians); the target for "ratio" is >= 0.95.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]


def _loop_rate(workdir: str, batch: int) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(ln) for ln in f if "images_per_sec" in ln]
  return statistics.median(row["images_per_sec"] for row in rows[1:]) / batch


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/pretrain/clip.py:micro")
  ap.add_argument("--steps", type=int, default=300, help="steps per run")
  ap.add_argument("--log-every", type=int, default=50)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--batches", type=int, default=8, help="K distinct batches cycled by bare and loop")
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import grain  # noqa: PLC0415
  import jax  # noqa: PLC0415

  import train_throughput  # noqa: PLC0415
  from vlm_jax import assembly, runner  # noqa: PLC0415
  from vlm_jax.data import pipeline  # noqa: PLC0415
  from vlm_jax.parallel import mesh as mesh_lib  # noqa: PLC0415
  from vlm_jax.train import loop  # noqa: PLC0415
  config = train_throughput._load(args.config)  # noqa: SLF001
  config.total_steps, config.log_every_steps = args.steps, args.log_every
  config.checkpoint_every_steps, config.evals = args.steps, {}
  batch = int(config.batch_size)
  tokenizer, model, loss_fn = assembly.assemble(config)[:3]
  it = pipeline.make_train_iterator(config.data, global_batch_size=batch, seed=0, tokenizer=tokenizer)
  batches = [dict(next(it)) for _ in range(args.batches)]
  it.close()

  bare_run = train_throughput._vlm_jax_step(train_throughput._load(args.config), batch)[0]  # noqa: SLF001
  mesh = mesh_lib.make_mesh(config.mesh)
  keys = ("image", "text")  # what the benchmark step takes
  placed = itertools.cycle([loop.global_batch({k: b[k] for k in keys}, mesh) for b in batches])
  jax.block_until_ready(next(placed))

  def in_memory(process_index, process_count):
    del process_index, process_count
    return iter(grain.MapDataset.source(batches).repeat().to_iter_dataset())

  rates = {"bare": [], "loop": [], "loop_pipeline": []}
  for r in range(args.rounds):
    rates["bare"].append(args.steps / bare_run(args.steps, lambda: next(placed)))
    with tempfile.TemporaryDirectory() as wd:
      loop.train(config, wd, make_data=in_memory, model=model, loss_fn=loss_fn, quiet=True)
      rates["loop"].append(_loop_rate(wd, batch))
    with tempfile.TemporaryDirectory() as wd:
      runner.pretrain(config, wd, quiet=True)
      rates["loop_pipeline"].append(_loop_rate(wd, batch))
    for name in rates:
      print(json.dumps({"system": name, "round": r, "steps_per_sec": round(rates[name][-1], 2), "batch": batch,
                        "config": args.config, "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
  med = {k: statistics.median(v) for k, v in rates.items()}
  print(json.dumps({"ratio": round(med["loop"] / med["bare"], 3),
                    "ratio_pipeline": round(med["loop_pipeline"] / med["bare"], 3),
                    **{f"{k}_steps_per_sec": round(v, 2) for k, v in med.items()}, "target": 0.95,
                    "config": args.config, "devices": jax.device_count(), "cpu_count": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
