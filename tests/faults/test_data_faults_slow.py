"""Fault 4 (slow part): the 5 %-of-every-defect shard set read by grain worker processes and by a real
pre-training run gives the exact skip counts; a source deleted while a pre-training run reads it ends the run
with one `error:` line (exit 2), never a hang or a traceback. See test_data_faults.py for the quick part."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests import train_helpers as th
from tests.faults import hostile_data as hd
from tests.faults.test_data_faults import SEED, all_labels, data_config, expected_counts, read_epochs, two_sources

pytestmark = pytest.mark.faults


def test_worker_processes_count_every_defect_exactly(tmp_path):
  """2 grain workers (each takes every other file: one non-tar, one truncated and three whole shards, 88 valid
  samples); batches alternate between them, so 22 batches of 8 are exactly one epoch of each."""
  s = hd.write_defect_set(str(tmp_path))
  epochs, counts = read_epochs(data_config(s["pattern"], workers=2), s, epochs=2)
  for labels in epochs:
    assert sorted(labels.tolist()) == all_labels(s)
  for e, got in enumerate(counts):
    print(f"2 workers, skip counts after {e + 1} epoch(s): {got}")
    assert got == dict(expected_counts(s, workers=2, epochs=e + 1))


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(ln) for ln in f if ln.strip()]


def test_pretraining_over_damaged_shards_completes_with_exact_counts(tmp_path):
  """`python -m vlm_jax.pretrain` with 2 data workers, batch 8, 22 steps = one epoch of the 176 valid samples:
  the run completes and its last metrics row carries exactly the predicted skip counts."""
  s = hd.write_defect_set(str(tmp_path / "shards"))
  wd = str(tmp_path / "run")
  overrides = {"total_steps": 22, "batch_size": 8, "seed": SEED, "data.shards": s["pattern"],
               "data.workers": 2, "data.shuffle_buffer": 0, "data.cycle_length": 1}
  r = th.run_cli(th.pretrain_cmd(wd, overrides=overrides), timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  last = [row for row in _rows(wd) if any(k.startswith("data/skipped/") for k in row)][-1]
  got = {k.split("/")[-1]: v for k, v in last.items() if k.startswith("data/skipped/") and v}
  print(f"pre-training, step {last['step']}: {got}")
  assert last["step"] == 22
  assert got == dict(expected_counts(s, workers=2, epochs=1))


@pytest.mark.parametrize("workers", [0, 2])
def test_source_deleted_while_pretraining_is_one_error_line(tmp_path, workers):
  """Sources A and B mixed 1:1; B's shards are deleted once the run has logged a few steps. The run ends with
  exit 2 and one `error:` line naming B's shards — no hang (the subprocess has a deadline), no traceback."""
  spec, b_paths = two_sources(str(tmp_path / "shards"))
  wd = str(tmp_path / "run")
  overrides = {"total_steps": 5000, "batch_size": 8, "data.shards": spec, "data.workers": workers,
               "data.shuffle_buffer": 0, "data.cycle_length": 2, "log_every_steps": 1}
  err_path = tmp_path / "stderr.txt"
  with open(err_path, "w") as err:
    proc = subprocess.Popen(th.pretrain_cmd(wd, overrides=overrides), cwd=th.ROOT, env=th.env(),
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
      deadline = time.time() + 300
      while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(wd, "metrics.jsonl")) and len(_rows(wd)) >= 2:
          break
        time.sleep(0.05)
      assert proc.poll() is None, "the run ended before the source could be deleted"
      for p in b_paths:
        os.remove(p)
      deleted_at = _rows(wd)[-1]["step"]
      rc = proc.wait(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
  stderr = err_path.read_text()
  errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
  steps = [r["step"] for r in _rows(wd)]
  print(f"workers={workers}: deleted B at step {deleted_at}, run stopped after step {max(steps)} with {errors}")
  assert rc == 2, stderr[-3000:]
  assert len(errors) == 1 and "no readable sample" in errors[0] and "b-0000" in errors[0], errors
  assert "Traceback" not in stderr, stderr[-3000:]
  assert max(steps) < 5000
