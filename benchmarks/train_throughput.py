"""Training throughput of a pre-training config, optionally against open_clip on the same model: JSON lines.

  .venv/bin/python benchmarks/train_throughput.py [--config=configs/pretrain/clip.py:tiny] [--steps=60]
  .venv/bin/python benchmarks/train_throughput.py --config=configs/pretrain/clip.py:img=B/32,txt=B,res=224 \
      --batch=16 --compare-open-clip

Times the vlm_jax train step (`make_train_step`, jitted, data already on device) and, with the tiny/synthetic
configs, the whole loop step with the data pipeline. `--compare-open-clip` also times open_clip's PyTorch CPU
training step (`open_clip.CLIP` built from the same architecture by `interop.open_clip.open_clip_model_config`,
`ClipLoss`, AdamW, zero_grad/backward/step) on the same batch size, resolution and context length, alternating
windows of the two systems so load on a shared machine hits both alike. Both run in float32 without activation
checkpointing (`--dtype`, `--remat` override the config), one JAX device, all CPU threads for torch.

Lines: {"system": "vlm_jax"|"open_clip", "config", "batch", "images_per_sec", "model_gflops_per_sec", …} (medians
over windows of `--window` steps), then {"ratio": vlm_jax/open_clip, "peak_fraction": vlm_jax model FLOP/s / the
measured float32 matmul FLOP/s}. Model FLOPs are XLA's count of the forward ×3 (`vlm_jax.train.flops`), used for
both systems.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/pretrain/clip.py:tiny")
  ap.add_argument("--steps", type=int, default=60, help="timed steps per system")
  ap.add_argument("--window", type=int, default=10, help="steps per timing window")
  ap.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
  ap.add_argument("--compare-open-clip", action="store_true")
  ap.add_argument("--dtype", default="", help="model.dtype override (default with --compare-open-clip: float32)")
  ap.add_argument("--remat", default="", help="model.remat override (default with --compare-open-clip: none)")
  ap.add_argument("--scan", choices=("", "true", "false"), default="",
                  help="model.scan override: the layer stack as one scanned block (compile time on TPU) or "
                       "unrolled (XLA:CPU runs the unrolled stack faster: no per-layer slicing of the stacked "
                       "weights and residuals)")
  return ap.parse_args(argv)


def _load(path_arg: str):
  from vlm_jax import config_lib
  path, _, arg = path_arg.partition(":")
  return config_lib.load_file(f"{path}:{arg or 'tiny'}", root=ROOT)


def _vlm_jax_step(config, batch_size: int):
  """(run(n) -> seconds for n steps, model FLOPs per step, synthetic batch as numpy, step-with-data fn or None)."""
  import jax
  import numpy as np

  from vlm_jax import assembly
  from vlm_jax.data import pipeline
  from vlm_jax.parallel import mesh as mesh_lib, partitioning
  from vlm_jax.train import flops, loop, optim, state as state_lib, step as step_lib

  tokenizer, model, loss_fn = assembly.assemble(config)[:3]
  config.model.text.vocab_size, config.model.text.max_len = tokenizer.vocab_size, tokenizer.max_len  # for open_clip
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = partitioning.rules_from_config(None)
  res, length = int(config.data.image_size), int(tokenizer.max_len)
  rng = np.random.default_rng(0)
  text = rng.integers(1, tokenizer.vocab_size - 1, (batch_size, length), dtype=np.int32)
  text[:, -1] = tokenizer.vocab_size - 1  # EOT last: both systems pool there
  host = {"image": rng.standard_normal((batch_size, res, res, 3), dtype=np.float32), "text": text}
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create_train_state(model, tx, {k: v[:1] for k, v in host.items()}, mesh=mesh,
                                                    rules=rules, frozen=None, rng=jax.random.PRNGKey(0))
    fn = step_lib.make_train_step(model, loss_fn, tx, schedule, mesh=mesh, rules=rules)
    batch = loop.global_batch(host, mesh)
    model_flops = flops.xla_model_flops_per_step(model, loss_fn, batch)
    compiled = jax.jit(fn, out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0).lower(
        state, batch).compile()
  holder = {"state": state}

  def run(n, get_batch=lambda: batch):
    t = time.perf_counter()
    with jax.set_mesh(mesh):
      for _ in range(n):
        holder["state"], m = compiled(holder["state"], get_batch())
      jax.block_until_ready(m)
    return time.perf_counter() - t

  with_data = None
  if config.data.name == "synthetic" and not config.data.get("shards"):
    it = pipeline.make_train_iterator(config.data, global_batch_size=batch_size, seed=0, tokenizer=tokenizer,
                                      views=float(config.objectives.get("simclr", 0)) > 0)
    rows = lambda: {k: v for k, v in next(it).items() if k in host}  # noqa: E731
    if {k: v.shape for k, v in rows().items()} == {k: v.shape for k, v in host.items()}:
      with_data = lambda n: run(n, lambda: loop.global_batch(rows(), mesh))  # noqa: E731
  run(1)  # warm-up
  run.hlo_text = compiled.as_text  # for the op-level breakdown (benchmarks/cpu_step_profile.py)
  return run, model_flops, host, with_data


def _open_clip_step(config, host):
  """run(n) -> seconds for n open_clip training steps on `host` (the same arrays, NCHW); `run.step()` is one
  step."""
  import numpy as np
  import open_clip
  import torch
  from open_clip.loss import ClipLoss

  from vlm_jax.interop.open_clip import open_clip_model_config

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  model = open_clip.CLIP(**open_clip_model_config(config)).train()
  cfg_opt = config.optimizer
  opt = torch.optim.AdamW(model.parameters(), lr=cfg_opt.lr, betas=(cfg_opt.b1, cfg_opt.b2), eps=cfg_opt.eps,
                          weight_decay=cfg_opt.weight_decay)
  loss_fn = ClipLoss()
  images = torch.from_numpy(np.ascontiguousarray(host["image"].transpose(0, 3, 1, 2)))
  text = torch.from_numpy(host["text"].astype(np.int64))

  def step():
    opt.zero_grad(set_to_none=True)
    img_f, txt_f, scale = model(images, text)
    loss = loss_fn(img_f, txt_f, scale)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg_opt.clip_norm)
    opt.step()

  def run(n):
    t = time.perf_counter()
    for _ in range(n):
      step()
    return time.perf_counter() - t

  run.step = step

  run(1)  # warm-up
  return run


def main(argv=None) -> None:
  args = _parse(argv)
  sys.path.insert(0, ROOT)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  config = _load(args.config)
  if args.compare_open_clip:
    args.dtype, args.remat = args.dtype or "float32", args.remat or "none"
  if args.dtype:
    config.model.dtype = args.dtype
  if args.remat:
    config.model.remat = args.remat
  if args.scan:
    config.model.scan = args.scan == "true"
  batch_size = args.batch or int(config.batch_size)
  config.batch_size = batch_size

  from vlm_jax.train import flops
  systems = {}
  vlm_run, model_flops, host, with_data = _vlm_jax_step(config, batch_size)
  systems["vlm_jax"] = vlm_run
  if args.compare_open_clip:
    systems["open_clip"] = _open_clip_step(config, host)
  times = {name: [] for name in systems}
  for _ in range(max(1, args.steps // args.window)):  # alternate windows: shared load hits both
    for name, run in systems.items():
      times[name].append(run(args.window) / args.window)
  if with_data is not None:
    times["vlm_jax_with_data"] = [with_data(args.window) / args.window
                                  for _ in range(max(1, args.steps // args.window))]
  peak = flops.measured_matmul_flops(n=2048)
  rate = {}
  for name, ts in times.items():
    med = statistics.median(ts)
    rate[name] = batch_size / med
    print(json.dumps({"system": name, "config": args.config, "batch": batch_size,
                      "images_per_sec": round(rate[name], 2), "median_step_s": round(med, 4),
                      "spread_s": [round(min(ts), 4), round(max(ts), 4)],
                      "model_gflops_per_sec": round(model_flops / med / 1e9, 2),
                      "model_gflops_per_step": round(model_flops / 1e9, 3), "dtype": str(config.model.dtype),
                      "remat": config.model.remat, "scan": bool(config.model.get("scan")),
                      "cpu_count": os.cpu_count()}), flush=True)
  summary = {"peak_fraction": round(model_flops * rate["vlm_jax"] / batch_size / peak, 3),
             "matmul_peak_gflops": round(peak / 1e9, 1)}
  if "open_clip" in rate:
    summary = {"ratio": round(rate["vlm_jax"] / rate["open_clip"], 3), **summary}
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
