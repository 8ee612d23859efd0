"""Shared helpers for the training tests: loading config files, a micro config, running the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, arg: str = "tiny"):
  spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


MICRO_OVERRIDES = {
    "batch_size": 16, "total_steps": 6, "log_every_steps": 1, "checkpoint_every_steps": 1000,
    "data.image_size": 16, "model.image.image_size": 16, "model.image.patch_size": 4, "model.image.width": 32,
    "model.image.depth": 1, "model.image.mlp_dim": 64, "model.image.num_heads": 2, "model.text.width": 32,
    "model.text.depth": 1, "model.text.mlp_dim": 64, "model.text.num_heads": 2, "model.embed_dim": 16,
    "optimizer.warmup_steps": 2, "data.num_threads": 1,
}


def micro_config(path: str = "configs/pretrain/clip.py", **overrides):
  """The tiny config shrunk to seconds per run (16 px, one layer per tower, batch 16, no evals)."""
  c = load_config(path, "tiny")
  c.evals = {}
  for k, v in {**MICRO_OVERRIDES, **overrides}.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def cli_flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def env(devices: int = 8, **extra) -> dict:
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
  e.update({k: str(v) for k, v in extra.items()})
  return e


def pretrain_cmd(workdir: str, config: str = "configs/pretrain/clip.py:tiny", overrides: dict | None = None):
  return [sys.executable, "-m", "vlm_jax.pretrain", f"--config={config}", f"--workdir={workdir}",
          *cli_flags(overrides if overrides is not None else MICRO_OVERRIDES)]


def run_cli(args: list[str], *, devices: int = 8, timeout: int = 300, **extra_env):
  return subprocess.run(args, cwd=ROOT, env=env(devices, **extra_env), capture_output=True, text=True,
                        timeout=timeout)


def losses(workdir: str) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(ln) for ln in f if ln.strip()]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]
