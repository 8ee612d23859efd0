"""Fault 3, disk full: a pre-training run whose workdir lies on a size-limited tmpfs.

The run must stop with one `error:` line naming the path and the space needed (exit 2, no traceback), keep its
previous checkpoint intact and loadable, leave no half-written step, and continue exactly when rerun with space.
Both ways a disk fills are covered: the free-space check before a save (the usual case: a save needs about what
the previous checkpoint took) and a save that runs out of space while orbax writes it in the background. (A
checkpoint's footprint on tmpfs varies from run to run, 1.1 to 2 MB for the micro config, with how orbax's
OCDBT files were flushed, so the first test shrinks the tmpfs of a stopped run by what its checkpoint took.)

Needs root (`mount -t tmpfs -o size=…`); skipped with the reason where mounting fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from tests import train_helpers as th
from vlm_jax import runs
from vlm_jax.errors import UserError
from vlm_jax.runs import guards

pytestmark = pytest.mark.faults

OVERRIDES = {"total_steps": 6, "checkpoint_every_steps": 2, "keep_checkpoints": 2}


@contextlib.contextmanager
def tmpfs(path: str, size_kb: int):
  """A tmpfs of `size_kb` KiB mounted at `path` for the block (skips the test where it cannot be mounted)."""
  os.makedirs(path, exist_ok=True)
  if shutil.which("mount") is None:
    pytest.skip("no mount command: the disk-full fault needs a size-limited tmpfs")
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", path], capture_output=True,
                     text=True, check=False)
  if r.returncode:
    pytest.skip(f"cannot mount a size-limited tmpfs (needs root): {r.stderr.strip() or r.returncode}")
  try:
    yield path
  finally:  # lazily when a file there is still open (a test that failed midway)
    if subprocess.run(["umount", path], capture_output=True, check=False).returncode:
      subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def remount(path: str, size_kb: int) -> None:
  """Resizes the tmpfs at `path`, keeping its files."""
  r = subprocess.run(["mount", "-o", f"remount,size={size_kb}k", path], capture_output=True, text=True,
                     check=False)
  assert r.returncode == 0, r.stderr


def used_kb(path: str) -> int:
  st = os.statvfs(path)
  return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def _one_error_line(r) -> str:
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  print(errors[0])
  return errors[0]


def test_disk_full_before_a_checkpoint_stops_keeps_the_previous_and_resumes_exactly(tmp_path):
  with tmpfs(str(tmp_path / "mnt"), 256 * 1024) as mnt:
    wd = os.path.join(mnt, "run")
    r = th.run_cli(th.pretrain_cmd(wd, overrides=OVERRIDES))  # uninterrupted, on a roomy disk
    assert r.returncode == 0, r.stderr[-2000:]
    uninterrupted = th.losses(wd)
    root = os.path.join(wd, "checkpoints")
    shutil.rmtree(os.path.join(root, "6"))  # as if stopped after step 4's checkpoint
    before = runs.fingerprint(os.path.join(root, "4"))
    step4 = _flat(runs.load_variables(os.path.join(root, "4")))
    # the disk fills up meanwhile: half a checkpoint left (the check asks for about the newest checkpoint's size)
    footprint = guards.footprint(os.path.join(root, "4"))
    size_kb = used_kb(mnt) + footprint // 2048
    remount(mnt, size_kb)
    r = th.run_cli(th.pretrain_cmd(wd, overrides=OVERRIDES))
    line = _one_error_line(r)
    assert line.startswith(f"error: no space left on device for {root}/6: needs ~"), line
    assert "MB free" in line
    assert sorted(os.listdir(root)) == ["4"]  # nothing of step 6 written
    assert runs.fingerprint(os.path.join(root, "4")) == before  # the previous checkpoint intact, file for file
    loaded = runs.load(wd)
    assert loaded.step == 4
    have = _flat(loaded.variables)
    assert have.keys() == step4.keys()
    for k, v in step4.items():
      np.testing.assert_array_equal(have[k], v, err_msg=k)
    remount(mnt, 256 * 1024)  # space again: the same command continues exactly
    r = th.run_cli(th.pretrain_cmd(wd, overrides=OVERRIDES))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {root}/4" in r.stdout, r.stdout[-2000:]
    assert th.losses(wd) == uninterrupted  # every digit
    assert sorted(os.listdir(root)) == ["4", "6"]
  print(f"checkpoint footprint {footprint / 1024:.0f} KiB; tmpfs shrunk to {size_kb} KiB")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run (on an ordinary disk): its losses and the bytes of its state's arrays."""
  wd = str(tmp_path_factory.mktemp("disk_full_ref") / "ref")
  r = th.run_cli(th.pretrain_cmd(wd, overrides=OVERRIDES))
  assert r.returncode == 0, r.stderr[-2000:]
  meta = ocp.PyTreeCheckpointer().metadata(os.path.join(wd, "checkpoints", "6", "state")).item_metadata.tree
  return {"losses": th.losses(wd), "nbytes": guards.tree_nbytes(meta)}


def test_disk_full_during_a_background_save_leaves_no_step_and_reruns_exactly(tmp_path, reference):
  # just more than the free-space check asks for the first checkpoint (a lower bound: 1.25 × the state's bytes
  # + 256 KiB) once config.json, metrics.jsonl and the TensorBoard file took their pages; less than any
  # checkpoint takes (at least 1.1 MB on tmpfs here)
  first = guards.FIRST_SAVE_FACTOR * reference["nbytes"] + guards.FIRST_SAVE_MARGIN
  size_kb = int(first / 1024) + 24
  with tmpfs(str(tmp_path / "mnt"), size_kb) as mnt:
    wd = os.path.join(mnt, "run")
    os.makedirs(wd)  # the user's directory (a workdir the run created itself is removed when no step was written)
    r = th.run_cli(th.pretrain_cmd(wd, overrides=OVERRIDES))
    line = _one_error_line(r)
    root = os.path.join(wd, "checkpoints")
    # orbax's write of step 2 fails in its thread; the run notices at the next save (or, when the full disk
    # meets the metrics first, at the metrics line): either way one line naming the path
    assert line.startswith((f"error: no space left on device for {root}/2: needs more than the ",
                            f"error: no space left on device for {wd}/metrics.jsonl:")), line
    assert runs.steps(root) == []  # the half-written step is not a step
    if "/checkpoints/2:" in line:
      assert os.listdir(root) == []  # and its temporary folder is gone
    with pytest.raises(UserError, match="no vlm_jax checkpoint"):
      runs.load(wd)
    remount(mnt, 256 * 1024)  # space again: the same command reruns exactly (from the start: no step was saved)
    r = th.run_cli(th.pretrain_cmd(wd, overrides=OVERRIDES))
    assert r.returncode == 0, r.stderr[-3000:]
    assert th.losses(wd) == reference["losses"]  # every digit
    assert sorted(os.listdir(root)) == ["4", "6"]  # no temporary folder left
  print(f"tmpfs {size_kb} KiB")


def test_metrics_line_on_a_full_disk_is_a_user_error(tmp_path):
  from vlm_jax.train import metrics as metrics_lib
  with tmpfs(str(tmp_path / "mnt"), 64) as mnt:
    writer = metrics_lib.MetricsWriter(mnt)
    filler = os.path.join(mnt, "filler")
    try:
      with contextlib.suppress(OSError), open(filler, "wb") as f:  # fill the disk
        while True:
          f.write(b"\0" * 4096)
          f.flush()
      with pytest.raises(UserError, match=f"no space left on device for {writer.path}: 0.0 MB free"):
        for step in range(1, 1000):
          writer.write(step, {"loss": 1.0})
    finally:
      os.remove(filler)
      writer.close()
