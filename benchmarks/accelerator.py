"""One benchmark for whatever devices JAX sees (GPU, TPU or CPU): step throughput and MFU, loss memory, data feed.

  .venv/bin/python benchmarks/accelerator.py            # B/32, B/16 (and L/14) CLIP steps, bf16
  .venv/bin/python benchmarks/accelerator.py --quick    # tiny sizes: finishes on a 2-core CPU in < 2 minutes

1. The CLIP train step (`configs/pretrain/clip.py:img=…,txt=…,res=224`, bf16 compute, float32 params, the
   config's remat, data already on the devices) at increasing global batch until the device runs out of memory:
   images/s, TFLOP/s per device and MFU (XLA's model FLOPs of the step over the device's peak:
   `vlm_jax.train.flops.peak_flops_per_device`; on CPU the measured float32 matmul rate).
2. The contrastive loss alone, dense vs ring (`objective_hparams.clip.impl`), value and gradient over
   [B, 512] embeddings sharded over the devices: the largest global batch each fits (doubling until out of
   memory, or `--loss-max-batch`).
3. The data pipeline on generated JPEG shards at 224 px (benchmarks/data_throughput.py): images/s per CPU core,
   and the cores needed to feed the best step rate of (1).

One JSON line per measurement ({"part": "step"|"loss"|"data", …}), then a summary line ({"summary": true, …}):
the best MFU per model, the ring/dense batch ratio and the cores needed. The device is named in every line.
Timings are medians over `--windows` windows of `--window` steps, after one warm-up window.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

FULL_MODELS = "B/32:img=B/32,txt=B,res=224;B/16:img=B/16,txt=B,res=224;L/14:img=L/14,txt=L,res=224"
QUICK_MODELS = "micro:micro"


def _parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny sizes (CI, CPU): models micro, small batches")
  ap.add_argument("--models", default="", help=f"NAME:CONFIG_ARG;… (default {FULL_MODELS})")
  ap.add_argument("--batches", default="", help="per-device batches to try, ascending (default 32,64,…,1024)")
  ap.add_argument("--window", type=int, default=0, help="steps per timing window (default 10; quick 2)")
  ap.add_argument("--windows", type=int, default=0, help="timed windows (default 3; quick 2)")
  ap.add_argument("--loss-max-batch", type=int, default=0, help="largest global loss batch tried (default 2^21)")
  ap.add_argument("--data-images", type=int, default=0, help="JPEG images for the pipeline part (default 2048)")
  ap.add_argument("--data-workers", type=int, default=-1, help="grain workers (default: CPU cores, at most 8)")
  ap.add_argument("--skip", default="", help="parts to skip: step,loss,data")
  args = ap.parse_args(argv)
  q = args.quick
  args.models = args.models or (QUICK_MODELS if q else FULL_MODELS)
  args.batches = [int(b) for b in (args.batches or ("8" if q else "32,64,128,256,512,1024")).split(",")]
  args.window = args.window or (2 if q else 10)
  args.windows = args.windows or (2 if q else 3)
  args.loss_max_batch = args.loss_max_batch or (2048 if q else 1 << 21)
  args.data_images = args.data_images or (64 if q else 2048)
  if args.data_workers < 0:
    args.data_workers = 0 if q else min(8, os.cpu_count() or 1)
  args.skip = set(filter(None, args.skip.split(",")))
  return args


def _out_of_memory(e: BaseException) -> bool:
  text = str(e).lower()
  return "resource_exhausted" in text or "out of memory" in text or "oom" in text.split()


def _device() -> dict:
  import jax  # noqa: PLC0415
  d = jax.devices()[0]
  return {"device": str(getattr(d, "device_kind", d.platform)), "platform": d.platform,
          "devices": jax.device_count()}


def _load(arg: str):
  import train_throughput  # noqa: PLC0415 (benchmarks/ is on sys.path)
  return train_throughput._load(f"configs/pretrain/clip.py:{arg}")  # noqa: SLF001


def step_part(args, dev: dict) -> dict[str, float]:
  """Images/s, TFLOP/s per device and MFU of each model at increasing batch; returns the best rate per model."""
  import jax  # noqa: PLC0415

  import train_throughput  # noqa: PLC0415
  from vlm_jax.train import flops  # noqa: PLC0415
  peak, peak_source = flops.peak_flops_per_device()
  best: dict[str, dict] = {}
  for spec in args.models.split(";"):
    name, arg = spec.split(":", 1)
    for per_device in args.batches:
      batch = per_device * dev["devices"]
      config = _load(arg)
      config.batch_size = batch
      line = {"part": "step", "model": name, "config": arg, "batch": batch, "per_device_batch": per_device,
              "dtype": str(config.model.get("dtype")), "remat": str(config.model.get("remat")), **dev}
      try:
        t0 = time.perf_counter()
        run, model_flops, _, _ = train_throughput._vlm_jax_step(config, batch)  # noqa: SLF001 (compiles, warms)
        compile_s = time.perf_counter() - t0
        times = [run(args.window) / args.window for _ in range(args.windows)]
      except Exception as e:  # noqa: BLE001 - out of memory ends this model's batch sweep
        if not _out_of_memory(e):
          raise
        print(json.dumps({**line, "out_of_memory": True}), flush=True)
        break
      finally:
        run = None
        gc.collect()
        jax.clear_caches()
      step_s = statistics.median(times)
      m = flops.throughput_metrics(batch, step_s, model_flops, 1, dev["devices"], peak)
      line.update(images_per_sec=round(m["images_per_sec"], 1), tflops_per_device=round(m["tflops_per_device"], 3),
                  mfu=round(m["mfu"], 4), median_step_s=round(step_s, 5), model_tflops_per_step=model_flops / 1e12,
                  peak_tflops_per_device=round(peak / 1e12, 1), peak_source=peak_source,
                  compile_and_warmup_s=round(compile_s, 1), load_avg_1m=round(os.getloadavg()[0], 2))
      print(json.dumps(line), flush=True)
      if line["mfu"] >= best.get(name, {}).get("mfu", -1):
        best[name] = line
  return best


def loss_part(args, dev: dict) -> dict[str, int]:
  """The largest global batch whose loss value and gradient run, dense vs ring, doubling from 1024."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from vlm_jax.objectives import get_objective  # noqa: PLC0415
  from vlm_jax.parallel.mesh import BATCH_AXES, batch_sharding, make_mesh  # noqa: PLC0415
  mesh = make_mesh({"data": -1})
  largest = {}
  for impl in ("dense", "ring"):
    hp = {"impl": "ring", "tile": 256} if impl == "ring" else {}

    def loss(zimg, ztxt, hp=hp):
      out = {"zimg": zimg, "ztxt": ztxt, "logit_scale": jnp.float32(100.0), "logit_bias": None}
      return get_objective("clip")(out, {}, mesh_axes=BATCH_AXES, **hp)[0]

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    batch, fits = 1024 * max(1, dev["devices"] // 8 * 8 or dev["devices"]), 0
    while batch <= args.loss_max_batch:
      line = {"part": "loss", "impl": impl, "batch": batch, "per_device_batch": batch // dev["devices"], **dev}
      try:
        with jax.set_mesh(mesh):
          z = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (batch, 512), jnp.float32),
                             batch_sharding(mesh, 2))
          z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
          t0 = time.perf_counter()
          jax.block_until_ready(fn(z, z))
          line["seconds"] = round(time.perf_counter() - t0, 3)
        fits = batch
      except Exception as e:  # noqa: BLE001
        if not _out_of_memory(e):
          raise
        print(json.dumps({**line, "out_of_memory": True}), flush=True)
        break
      finally:
        z = None
        gc.collect()
        jax.clear_caches()
      print(json.dumps(line), flush=True)
      batch *= 2
    largest[impl] = fits
    print(json.dumps({"part": "loss", "impl": impl, "largest_batch": fits,
                      "capped": fits * 2 > args.loss_max_batch, **dev}), flush=True)
  return largest


def data_part(args, dev: dict) -> float:
  """Images/s per CPU core of the grain pipeline on generated JPEG shards at 224 px."""
  import data_throughput as dt  # noqa: PLC0415
  pattern = dt.ensure_test_shards(args.data_images, min(256, args.data_images), None)
  from vlm_jax.data import clip_bpe  # noqa: PLC0415
  from vlm_jax.errors import UserError  # noqa: PLC0415
  try:  # CLIP's BPE (its vocabulary ships with open_clip); else the words tokenizer, which needs no file
    clip_bpe.find_vocab(None)
    tokenizer = "clip_bpe"
  except UserError:
    tokenizer = "words"
  opts = argparse.Namespace(image_size=224, workers=args.data_workers, shuffle=min(1000, args.data_images),
                            tokenizer=tokenizer,
                            batch=16 if args.quick else 64, batches=2 if args.quick else 10,
                            repeats=2 if args.quick else 3, warmup=1 if args.quick else 3)
  m = dt.measure("vlm_jax", pattern, opts)
  print(json.dumps({"part": "data", **{k: m[k] for k in ("images_per_sec", "images_per_sec_per_core", "workers",
                                                           "images_per_cpu_s", "batch", "image_size",
                                                           "cpu_count", "load_avg_1m")}, "tokenizer": tokenizer,
                    **dev}), flush=True)
  return float(m["images_per_cpu_s"])


def main(argv=None) -> None:
  args = _parse(argv)
  import jax  # noqa: PLC0415
  jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or None)
  dev = _device()
  summary = {"summary": True, **dev}
  best = step_part(args, dev) if "step" not in args.skip else {}
  for name, line in best.items():
    summary[f"{name}/best_mfu"] = line["mfu"]
    summary[f"{name}/best_batch"] = line["batch"]
    summary[f"{name}/images_per_sec"] = line["images_per_sec"]
  if "loss" not in args.skip:
    largest = loss_part(args, dev)
    summary.update({f"loss/{k}_largest_batch": v for k, v in largest.items()})
    if largest.get("dense"):
      summary["loss/ring_over_dense"] = round(largest["ring"] / largest["dense"], 2)
      summary["loss/capped_at"] = args.loss_max_batch if largest["ring"] * 2 > args.loss_max_batch else None
  if "data" not in args.skip:
    per_core = data_part(args, dev)
    summary["data/images_per_cpu_second"] = round(per_core, 1)
    if best and per_core > 0:
      fastest = max(line["images_per_sec"] for line in best.values())
      summary["data/cores_to_feed_fastest_step"] = round(fastest / per_core, 1)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
