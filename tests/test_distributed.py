"""Two processes (jax.distributed over localhost, gloo CPU collectives) train exactly like one process."""

from __future__ import annotations

import subprocess

import numpy as np
import portpicker

from tests import train_helpers as th


def test_two_processes_match_one_process(tmp_path):
  overrides = {"total_steps": 4, "data.streams": 2}  # the same global batches on 1 or 2 processes
  single = str(tmp_path / "single")
  r = th.run_cli(th.pretrain_cmd(single, overrides=overrides), devices=8)
  assert r.returncode == 0, r.stderr[-2000:]

  multi = str(tmp_path / "multi")
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(th.pretrain_cmd(multi, overrides=overrides), cwd=th.ROOT,
                            env=th.env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                                       JAX_PROCESS_ID=i),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a, b = th.losses(single), th.losses(multi)
  assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
  np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-5)
