"""Input-pipeline throughput: vlm_jax's grain shard pipeline against open_clip's webdataset loader.

  .venv/bin/python benchmarks/data_throughput.py [--shards PATTERN] [--workers N] [--image-size 224]
      [--batch 64] [--batches K] [--repeats R] [--warmup W] [--no-needed] [--profile]

Both systems read the same tar shards, in the same run, with the same worker count, and produce the same kind
of batch: float32 images after RandomResizedCrop(scale=(0.9, 1.0), ratio=(3/4, 4/3), bicubic) to image-size and
CLIP mean/std normalisation, plus the 77 CLIP BPE token ids of the caption.

- "vlm_jax": `vlm_jax.data.pipeline.make_train_iterator` with data.workers=N (0: decode in this process),
  clip_bpe tokenizer; batch {'image': float32 [B,S,S,3], 'text': int32 [B,77]}.
- "webdataset": the training branch of open_clip's `open_clip_train.data.get_wds_dataset`, stage for stage
  (shard list → detshuffle(2000, 500) → split_by_node → split_by_worker → tar samples → shuffle → select →
  decode('pilrgb') → rename(image='jpg;png;jpeg;webp', text='txt') → map_dict(open_clip's train transform,
  open_clip tokenizer) → to_tuple → batched(B) → with_epoch, then `WebLoader(batch_size=None, num_workers=N)`);
  batch (float32 [B,3,S,S], int64 [B,77]). The module itself is not imported because it needs pandas.
  Both sample-shuffle buffers hold --shuffle samples (open_clip uses 5000 with 1000 initial).

Each system gets W warm-up batches (worker start-up and shuffle-buffer fill, reported as `startup_s`), then R
repeats of K batches; the JSON line quotes the median repeat. `images_per_sec_per_core` divides by the
decoding cores (max(1, N)); `images_per_cpu_s` divides by the CPU time the process and its workers actually
used in the timed repeats, which a shared machine disturbs far less than wall-clock time.

Without --shards a test set is generated once into the cache folder ($VLM_JAX_CACHE or ~/.cache/vlm_jax):
JPEG (quality 90, ~42 kB) photograph-like images — smooth random colour fields with texture and sensor noise,
√(w·h) uniform in 300–500 px, aspect ratios 0.6–1.67 — with captions of ~10 (2–70) words drawn from CLIP's
vocabulary with P(rank) ∝ 1/rank plus function words and numbers, written with `shards.ShardWriter`
(img2dataset layout).

`{"needed": …}` estimates the images/s a loader must sustain to keep the training step busy: for the tiny
config it times the step on this machine (data already in memory); for ViT-B/16 CLIP it counts the train-step
FLOPs per image with XLA's cost analysis of the lowered step (model FLOPs: no scan, no remat; nothing is
compiled) and divides an accelerator's bf16 peak × an assumed model-FLOPs utilisation by it.

`--profile` adds one line per system with per-stage milliseconds per image, timed in this process on samples
of the first shard, plus the top cProfile entries of the in-process vlm_jax iterator (stderr).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from vlm_jax.data import shards, transforms  # noqa: E402

CONTEXT_LENGTH = 77
CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# bf16 dense peak FLOP/s per accelerator (vendor data sheets) for the B/16 estimate
PEAKS = {"H100-SXM": 989e12, "A100": 312e12, "TPU-v4": 275e12, "TPU-v5e": 197e12}
ASSUMED_MFU = 0.4


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ---- the generated test set ----------------------------------------------------------------------------------

FUNCTION_WORDS = ("a", "the", "of", "on", "in", "with", "and", "for", "to", "at", "by", "from", "this", "my",
                  "new", "is", "your", "an", "or", "best", "photo", "image", "free", "set", "white", "black")


def _caption_words() -> list[str]:
  """Content words: whole words (>= 4 letters) of the CLIP BPE vocabulary in merge order (~ by frequency)."""
  from vlm_jax.data import clip_bpe  # noqa: PLC0415
  encoder, _ = clip_bpe.load_vocab(clip_bpe.find_vocab())
  words = [s[:-4] for s in encoder if s.endswith("</w>") and len(s) >= 8]
  return [w for w in words if w.isascii() and w.isalpha() and re.search("[aeiouy]", w)]


def _caption(rng: np.random.Generator, words: list[str]) -> str:
  """~10 words (log-normal count, 2–70): a third function words, the rest content words of P(rank) ∝ 1/rank."""
  n = int(np.clip(rng.lognormal(np.log(10), 0.6), 2, 70))
  ranks = np.exp(rng.uniform(0, np.log(len(words)), n)).astype(int) - 1  # P(rank) ~ 1/rank
  toks = [FUNCTION_WORDS[int(rng.integers(len(FUNCTION_WORDS)))] if rng.random() < 0.33 else words[r]
          for r in ranks]
  if rng.random() < 0.3:
    toks.insert(int(rng.integers(0, n)), str(int(rng.integers(1, 3000))))
  toks[0] = toks[0].capitalize()
  text = " ".join(toks)
  return text + "." if rng.random() < 0.5 else text


def _photo(rng: np.random.Generator) -> bytes:
  """JPEG bytes of a photograph-like image: four octaves of bicubic-upsampled colour noise plus sensor noise."""
  side, aspect = rng.uniform(300, 500), float(np.exp(rng.uniform(np.log(0.6), np.log(1 / 0.6))))
  w, h = max(64, int(side * np.sqrt(aspect))), max(64, int(side / np.sqrt(aspect)))
  acc = np.zeros((h, w, 3), np.float32)
  for cells, amp in ((3, 1.0), (12, 0.45), (48, 0.25), (160, 0.12)):
    small = rng.integers(0, 256, (max(2, cells * h // w), cells, 3), dtype=np.uint8)
    acc += amp * np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
  acc = (acc - acc.mean()) * (rng.uniform(0.8, 1.6) / 1.82) + rng.uniform(90, 160)
  acc += rng.normal(0, 3.0, (h, w, 1)).astype(np.float32)
  buf = io.BytesIO()
  Image.fromarray(acc.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def ensure_test_shards(num_images: int, shard_size: int, cache_dir: str | None) -> str:
  """Pattern of the generated JPEG test shards; written once (under a temporary name, then renamed)."""
  from vlm_jax.data import synthetic_shards  # noqa: PLC0415
  root = cache_dir or synthetic_shards.default_cache_dir()
  ident = json.dumps({"v": 2, "n": num_images, "shard": shard_size})
  final = os.path.join(root, "bench-jpeg-" + hashlib.sha1(ident.encode()).hexdigest()[:10])
  n_shards = -(-num_images // shard_size)
  pattern = os.path.join(final, f"data-{{00000..{n_shards - 1:05d}}}.tar")
  if os.path.exists(os.path.join(final, "stats.json")):
    return pattern
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="bench-jpeg.tmp-", dir=root)
  _log(f"generating {num_images} JPEG test images into {final} (once) …")
  rng, words, nbytes = np.random.default_rng(1234), _caption_words(), 0
  try:
    with shards.ShardWriter(tmp, shard_size=shard_size) as writer:
      for _ in range(num_images):
        data = _photo(rng)
        nbytes += len(data)
        writer.write(None, data, "jpg", _caption(rng, words))
    with open(os.path.join(tmp, "stats.json")) as f:
      stats = json.load(f)
    stats["mean_jpeg_bytes"] = nbytes / num_images
    with open(os.path.join(tmp, "stats.json"), "w") as f:
      json.dump(stats, f, indent=2)
    try:
      os.rename(tmp, final)
    except OSError:  # another run finished first
      if not os.path.exists(os.path.join(final, "stats.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return pattern


# ---- the two loaders -------------------------------------------------------------------------------------------

def vlm_jax_loader(pattern: str, args):
  from vlm_jax.data import pipeline, tokenizers  # noqa: PLC0415
  tokenizer = tokenizers.get_tokenizer(getattr(args, "tokenizer", "clip_bpe"), context_length=CONTEXT_LENGTH)
  data = {"shards": pattern, "image_size": args.image_size, "workers": args.workers,
          "shuffle_buffer": args.shuffle, "cycle_length": 4,
          "augment": {"crop_scale": CROP_SCALE, "crop_ratio": CROP_RATIO, "flip": False}}
  it = pipeline.make_train_iterator(data, global_batch_size=args.batch, seed=0, tokenizer=tokenizer)

  def batches():
    for b in it:
      yield b["image"], b["text"]

  def close():
    inner = getattr(it, "_parent", None)
    if hasattr(inner, "close"):
      inner.close()

  return batches(), close


def webdataset_loader(pattern: str, args):
  """open_clip's training loader (`get_wds_dataset`, not resampled) over `pattern`; see the module docstring."""
  import open_clip  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import webdataset as wds  # noqa: PLC0415
  if args.workers == 0:
    torch.set_num_threads(1)  # one core like the in-process vlm_jax run (workers get 1 thread anyway)
  urls = [p for paths, _ in shards.expand_shards(pattern) for p in paths]
  preprocess = open_clip.image_transform(args.image_size, is_train=True, mean=transforms.CLIP_MEAN,
                                         std=transforms.CLIP_STD, aug_cfg={"scale": CROP_SCALE})
  tokenizer = open_clip.get_tokenizer("ViT-B-16")

  def has_caption_and_image(sample):  # open_clip's filter_no_caption_or_no_image
    return "txt" in sample and any(k in sample for k in ("png", "jpg", "jpeg", "webp"))

  dataset = wds.DataPipeline(
      wds.SimpleShardList(urls),
      wds.detshuffle(bufsize=2000, initial=500, seed=0, epoch=0),
      wds.split_by_node,
      wds.split_by_worker,
      wds.tarfile_to_samples(handler=wds.warn_and_continue),
      wds.shuffle(bufsize=args.shuffle, initial=args.shuffle),
      wds.select(has_caption_and_image),
      wds.decode("pilrgb", handler=wds.warn_and_continue),
      wds.rename(image="jpg;png;jpeg;webp", text="txt"),
      wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
      wds.to_tuple("image", "text"),
      wds.batched(args.batch, partial=False),
  ).with_epoch(1 << 30)
  loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=args.workers,
                         persistent_workers=args.workers > 0)
  it = iter(loader)

  def close():
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown:
      shutdown()

  return it, close


LOADERS = {"vlm_jax": vlm_jax_loader, "webdataset": webdataset_loader}


# ---- measuring -------------------------------------------------------------------------------------------------

def _cpu_seconds() -> tuple[float, float]:
  """User + system CPU time of (this process, this process and all its live descendants: loader workers)."""
  import psutil  # noqa: PLC0415
  me = psutil.Process()
  main, total = 0.0, 0.0
  for p in [me, *me.children(recursive=True)]:
    try:
      t = p.cpu_times()
    except psutil.Error:
      continue
    total += t.user + t.system
    main = main or total
  return main, total


def _describe(images, text) -> dict:
  return {"image": f"{np.dtype(str(images.dtype).removeprefix('torch.')).name}{list(images.shape)}",
          "text": f"{np.dtype(str(text.dtype).removeprefix('torch.')).name}{list(text.shape)}"}


def measure(system: str, pattern: str, args) -> dict:
  t0 = time.perf_counter()
  it, close = LOADERS[system](pattern, args)
  try:
    images, text = next(it)
    out = _describe(images, text)
    for _ in range(args.warmup - 1):
      next(it)
    startup = time.perf_counter() - t0
    walls, cpus, mains = [], [], []
    for _ in range(args.repeats):
      (m, c), t = _cpu_seconds(), time.perf_counter()
      for _ in range(args.batches):
        images, text = next(it)
      walls.append(time.perf_counter() - t)
      m2, c2 = _cpu_seconds()
      cpus.append(c2 - c)
      mains.append(m2 - m)
  finally:
    close()
  n = args.batches * args.batch
  rates = sorted(n / w for w in walls)
  ips = statistics.median(rates)
  return {"system": system, "images_per_sec": round(ips, 1),
          "images_per_sec_per_core": round(ips / max(1, args.workers), 1), "workers": args.workers,
          "images_per_cpu_s": round(statistics.median(n / c for c in cpus), 1),
          "main_process_cpu_share": round(sum(mains) / sum(cpus), 3),
          "repeats_images_per_sec": [round(r, 1) for r in rates], "batch": args.batch, "batches": args.batches,
          "warmup_batches": args.warmup, "startup_s": round(startup, 2), "image_size": args.image_size,
          "output": out, "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}


# ---- per-stage profile -----------------------------------------------------------------------------------------

def _stage_times(stages: dict, items: list) -> dict:
  """ms per image of each stage, the stages run in order on every item (each consumes the previous output)."""
  totals = dict.fromkeys(stages, 0.0)
  for item in items:
    x = item
    for name, fn in stages.items():
      t = time.perf_counter()
      x = fn(x, item)
      totals[name] += time.perf_counter() - t
  return {k: round(1e3 * v / len(items), 3) for k, v in totals.items()}


def profile(pattern: str, args) -> list[dict]:
  import open_clip  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from torchvision.transforms import functional as tvf  # noqa: PLC0415
  from vlm_jax.data import tokenizers  # noqa: PLC0415
  torch.set_num_threads(1)
  path = shards.expand_shards(pattern)[0][0][0]
  t = time.perf_counter()
  samples = [s for s, _ in shards.read_shard(path) if isinstance(s, shards.Sample)][:args.profile_samples]
  read_ms = 1e3 * (time.perf_counter() - t) / max(1, len(samples))
  size, rng = args.image_size, np.random.default_rng(0)
  draft = int(np.ceil(size / np.sqrt(CROP_SCALE[0])))
  tok = tokenizers.get_tokenizer("clip_bpe", context_length=CONTEXT_LENGTH)
  ours = _stage_times({
      "decode_draft": lambda x, s: transforms.decode_image(s.image, draft_size=draft),
      "crop_resize": lambda x, s: transforms.random_resized_crop(x, size, rng, scale=CROP_SCALE),
      "normalize": lambda x, s: transforms.normalize(x),
      "tokenize": lambda x, s: tok([s.caption])[0],
  }, samples)
  ours["decode_no_draft"] = _stage_times({"d": lambda x, s: transforms.decode_image(s.image)}, samples)["d"]
  theirs_tf = open_clip.image_transform(size, is_train=True, aug_cfg={"scale": CROP_SCALE}).transforms
  oc_tok = open_clip.get_tokenizer("ViT-B-16")

  def pil_rgb(x, s):  # webdataset's 'pilrgb' decoder
    img = Image.open(io.BytesIO(s.image))
    img.load()
    return img.convert("RGB")

  theirs = _stage_times({
      "decode": pil_rgb,
      "crop_resize": lambda x, s: theirs_tf[0](x),
      "to_tensor": lambda x, s: tvf.to_tensor(theirs_tf[1](x)),
      "normalize": lambda x, s: theirs_tf[3](x),
      "tokenize": lambda x, s: oc_tok(s.caption)[0],
  }, samples)
  sizes = [Image.open(io.BytesIO(s.image)).size for s in samples]
  common = {"samples": len(samples), "read_tar_ms": round(read_ms, 3),
            "mean_jpeg_kb": round(float(np.mean([len(s.image) for s in samples])) / 1e3, 1),
            "mean_pixels_k": round(float(np.mean([w * h for w, h in sizes])) / 1e3, 1)}
  lines = [{"profile": "vlm_jax", "stage_ms_per_image": ours, "sum_ms": round(sum(
      v for k, v in ours.items() if k != "decode_no_draft"), 3), **common},
           {"profile": "webdataset", "stage_ms_per_image": theirs, "sum_ms": round(sum(theirs.values()), 3),
            **common}]
  # whole in-process vlm_jax iterator under cProfile: where the rest (pipeline overhead) goes
  saved = args.workers
  args.workers = 0
  it, close = vlm_jax_loader(pattern, args)
  for _ in range(args.warmup):
    next(it)
  prof = cProfile.Profile()
  prof.enable()
  for _ in range(args.batches):
    next(it)
  prof.disable()
  close()
  args.workers = saved
  stats = pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime")
  _log(f"cProfile of {args.batches} in-process vlm_jax batches (by own time):")
  stats.print_stats(18)
  total = sum(v[2] for v in stats.stats.values())
  top = sorted(((v[2], f"{os.path.basename(k[0])}:{k[2]}") for k, v in stats.stats.items()), reverse=True)[:10]
  lines.append({"profile": "vlm_jax_cprofile", "ms_per_image_total": round(1e3 * total / (args.batches *
                args.batch), 3), "top_ms_per_image": {n: round(1e3 * t / (args.batches * args.batch), 3)
                                                      for t, n in top}})
  return lines


# ---- images/s the training step needs --------------------------------------------------------------------------

def _config(arg: str):
  from vlm_jax import config_lib  # noqa: PLC0415
  return config_lib.load_file(f"configs/pretrain/clip.py:{arg}", root=ROOT)


def _example_batch(config, tokenizer, batch: int) -> dict:
  size = int(config.data.image_size)
  return {"image": np.zeros((batch, size, size, 3), np.float32),
          "text": np.tile(np.arange(tokenizer.max_len, dtype=np.int32) % 7 + 1, (batch, 1)),
          "label": np.arange(batch, dtype=np.int32)}


def _step_parts(config):
  from vlm_jax import assembly  # noqa: PLC0415
  from vlm_jax.parallel import mesh as mesh_lib, partitioning  # noqa: PLC0415
  from vlm_jax.train import optim, step as step_lib  # noqa: PLC0415
  tokenizer, model, loss_fn = assembly.assemble(config)[:3]
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = partitioning.rules_from_config(None)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  fn = step_lib.make_train_step(model, loss_fn, tx, schedule, mesh=mesh, rules=rules)
  return tokenizer, model, tx, fn, mesh, rules


def needed_tiny(steps: int = 4) -> dict:
  """Images/s of the tiny config's train step on this machine (data already in memory)."""
  import jax  # noqa: PLC0415
  from vlm_jax.parallel import mesh as mesh_lib  # noqa: PLC0415
  from vlm_jax.train import loop, state as state_lib  # noqa: PLC0415
  config = _config("tiny")
  tokenizer, model, tx, fn, mesh, rules = _step_parts(config)
  host = _example_batch(config, tokenizer, config.batch_size)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create_train_state(model, tx, {k: v[:1] for k, v in host.items()}, mesh=mesh,
                                                    rules=rules, frozen=None, rng=jax.random.PRNGKey(0))
    batch = loop.global_batch(host, mesh)
    step = jax.jit(fn, out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  sec = statistics.median(times)
  return {"config": "clip.py:tiny", "images_per_sec": round(config.batch_size / sec, 1),
          "step_s": round(sec, 4), "batch": config.batch_size, "image_size": int(config.data.image_size),
          "tokenizer": dict(config.tokenizer), "how": f"median of {steps} jitted train steps on this machine's "
          f"{jax.device_count()} {jax.default_backend()} device(s), data already in memory"}


def needed_b16(batch: int = 8) -> dict:
  """Train-step FLOPs per image of ViT-B/16 CLIP (XLA cost analysis of the lowered step) → images/s."""
  import jax  # noqa: PLC0415
  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  from vlm_jax.train import state as state_lib  # noqa: PLC0415
  config = _config("img=B/16,txt=B,res=224")
  config.model.scan, config.model.remat = False, "none"  # count model FLOPs (XLA counts a scan body once)
  # the full config's tokenizer dict also inherits the base `max_len=16`, which `get_tokenizer` rejects
  config.tokenizer = {"name": "clip_bpe", "context_length": CONTEXT_LENGTH}
  tokenizer, model, tx, fn, mesh, rules = _step_parts(config)
  host = _example_batch(config, tokenizer, batch)
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(lambda r: partitioning.unbox(state_lib._create(  # noqa: SLF001
        model, tx, {k: v[:1] for k, v in host.items()}, None, r)), jax.random.PRNGKey(0))
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
    lowered = jax.jit(fn).lower(abstract, spec)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  per_image = float(cost["flops"]) / batch
  return {"config": "clip.py:img=B/16,txt=B,res=224", "train_gflops_per_image": round(per_image / 1e9, 2),
          "assumed_mfu": ASSUMED_MFU,
          "images_per_sec_per_accelerator": {k: round(p * ASSUMED_MFU / per_image) for k, p in PEAKS.items()},
          "how": "XLA cost_analysis of the lowered (uncompiled) train step, scan/remat off, ÷ batch; "
                 "images/s = bf16 dense peak × assumed MFU ÷ FLOPs per image; multiply by accelerators per host"}


# ---- main ------------------------------------------------------------------------------------------------------

def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shards", default="", help="PATTERN[:weight],… (default: a generated JPEG test set)")
  ap.add_argument("--workers", type=int, default=0)
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--batches", type=int, default=10, help="batches per timed repeat (K)")
  ap.add_argument("--repeats", type=int, default=3, help="timed repeats (R); the median is quoted")
  ap.add_argument("--warmup", type=int, default=3, help="warm-up batches, not timed")
  ap.add_argument("--shuffle", type=int, default=1000, help="sample shuffle buffer of both systems")
  ap.add_argument("--systems", default="vlm_jax,webdataset")
  ap.add_argument("--num-images", type=int, default=3072, help="size of the generated test set")
  ap.add_argument("--shard-size", type=int, default=512)
  ap.add_argument("--cache-dir", default="")
  ap.add_argument("--no-needed", action="store_true", help="skip the images/s-needed estimate")
  ap.add_argument("--profile", action="store_true", help="per-stage timings and a cProfile of vlm_jax")
  ap.add_argument("--profile-samples", type=int, default=200)
  args = ap.parse_args()
  for name in ("batch", "batches", "repeats", "warmup"):
    if getattr(args, name) < 1:
      ap.error(f"--{name} must be >= 1")
  systems = [s for s in args.systems.split(",") if s]
  if any(s not in LOADERS for s in systems):
    ap.error(f"--systems must name some of {sorted(LOADERS)}")
  pattern = args.shards or ensure_test_shards(args.num_images, args.shard_size, args.cache_dir or None)
  results = {}
  for system in systems:
    results[system] = measure(system, pattern, args)
    print(json.dumps({**results[system], "shards": pattern}), flush=True)
  if len(results) == 2:
    ours, theirs = results["vlm_jax"], results["webdataset"]
    print(json.dumps({"ratio": round(ours["images_per_sec"] / theirs["images_per_sec"], 3),
                      "ratio_per_cpu_s": round(ours["images_per_cpu_s"] / theirs["images_per_cpu_s"], 3),
                      "workers": args.workers}), flush=True)
  if args.profile:
    for line in profile(pattern, args):
      print(json.dumps(line), flush=True)
  if not args.no_needed:
    t = time.perf_counter()
    b16 = needed_b16()
    b16["estimate_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    tiny = needed_tiny()
    tiny["estimate_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps({"needed": {"tiny": tiny, "B/16": b16}}), flush=True)


if __name__ == "__main__":
  main()
