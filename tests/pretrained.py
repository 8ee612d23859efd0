"""A cached pretrained fixture: a tiny ResNet CLIP and a tiny ViT CLIP, trained once per code version.

Tests that need a model that already works (transfer, distillation, notebooks, inference) call
`pretrained_run('resnet' | 'vit')` (or use the session fixtures `pretrained_resnet` / `pretrained_vit` from
tests/conftest.py) and get an ordinary pre-training run directory (config.json, metrics.jsonl,
checkpoints/<step>/) that `vlm_jax.inference.load`, `python -m vlm_jax.evaluate --checkpoint=…` and
`config.init.checkpoint` read. The directory is

  $VLM_JAX_CACHE/pretrained/<kind>-<hash>/

where the hash covers the run config (JSON) and the code (docstrings and comments excluded) that decides what a checkpoint contains
and how the model trains: vlm_jax/models/*.py, vlm_jax/train/*.py, vlm_jax/assembly.py, vlm_jax/runs/,
vlm_jax/data/synthetic*.py. Edit any of them and the next call retrains; otherwise every call (and every later
test session: conftest keeps VLM_JAX_CACHE in the system temp dir) reuses it in milliseconds.

Building is `vlm_jax.runner.pretrain(config, workdir, quiet=True)` on `configs/pretrain/clip.py:tiny` with a
shorter run (`RUNS` below) into `<dir>.tmp-<pid>`, renamed into place when done, so a directory that exists is
complete. An fcntl lock file (`<dir>.lock`) makes exactly one process (one pytest-xdist worker) build while the
others wait for it. Each build records `fixture_build.json` (wall and CPU seconds, load average, its zero-shot
numbers; `build_info`). Measured on the 2-core CPU while 4 other agents loaded it (load average 9 → 32):
ResNet 1,248 s wall, 374 CPU-seconds (≈ 3–3.5 min on 2 idle cores), seen / unseen zero-shot top-1 0.93 / 0.62
(chance 0.016); the ViT (same code but before the BatchNorm change, load 9 → 16): 686 s wall, seen / unseen
0.29 / 0.23. The shards of their data config are rendered once (≈ 15 s) and shared by both builds.
Prebuild both without pytest:

  .venv/bin/python -m tests.pretrained            # or: .venv/bin/python tests/pretrained.py [resnet|vit]
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import resource
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("resnet", "vit")
# code whose change invalidates the cached models (relative to the repository root)
HASHED_SOURCES = ("vlm_jax/models/*.py", "vlm_jax/train/*.py", "vlm_jax/data/synthetic*.py",
                  "vlm_jax/assembly.py", "vlm_jax/runs.py", "vlm_jax/runs/*.py")

# Run settings: a short run of the synthetic default (tiny: 900 steps at batch 256), zero-shot evaluated at the
# end only (its numbers land in metrics.jsonl), one checkpoint at the last step. Tuning notes (seen-pair
# zero-shot top-1, ResNet, batch 128, lr 2e-3): 300 steps 0.32, 600 steps 0.82.
RUNS = {
    "resnet": {"total_steps": 500, "batch_size": 128, "warmup_steps": 50, "lr": 2e-3, "num_train": 1 << 15},
    "vit": {"total_steps": 600, "batch_size": 128, "warmup_steps": 50, "lr": 2e-3, "num_train": 1 << 15},
}
# ViT (VIT_IMAGE, 600 steps): seen 0.29, unseen 0.23 — it learns shape slower than the ResNet (colour: 1.00).
# The ViT image tower (`model.image` override): patch 4 on 32 px (64 tokens) behind the convolutional stem of
# Xiao et al. 2021 (configs' tiny_model notes the conv stem learns shape faster here), two blocks of width 128,
# mean pooling.
VIT_IMAGE = {"kind": "vit", "variant": "mu/4", "image_size": 32, "stem": "conv", "pool_type": "gap",
             "width": 128, "depth": 2, "num_heads": 4, "mlp_dim": 512}


def _load_config_file(path: str, arg: str):
  from vlm_jax import config_lib  # noqa: PLC0415
  return config_lib.load_file(f"{path}:{arg}" if arg else path, root=ROOT)


def config(kind: str, run: dict | None = None, vit_image: dict | None = None):
  """The run config of fixture `kind` ('resnet' | 'vit'): clip.py:tiny with `RUNS[kind]` (updated by `run`)
  and, for the ViT, `VIT_IMAGE` (updated by `vit_image`) as the image tower."""
  import ml_collections  # noqa: PLC0415
  if kind not in KINDS:
    raise ValueError(f"unknown pretrained fixture {kind!r}; use one of {KINDS}")
  r = {**RUNS[kind], **(run or {})}
  c = _load_config_file("configs/pretrain/clip.py", "tiny")
  c.total_steps = r["total_steps"]
  c.batch_size = r["batch_size"]
  c.log_every_steps = max(r["total_steps"] // 10, 1)
  c.eval_every_steps = 0
  c.checkpoint_every_steps = r["total_steps"]
  c.keep_checkpoints = 1
  c.optimizer.lr = r["lr"]
  c.optimizer.warmup_steps = r["warmup_steps"]
  c.data.synthetic.num_train = r["num_train"]
  c.data.shuffle_buffer = min(int(c.data.shuffle_buffer), r["num_train"] // 4)
  c.evals = ml_collections.ConfigDict({"zeroshot": {"kind": "zeroshot_synthetic", "plots": False}})
  if kind == "vit":
    c.model.image = ml_collections.ConfigDict({**VIT_IMAGE, **(vit_image or {})})
  return c


def _code_only(source: str) -> str:
  """The module's code without docstrings and comments (`ast.dump`): a documentation edit keeps the hash."""
  import ast  # noqa: PLC0415
  tree = ast.parse(source)
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
        getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
      node.body = body[1:] or [ast.Pass()]
  return ast.dump(tree)


def code_hash(config_json: str) -> str:
  """sha256 (12 hex digits) of the config JSON and the code (not the docs) of the sources in HASHED_SOURCES."""
  h = hashlib.sha256(config_json.encode())
  for pattern in HASHED_SOURCES:
    for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
      h.update(os.path.relpath(path, ROOT).encode())
      with open(path) as f:
        h.update(_code_only(f.read()).encode())
  return h.hexdigest()[:12]


def cache_root() -> str:
  base = os.environ.get("VLM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlm_jax")
  return os.path.join(base, "pretrained")


@functools.lru_cache(maxsize=None)
def run_dir(kind: str) -> str:
  """Where fixture `kind` lives for the code and config as they are at this process's first call (built or
  not): a session keeps one directory even when source files are edited while it runs."""
  c = config(kind)
  return os.path.join(cache_root(), f"{kind}-{code_hash(c.to_json_best_effort(sort_keys=True))}")


@contextlib.contextmanager
def _locked(path: str):
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def build(c, workdir: str, *, quiet: bool = True) -> dict:
  """Trains config `c` into `workdir` with the ordinary pre-training entry; returns its final metrics."""
  from vlm_jax import runner  # noqa: PLC0415
  return runner.pretrain(c, workdir, quiet=quiet)


def _cpu_seconds() -> float:
  """User + system CPU time of this process and its finished children (the shard renderers)."""
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def pretrained_run(kind: str, *, quiet: bool = True) -> str:
  """The run directory of fixture `kind` ('resnet' | 'vit'), trained on first use for this code version."""
  final = run_dir(kind)
  if os.path.isdir(final):
    return final
  os.makedirs(os.path.dirname(final), exist_ok=True)
  with _locked(final + ".lock"):
    if os.path.isdir(final):  # another process built it while we waited
      return final
    for stale in glob.glob(final + ".tmp-*"):  # a build that died (we hold the lock: nobody else is building)
      shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    t0, cpu0, load0 = time.perf_counter(), _cpu_seconds(), os.getloadavg()
    metrics = build(config(kind), tmp, quiet=quiet)
    record = {"kind": kind, "build_seconds": round(time.perf_counter() - t0, 1),
              "cpu_seconds": round(_cpu_seconds() - cpu0, 1), "load_average_before": load0,
              "load_average_after": os.getloadavg(), "cpu_count": os.cpu_count(),
              "zeroshot": {k: v for k, v in metrics.items() if k.startswith("zeroshot/")}}
    with open(os.path.join(tmp, "fixture_build.json"), "w") as f:
      json.dump(record, f, indent=2)
    os.rename(tmp, final)
  return final


def build_info(path: str) -> dict:
  """What the build of the fixture at `path` recorded: build_seconds, load_average, zero-shot metrics."""
  with open(os.path.join(path, "fixture_build.json")) as f:
    return json.load(f)


def main(argv: list[str]) -> None:
  kinds = argv or list(KINDS)
  for kind in kinds:
    t0 = time.perf_counter()
    path = pretrained_run(kind, quiet=False)
    print(f"{kind}: {path} ({time.perf_counter() - t0:.0f} s now; build: {build_info(path)})", flush=True)


if __name__ == "__main__":
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  import tests.conftest  # noqa: F401,PLC0415  (the suite's environment: 8 CPU devices, caches)
  main(sys.argv[1:])
