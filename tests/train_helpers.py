"""Shared helpers for the training tests: loading config files, a micro config, running the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, arg: str = "tiny"):
  from vlm_jax import config_lib  # noqa: PLC0415
  return config_lib.load_file(f"{path}:{arg}" if arg else path, root=ROOT)


def micro_config(path: str = "configs/pretrain/clip.py", **overrides):
  """The `micro` variant of a config (16 px, one-layer towers, batch 16, no evals) plus dotted overrides."""
  c = load_config(path, "micro")
  for k, v in overrides.items():
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


def pretrain_cmd(workdir: str, config: str = "configs/pretrain/clip.py:micro", overrides: dict | None = None):
  return [sys.executable, "-m", "vlm_jax.pretrain", f"--config={config}", f"--workdir={workdir}",
          *cli_flags(overrides or {})]


def run_cli(args: list[str], *, devices: int = 8, timeout: int = 300, **extra_env):
  return subprocess.run(args, cwd=ROOT, env=env(devices, **extra_env), capture_output=True, text=True,
                        timeout=timeout)


def losses(workdir: str) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(ln) for ln in f if ln.strip()]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]
