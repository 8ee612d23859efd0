"""Training throughput of a pre-training config on this machine: one JSON line per measurement.

  .venv/bin/python benchmarks/train_throughput.py [--config=configs/pretrain/clip.py:tiny] [--steps=60]

Times `train_step` alone (data already on device) and the full loop step (data pipeline included), after
compilation, and reports medians over windows of steps, so a noisy machine shows up as spread, not as a
shifted mean. Also reports the model FLOPs per step from XLA's cost analysis.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import jax


def _load(path_arg: str):
  path, _, arg = path_arg.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg or "tiny")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/pretrain/clip.py:tiny")
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--window", type=int, default=10)
  args = ap.parse_args()

  from vlm_jax import runner
  from vlm_jax.data import pipeline
  from vlm_jax.parallel import mesh as mesh_lib, partitioning
  from vlm_jax.train import loop, optim, state as state_lib, step as step_lib

  config = _load(args.config)
  tokenizer, model, loss_fn = runner.build(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = partitioning.rules_from_config(None)
  it = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=0, tokenizer=tokenizer,
                                    views=float(config.objectives.get("simclr", 0)) > 0)
  first = next(it)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create_train_state(model, tx, {k: v[:1] for k, v in first.items()}, mesh=mesh,
                                                    rules=rules, frozen=None, rng=jax.random.PRNGKey(0))
    fn = step_lib.make_train_step(model, loss_fn, tx, schedule, mesh=mesh, rules=rules)
    batch = loop.global_batch(first, mesh)
    t0 = time.perf_counter()
    compiled = jax.jit(fn, out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0).lower(
        state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0

    def timed(get_batch):
      nonlocal state
      times = []
      for _ in range(args.steps // args.window):
        t = time.perf_counter()
        for _ in range(args.window):
          state, m = compiled(state, get_batch())
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / args.window)
      return times

    step_only = timed(lambda: batch)
    with_data = timed(lambda: loop.global_batch(next(it), mesh))
  for name, times in (("train_step", step_only), ("loop_with_data", with_data)):
    med = statistics.median(times)
    print(json.dumps({"config": args.config, "measure": name, "devices": jax.device_count(),
                      "batch": config.batch_size, "median_step_s": round(med, 4),
                      "steps_per_sec": round(1 / med, 3), "images_per_sec": round(config.batch_size / med, 1),
                      "spread_s": [round(min(times), 4), round(max(times), 4)], "compile_s": round(compile_s, 2),
                      "xla_flops_per_step": flops, "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
  main()
