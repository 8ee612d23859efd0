"""Op-level breakdown of one training step: where the vlm_jax step and open_clip's step spend their time.

  .venv/bin/python benchmarks/cpu_step_profile.py [--config=configs/pretrain/clip.py:tiny] [--batch=0] [--top=15]
  .venv/bin/python benchmarks/cpu_step_profile.py --config=configs/pretrain/clip.py:img=B/32,txt=B,res=224 --batch=32

The step is the one `benchmarks/train_throughput.py` times (float32, no remat, data on the device). vlm_jax:
`jax.profiler` traces `--steps` steps; every XLA operation the runtime executed (a fusion, a convolution, a dot) is
summed over the steps and named by the model code it came from (the HLO `op_name` metadata, e.g.
`img/layer4_0/conv2`). open_clip: `torch.profiler` over the same number of steps, self CPU time per aten op. Both
are grouped into coarse classes (convolution, matmul, elementwise/fusion, data movement, reduction, optimizer).

Lines: {"system", "class", "ms_per_step", "share"} per class, {"system", "op", "source", "ms_per_step"} for the
`--top` costliest operations, then {"system", "step_ms"} (wall time of the profiled steps) and the load average.
Operations can run concurrently on XLA:CPU, so the per-op times may sum to more than the step's wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

_CLASSES = (  # (class, pattern on the op / kernel name), first match wins
    ("convolution", r"conv"),
    ("matmul", r"dot|gemm|ynn_fusion|xnn_fusion|onednn|\bmm\b|addmm|bmm|matmul|linear"),
    ("optimizer", r"adam|optimizer|_foreach|lerp"),
    ("reduction", r"reduce|sum|mean|norm|softmax|max_pool|avg_pool"),
    ("data movement", r"copy|transpose|concat|slice|pad|gather|scatter|reshape|broadcast|bitcast|select|cat\b"),
)


def _class(name: str) -> str:
  for label, pattern in _CLASSES:
    if re.search(pattern, name, re.IGNORECASE):
      return label
  return "elementwise / other fusion"


def _hlo_sources(hlo_text: str) -> dict:
  """instruction name -> the op_name of its metadata (the model code it was traced from)."""
  out = {}
  for m in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text):
    out.setdefault(m.group(1), m.group(2))
  return out


def _emit(system: str, per_op: dict, steps: int, top: int, sources=None) -> None:
  by_class = collections.Counter()
  for name, us in per_op.items():
    by_class[_class(name)] += us
  total = sum(by_class.values()) or 1.0
  for label, us in by_class.most_common():
    print(json.dumps({"system": system, "class": label, "ms_per_step": round(us / steps / 1e3, 2),
                      "share": round(us / total, 3)}), flush=True)
  for name, us in collections.Counter(per_op).most_common(top):
    row = {"system": system, "op": name, "ms_per_step": round(us / steps / 1e3, 2)}
    if sources is not None:
      row["source"] = re.sub(r"^jit\([^)]*\)/", "", sources.get(name, ""))[:120]
    print(json.dumps(row), flush=True)


def profile_vlm_jax(run, steps: int, top: int) -> float:
  import jax  # noqa: PLC0415
  logdir = tempfile.mkdtemp(prefix="vlm_jax_profile_")
  try:
    jax.profiler.start_trace(logdir)
    t = time.perf_counter()
    run(steps)
    wall = time.perf_counter() - t
    jax.profiler.stop_trace()
    [path] = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  finally:
    shutil.rmtree(logdir, ignore_errors=True)
  sources = _hlo_sources(run.hlo_text())
  per_op = collections.Counter()
  for e in events:  # the runtime's per-operation events are named by their HLO instruction
    if e.get("ph") == "X" and e.get("name") in sources:
      per_op[e["name"]] += e.get("dur", 0)
  _emit("vlm_jax", per_op, steps, top, sources)
  return wall / steps


def profile_open_clip(run, steps: int, top: int) -> float:
  import torch  # noqa: PLC0415
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t = time.perf_counter()
    for _ in range(steps):
      run.step()
    wall = time.perf_counter() - t
  per_op = {e.key: e.self_cpu_time_total for e in prof.key_averages() if e.self_cpu_time_total > 0}
  _emit("open_clip", per_op, steps, top)
  return wall / steps


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/pretrain/clip.py:tiny")
  ap.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
  ap.add_argument("--steps", type=int, default=5, help="profiled steps per system")
  ap.add_argument("--top", type=int, default=15, help="costliest operations listed per system")
  ap.add_argument("--no-open-clip", action="store_true")
  ap.add_argument("--scan", choices=("", "true", "false"), default="", help="model.scan override")
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import train_throughput  # noqa: PLC0415
  config = train_throughput._load(args.config)  # noqa: SLF001
  config.model.dtype, config.model.remat = "float32", "none"  # as train_throughput --compare-open-clip
  if args.scan:
    config.model.scan = args.scan == "true"
  batch = args.batch or int(config.batch_size)
  config.batch_size = batch
  run, _, host, _ = train_throughput._vlm_jax_step(config, batch)  # noqa: SLF001
  walls = {"vlm_jax": profile_vlm_jax(run, args.steps, args.top)}
  if not args.no_open_clip:
    torch_run = train_throughput._open_clip_step(config, host)  # noqa: SLF001
    walls["open_clip"] = profile_open_clip(torch_run, args.steps, args.top)
  for system, wall in walls.items():
    print(json.dumps({"system": system, "step_ms": round(wall * 1e3, 1), "config": args.config, "batch": batch}))
  with open("/proc/loadavg") as f:
    print(json.dumps({"loadavg": [float(x) for x in f.read().split()[:3]]}), flush=True)


if __name__ == "__main__":
  main()
