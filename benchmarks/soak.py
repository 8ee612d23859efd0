"""Soak: a long micro pre-training run with evaluation and checkpoints on a schedule; memory, disk and speed over
time. JSON lines.

  .venv/bin/python benchmarks/soak.py [--steps=3000] [--every=100] [--keep=2] [--window=500]

The run is `configs/pretrain/clip.py:micro` (16 px synthetic images, one-layer towers, batch 16) with the micro
evaluator suite (`config_lib.synthetic_evals('micro')`: zero-shot, retrieval, linear probe, few-shot,
segmentation) and a checkpoint every `--every` steps, `keep_checkpoints=--keep`, in a child process
(`vlm_jax.runner.pretrain`, the code `python -m vlm_jax.pretrain` runs). The parent polls, every `--poll`
seconds, the child's resident memory (VmRSS of /proc/<pid>/status), the step folders under
`workdir/checkpoints/` and the rows of `metrics.jsonl`.

Lines: one {"sample": …} per logged step (step, rss_mb, checkpoints on disk, wall seconds), then one summary:
rss_mb at the start (the first sample after step `--every`: compiled, first evaluation and checkpoint done) and
at the end, growth in MB and MB per 1,000 steps (also the least-squares slope over the samples after the
start), the most checkpoint folders seen at once against `keep_checkpoints`, wall-clock steps/s per
`--window`-step window (evaluation and checkpointing included), the load average (os.getloadavg) at the start
and end, and whether the bounds held.

Bounds (reported, not enforced; this is a benchmark, not a test): resident memory grows less than
50 MB per 1,000 steps after the start, both start → end and start → the highest later sample (the allocator
may hand memory back late in a run, which would hide growth in the start → end figure), and never more than
`keep_checkpoints` + 1 step folders exist at once (one extra while a new checkpoint is written before the
oldest is deleted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RSS_BOUND_MB_PER_1000 = 50.0


def _parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=3000)
  ap.add_argument("--every", type=int, default=100, help="evaluation and checkpoint interval (steps)")
  ap.add_argument("--keep", type=int, default=2, help="keep_checkpoints")
  ap.add_argument("--window", type=int, default=500, help="steps per throughput window")
  ap.add_argument("--poll", type=float, default=0.5, help="seconds between samples")
  ap.add_argument("--workdir", default="", help="default: a temporary directory, removed at the end")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def _child(args) -> None:
  """The training process: the micro config with evaluators and checkpoints every `--every` steps."""
  sys.path.insert(0, ROOT)

  from vlm_jax import config_lib, runner  # noqa: PLC0415
  c = config_lib.load_file("configs/pretrain/clip.py:micro", root=ROOT)
  c.total_steps, c.log_every_steps = args.steps, args.every
  c.eval_every_steps, c.checkpoint_every_steps, c.keep_checkpoints = args.every, args.every, args.keep
  c.evals = config_lib.synthetic_evals("micro")
  runner.pretrain(c, args.workdir, quiet=True)


def _rss_mb(pid: int) -> float | None:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def _checkpoints(workdir: str) -> int:
  try:
    return sum(name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))
  except OSError:
    return 0


def _rows(path: str, seen: int) -> list[dict]:
  """Complete rows of metrics.jsonl after the first `seen`."""
  try:
    with open(path) as f:
      lines = f.read().split("\n")
  except OSError:
    return []
  return [json.loads(ln) for ln in lines[seen:-1] if ln.strip()]


def _slope(xs: list[float], ys: list[float]) -> float:
  n = len(xs)
  if n < 2:
    return float("nan")
  mx, my = sum(xs) / n, sum(ys) / n
  var = sum((x - mx) ** 2 for x in xs)
  return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


def _windows(wall: dict[int, float], last: int, window: int, every: int) -> list[dict]:
  """Wall-clock steps/s per `window` steps, evaluation and checkpointing included (the first window starts at
  step `every`: after compilation)."""
  out = []
  for lo in range(0, last, window):
    hi = min(lo + window, last)
    start = max(lo, every)
    if start in wall and hi in wall and wall[hi] > wall[start]:
      out.append({"steps": f"{lo}-{hi}", "steps_per_s": round((hi - start) / (wall[hi] - wall[start]), 2)})
  return out


def main(argv=None) -> None:
  args = _parse(sys.argv[1:] if argv is None else argv)
  if args.child:
    _child(args)
    return
  workdir = args.workdir or tempfile.mkdtemp(prefix="vlm_jax_soak_")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.setdefault("JAX_PLATFORMS", "cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--steps={args.steps}", f"--every={args.every}",
         f"--keep={args.keep}", f"--workdir={workdir}"]
  load_start, t0 = os.getloadavg(), time.monotonic()
  child = subprocess.Popen(cmd, cwd=ROOT, env=env)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  rows: list[dict] = []
  samples: list[dict] = []          # one per logged training step
  wall: dict[int, float] = {}       # step -> seconds since start, when its row appeared
  max_ckpts, rss_max = 0, 0.0
  while True:
    done = child.poll() is not None
    rss = None if done else _rss_mb(child.pid)  # an exited child's memory is not the run's
    rss_max = max(rss_max, rss or 0.0)
    max_ckpts = max(max_ckpts, _checkpoints(workdir))
    new = _rows(metrics_path, len(rows))
    rows += new
    now = time.monotonic() - t0
    for r in new:
      if "loss" in r and r["step"] not in wall:
        wall[r["step"]] = now
        if rss is not None:
          samples.append({"step": r["step"], "rss_mb": round(rss, 1), "checkpoints": _checkpoints(workdir),
                          "wall_s": round(now, 1)})
          print(json.dumps({"sample": samples[-1]}), flush=True)
    if done:
      break
    time.sleep(args.poll)
  load_end, elapsed = os.getloadavg(), time.monotonic() - t0
  train_rows = [r for r in rows if "loss" in r]
  start = next((s for s in samples if s["step"] > args.every), None)  # after the first evaluation + checkpoint
  end = samples[-1] if samples else None
  after = [s for s in samples if start and s["step"] >= start["step"]]
  growth = round(end["rss_mb"] - start["rss_mb"], 1) if start and end else None
  span = (end["step"] - start["step"]) if start and end else 0
  per_1000 = round(1000 * growth / span, 2) if span else None
  # the allocator may hand memory back late in the run: the bound also takes the highest sample after the start
  peak = max(after, key=lambda s: s["rss_mb"]) if after else None
  peak_growth = round(peak["rss_mb"] - start["rss_mb"], 1) if peak else None
  peak_span = (peak["step"] - start["step"]) if peak else 0
  peak_per_1000 = round(1000 * peak_growth / peak_span, 2) if peak_span else 0.0
  worst = max(per_1000, peak_per_1000) if per_1000 is not None else None
  slope = _slope([s["step"] for s in after], [s["rss_mb"] for s in after])
  summary = {
      "benchmark": "soak", "config": "configs/pretrain/clip.py:micro + synthetic_evals('micro')",
      "exit_code": child.returncode, "steps": args.steps, "last_step": train_rows[-1]["step"] if train_rows else 0,
      "eval_and_checkpoint_every": args.every, "batch_size": 16, "wall_s": round(elapsed, 1),
      "rss_start_mb": start and start["rss_mb"], "rss_start_step": start and start["step"],
      "rss_end_mb": end and end["rss_mb"], "rss_end_step": end and end["step"], "rss_max_mb": round(rss_max, 1),
      "rss_growth_mb": growth, "rss_growth_mb_per_1000_steps": per_1000,
      "rss_peak_after_start_mb": peak and peak["rss_mb"], "rss_peak_step": peak and peak["step"],
      "rss_peak_growth_mb": peak_growth, "rss_peak_growth_mb_per_1000_steps": peak_per_1000,
      "rss_slope_mb_per_1000_steps": round(1000 * slope, 2) if slope == slope else None,
      "max_checkpoints_on_disk": max_ckpts, "keep_checkpoints": args.keep,
      "throughput": _windows(wall, train_rows[-1]["step"] if train_rows else 0, args.window, args.every),
      "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in load_end],
      "cpu_count": os.cpu_count(),
      "bound_rss_mb_per_1000_steps": RSS_BOUND_MB_PER_1000,
      "rss_bound_held": worst is not None and worst < RSS_BOUND_MB_PER_1000,
      "checkpoint_bound_held": max_ckpts <= args.keep + 1,
  }
  print(json.dumps(summary), flush=True)
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
