"""Pre-training from tar shards survives `kill -9`: the resumed run's metrics equal an uninterrupted run's."""

from __future__ import annotations

import json
import os

from tests import shard_fixtures as fx
from tests import train_helpers as th
from tests.faults import kill
from vlm_jax import runs


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(ln) for ln in f if ln.strip()]
  timing = ("images_per_sec", "tflops_per_device", "mfu")  # wall-clock dependent
  return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_sigkill_mid_shard_then_resume_gives_identical_metrics(tmp_path):
  data = tmp_path / "shards"
  fx.write_clean(str(data), 5, 9)            # 9 samples per shard, batch 16: checkpoints fall mid-shard
  fx.write_dirty(str(data / "clean-00005.tar"))  # plus every kind of bad sample, skipped and counted
  overrides = {"total_steps": 40, "checkpoint_every_steps": 4, "data.shards": f"{data}/clean-*.tar",
               "data.shuffle_buffer": 24, "data.cycle_length": 2, "data.augment.crop_scale": "(0.6,1.0)",
               "data.augment.flip": True}
  ref = str(tmp_path / "ref")
  r = th.run_cli(th.pretrain_cmd(ref, overrides=overrides))
  assert r.returncode == 0, r.stderr[-2000:]

  wd = str(tmp_path / "run")
  ckpts = os.path.join(wd, "checkpoints")
  proc = kill.start(th.pretrain_cmd(wd, overrides=overrides))
  assert kill.kill_when(proc, kill.checkpoint_reached(ckpts, 8)), "the run finished before it could be killed"
  killed_at = runs.Checkpointer(ckpts).latest_step()
  assert killed_at is not None and 8 <= killed_at < 40, killed_at

  r = th.run_cli(th.pretrain_cmd(wd, overrides=overrides))
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"resumed from {ckpts}/{killed_at}" in r.stdout
  got, want = _rows(wd), _rows(ref)
  assert [g["step"] for g in got] == list(range(1, 41))
  assert got == want  # losses and skip counters, every digit
  skipped = {k: v for k, v in want[-1].items() if k.startswith("data/skipped/") and v}
  print("skip counters at the end:", skipped)
  assert skipped["data/skipped/corrupt_image"] >= 2 and skipped["data/skipped/bad_text"] >= 1
