"""The training loop: exact resume, SIGTERM, frozen (LiT) parameters, non-finite steps, mesh invariance."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import grain
import jax
import numpy as np
import pytest
from flax import traverse_util

from tests import train_helpers as th
from vlm_jax import assembly, runner, runs
from vlm_jax.train import loop


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_resume_after_checkpoint_equals_uninterrupted(tmp_path):
  full = th.micro_config(total_steps=6)
  runner.pretrain(full, str(tmp_path / "full"), quiet=True)
  # Same run, checkpointed at step 3 and interrupted: a fresh process would find checkpoints/3 and resume.
  part = th.micro_config(total_steps=6, checkpoint_every_steps=3)
  wd = str(tmp_path / "part")
  runner.pretrain(part, wd, quiet=True)
  ckpt_dir = os.path.join(wd, "checkpoints")
  shutil.rmtree(os.path.join(ckpt_dir, "6"))  # as if killed after step 3's checkpoint
  runner.pretrain(part, wd, quiet=True)
  assert th.losses(wd) == th.losses(str(tmp_path / "full"))
  assert [s for s, _ in th.losses(wd)] == [1, 2, 3, 4, 5, 6]


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
  overrides = {"total_steps": 150}
  ref = str(tmp_path / "ref")
  r = th.run_cli(th.pretrain_cmd(ref, overrides=overrides))
  assert r.returncode == 0, r.stderr[-2000:]
  wd = str(tmp_path / "run")
  proc = subprocess.Popen(th.pretrain_cmd(wd, overrides=overrides), cwd=th.ROOT, env=th.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 20:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-2000:]
  stopped = runs.Checkpointer(os.path.join(wd, "checkpoints")).latest_step()
  assert stopped is not None and 20 <= stopped < 150, (stopped, out[-500:])
  assert "SIGTERM" in out
  r = th.run_cli(th.pretrain_cmd(wd, overrides=overrides))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from" in r.stdout
  assert th.losses(wd) == th.losses(ref)  # every printed digit


def test_frozen_tower_is_bit_identical_and_has_no_optimizer_state(tmp_path):
  src = str(tmp_path / "src")
  runner.pretrain(th.micro_config(total_steps=3), src, quiet=True)
  source_params = runs.load_variables(src)["params"]
  lit = th.micro_config(total_steps=4, frozen="^img/")
  lit.init.checkpoint, lit.init.params = src, "^img/"
  wd = str(tmp_path / "lit")
  runner.pretrain(lit, wd, quiet=True)
  after = runs.load_variables(wd)["params"]
  src_flat, after_flat = _flat(source_params), _flat(after)
  img_keys = [k for k in after_flat if k.startswith("img/")]
  assert img_keys
  for k in img_keys:  # loaded from the source run and never updated
    np.testing.assert_array_equal(after_flat[k], src_flat[k])
  changed = [k for k in after_flat if k.startswith("txt/") and not np.array_equal(after_flat[k], src_flat[k])]
  assert changed, "the text tower should have trained"
  # no optimizer state for frozen leaves
  import orbax.checkpoint as ocp
  step_dir = os.path.join(wd, "checkpoints", "4", "state")
  tree = ocp.PyTreeCheckpointer().metadata(step_dir).item_metadata.tree
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree["opt_state"])[0]]
  assert not any("['img']" in p for p in opt_paths), opt_paths
  assert any("['txt']" in p for p in opt_paths) and any("['img_proj']" in p for p in opt_paths)


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
  config = th.micro_config(total_steps=4)
  tokenizer, model, loss_fn = assembly.assemble(config)[:3]
  from vlm_jax.data import pipeline

  class Poisoned(grain.DatasetIterator):
    """The normal stream with batch 2 (1-based) turned to NaN images."""

    def __init__(self, it):
      super().__init__(it)
      self.n = 0

    def __next__(self):
      b = next(self._parent)
      self.n += 1
      if self.n == 2:
        b = dict(b, image=np.full_like(b["image"], np.nan))
      return b

    def get_state(self):
      return self._parent.get_state()

    def set_state(self, state):
      self._parent.set_state(state)

  def make_data(pi, pc):
    return Poisoned(pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                                 seed=config.seed, tokenizer=tokenizer, process_index=pi,
                                                 process_count=pc))

  wd = str(tmp_path / "nan")
  last = loop.train(config, wd, make_data=make_data, model=model, loss_fn=loss_fn, quiet=True)
  rows = dict(th.losses(wd))
  assert not np.isfinite(float(rows[2]))
  assert all(np.isfinite(float(rows[s])) for s in (1, 3, 4))
  assert last["skipped_steps"] == 1


@pytest.mark.parametrize("mesh", [{"data": 2, "fsdp": 2, "model": 2}, {"data": 1, "fsdp": 4, "model": 2}])
def test_sharded_training_matches_data_parallel(tmp_path, mesh):
  dp = runner.pretrain(th.micro_config(total_steps=3), str(tmp_path / "dp"), quiet=True)
  sh = runner.pretrain(th.micro_config(total_steps=3, mesh=mesh), str(tmp_path / "sharded"), quiet=True)
  a, b = th.losses(str(tmp_path / "dp")), th.losses(str(tmp_path / "sharded"))
  np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=2e-5)
  assert dp["step"] == sh["step"] == 3


def test_checkpoint_of_another_architecture_is_a_user_error(tmp_path):
  from vlm_jax.errors import UserError
  wd = str(tmp_path / "run")
  runner.pretrain(th.micro_config(total_steps=2), wd, quiet=True)
  wider = th.micro_config(total_steps=4, **{"model.text.width": 48})
  with pytest.raises(UserError, match="another architecture"):
    runner.pretrain(wider, wd, quiet=True)
