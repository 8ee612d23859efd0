"""Launch scripts (launch/*.sh, launch/slurm.sbatch): dry-run output, argument quoting and usage errors."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARDS = "--config.data.shards=gs://b/{00000..00099}.tar,gs://c/extra-{0..3}.tar:0.5"
QUOTE = "--config.wandb.notes=it's a \"test\" $HOME"


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  full_env = {k: v for k, v in os.environ.items()
              if k not in ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "NUM_PROCESSES", "DRY_RUN")}
  full_env.update(env or {})
  return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                        cwd=ROOT, env=full_env, timeout=30)


def _commands(result: subprocess.CompletedProcess) -> list[list[str]]:
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def _remote(cmd: list[str]) -> list[str]:
  """The command a `gcloud … ssh --command=…` line runs on the workers, split as their shell splits it."""
  [arg] = [a for a in cmd if a.startswith("--command=")]
  return shlex.split(arg[len("--command="):])


def test_tpu_pod_dry_run_creates_installs_runs_on_all_workers_and_deletes():
  r = _run("tpu_pod.sh", "--dry-run", "--name", "pod1", "--zone", "us-west4-a", "--project", "proj",
           "--accelerator-type", "v5litepod-16", "--env", "WANDB_MODE=offline",
           "configs/pretrain/siglip.py:img=B/16,txt=B,res=224", "gs://bucket/runs/x", SHARDS, QUOTE)
  cmds = _commands(r)
  assert cmds[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert {"pod1", "--zone=us-west4-a", "--project=proj", "--accelerator-type=v5litepod-16",
          "--version=v2-alpha-tpuv5-lite"} <= set(cmds[0])
  assert any(c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in c for c in cmds)
  ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  assert ssh and all("--worker=all" in c and "pod1" in c for c in ssh)
  assert any("jax[tpu]" in " ".join(_remote(c)) for c in ssh[:-1])   # the install step
  remote = _remote(ssh[-1])
  assert remote[remote.index("-m") + 1] == "vlm_jax.pretrain"
  assert "export" in remote and "WANDB_MODE=offline" in remote
  assert "--config=configs/pretrain/siglip.py:img=B/16,txt=B,res=224" in remote
  assert "--workdir=gs://bucket/runs/x" in remote
  assert remote[-2:] == [SHARDS, QUOTE]
  assert cmds[-1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"] and "pod1" in cmds[-1]


def test_tpu_pod_keep_no_create_and_git_clone():
  r = _run("tpu_pod.sh", "--dry-run", "--no-create", "--keep", "--repo", "https://example.com/vlm_jax.git",
           "--ref", "v0.1", "c.py:tiny", "gs://b/w", env={"TPU_NAME": "pod2", "ZONE": "europe-west4-a"})
  cmds = _commands(r)
  assert not any("create" in c or "delete" in c for c in cmds)
  assert "git clone --depth 1 --branch v0.1 https://example.com/vlm_jax.git" in " ".join(_remote(cmds[0]))
  assert "--zone=europe-west4-a" in cmds[-1]


def test_tpu_pod_deletes_the_slice_when_the_run_fails(tmp_path):
  """Live mode with a stand-in `gcloud` on PATH whose ssh of the run fails: the slice is still deleted."""
  log = tmp_path / "gcloud.log"
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$GCLOUD_LOG"\n'
                  'if [[ "$*" == *vlm_jax.pretrain* ]]; then echo "worker 0: boom"; exit 3; fi\n')
  fake.chmod(0o755)
  r = _run("tpu_pod.sh", "--name", "pod3", "--zone", "z", "--accelerator-type", "v4-8", "--no-install",
           "--log", str(tmp_path / "run.log"), "c.py:tiny", "gs://b/w",
           env={"PATH": f"{fake.parent}:{os.environ['PATH']}", "GCLOUD_LOG": str(log)})
  assert r.returncode != 0
  calls = log.read_text().splitlines()
  assert [c.split()[3] for c in calls] == ["create", "ssh", "delete"]
  assert "--version=tpu-ubuntu2204-base" in calls[0]
  assert "worker 0: boom" in (tmp_path / "run.log").read_text() and "worker 0: boom" in r.stdout


def test_gpu_local_dry_run_one_process_and_per_process_env():
  [cmd] = _commands(_run("gpu_local.sh", "--dry-run", "c.py:tiny", "workdirs/x", SHARDS))
  assert cmd == [".venv/bin/python", "-m", "vlm_jax.pretrain", "--config=c.py:tiny", "--workdir=workdirs/x", SHARDS]
  cmds = _commands(_run("gpu_local.sh", "--dry-run", "--num-processes", "4", "--gpus-per-process", "2",
                        "--port", "2222", "c.py:tiny", "workdirs/x", SHARDS, QUOTE))
  assert len(cmds) == 4
  for i, cmd in enumerate(cmds):
    assert cmd[0] == "env"
    assert f"CUDA_VISIBLE_DEVICES={2 * i},{2 * i + 1}" in cmd
    assert {"JAX_COORDINATOR_ADDRESS=localhost:2222", "JAX_NUM_PROCESSES=4", f"JAX_PROCESS_ID={i}"} <= set(cmd)
    assert cmd[-2:] == [SHARDS, QUOTE]
  cmds = _commands(_run("gpu_local.sh", "c.py:tiny", "w", env={"NUM_PROCESSES": "2", "DRY_RUN": "1"}))
  assert [c[1] for c in cmds] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]


def test_slurm_dry_run_prints_srun():
  for args, env in (((), {"DRY_RUN": "1"}), (("--dry-run",), {})):
    [cmd] = _commands(_run("slurm.sbatch", *args, "c.py:img=L/14,txt=L", "/shared/w", SHARDS, QUOTE, env=env))
    assert cmd[0] == "srun" and "--kill-on-bad-exit=1" in cmd
    assert cmd[cmd.index("-m") + 1:] == ["vlm_jax.pretrain", "--config=c.py:img=L/14,txt=L", "--workdir=/shared/w",
                                         SHARDS, QUOTE]


@pytest.mark.parametrize("script,args", [
    ("tpu_pod.sh", ["--dry-run", "--zone", "z", "--accelerator-type", "v4-8", "c", "gs://w"]),   # no --name
    ("tpu_pod.sh", ["--dry-run", "--name", "n", "--zone", "z", "c", "gs://w"]),            # no accelerator type
    ("tpu_pod.sh", ["--dry-run", "--name", "n", "--zone", "z", "--accelerator-type", "v4-8", "c"]),  # no workdir
    ("gpu_local.sh", ["--dry-run", "c"]),
    ("gpu_local.sh", ["--dry-run", "--num-processes", "0", "c", "w"]),
    ("slurm.sbatch", ["--dry-run"]),
    ("slurm.sbatch", ["--dry-run", "--bogus", "c", "w"]),
])
def test_missing_or_bad_argument_exits_with_usage(script, args):
  r = _run(script, *args)
  assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
  lines = r.stderr.splitlines()
  assert lines[0].startswith("error: ") and lines[-1].startswith("usage: ")
  assert r.stdout == ""


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_local.sh", "slurm.sbatch"])
def test_help(script):
  r = _run(script, "-h")
  assert r.returncode == 0 and r.stdout.startswith("usage: ") and "--dry-run" in r.stdout


@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "env"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3", "TPU_WORKER_ID": "1"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
])
def test_launcher_detection(environ, expected):
  from vlm_jax.parallel.mesh import launcher
  assert launcher(environ) == expected
