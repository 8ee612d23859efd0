"""Two processes (jax.distributed over localhost, gloo CPU collectives) train exactly like one process.

The run streams the synthetic tar shards with `data.streams=2` (each process reads its own half of the shards and
the global batches are the same on 1 or 2 processes), writes orbax checkpoints from both processes, and resumes
from one: the losses of steps 1–4 equal those of an uninterrupted 1-process, 8-device run.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import portpicker

from tests import train_helpers as th


def _two_processes(workdir: str, overrides: dict) -> None:
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(th.pretrain_cmd(workdir, overrides=overrides), cwd=th.ROOT,
                            env=th.env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                                       JAX_PROCESS_ID=i),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]


def test_two_processes_match_one_process_through_a_restore(tmp_path):
  overrides = {"total_steps": 4, "data.streams": 2, "checkpoint_every_steps": 2, "keep_checkpoints": 3}
  single = str(tmp_path / "single")
  r = th.run_cli(th.pretrain_cmd(single, overrides=overrides), devices=8)
  assert r.returncode == 0, r.stderr[-2000:]

  multi = str(tmp_path / "multi")
  _two_processes(multi, overrides)
  ckpts = os.path.join(multi, "checkpoints")
  assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [2, 4]
  shutil.rmtree(os.path.join(ckpts, "4"))  # as if preempted after step 2: both processes restore step 2
  _two_processes(multi, overrides)

  a, b = th.losses(single), th.losses(multi)
  assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
  np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-5)
