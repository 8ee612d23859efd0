"""Orbax checkpoints of a training run: the state, the data-iterator state and the config, asynchronous, keep-N.

`Checkpointer` writes `checkpoints/<step>/{state, data, config}` (see `runs.directory`). `state` is the sharded
`TrainState`, restored straight into its shardings; `data` the grain iterator state, one file per process, so a
multi-host run resumes every process's stream; `config` the run config as JSON.

Resume (`restore_newest`) takes the newest checkpoint that reads: one whose files are truncated, missing or
unreadable is skipped with a one-line warning naming it and moved aside to `checkpoints/unreadable-<step>` (kept
for inspection; the run will write that step again), and the run resumes from the one before, exactly. A
checkpoint whose arrays do not fit the run's state (another architecture or optimizer) is a `UserError`, never
skipped. When no checkpoint reads at all the run stops with a `UserError` (all of them moved aside: a rerun
starts afresh). Orbax writes a step into a temporary folder and renames it when complete, so a half-written
asynchronous save is never a step.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from vlm_jax.errors import UserError
from vlm_jax.runs import directory


def _shape_counts(tree: Any) -> collections.Counter:
  """Multiset of (shape, dtype) over a tree's array leaves (orbax metadata or ShapeDtypeStructs)."""
  out = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out[(tuple(int(d) for d in shape), str(getattr(leaf, "dtype", "")))] += 1
  return out


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items every vlm_jax run saves."""

  def __init__(self, root: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(root)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, data_iter=None, config: dict | None = None,
           force: bool = False) -> bool:
    items = {directory.STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[directory.DATA] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items[directory.CONFIG] = ocp.args.JsonSave(config)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    """`UserError` when the arrays stored at `step` are not the arrays of `abstract_state` (architecture)."""
    path = os.path.join(self.directory, str(step), directory.STATE)
    stored = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree  # unreadable -> skipped by the caller
    have, want = _shape_counts(stored), _shape_counts(abstract_state)
    if have != want:
      extra, missing = list((have - want).elements())[:3], list((want - have).elements())[:3]
      raise UserError(f"checkpoint {self.directory}/{step} does not match this model/config (another "
                      f"architecture or optimizer?): it has arrays {extra} where this run needs {missing}")

  def restore(self, step: int, abstract_state: Any, *, data_iter=None) -> Any:
    """Restores `state` at `step` into the shardings carried by `abstract_state` (ShapeDtypeStructs with
    .sharding), and the data iterator when given."""
    self._check_fits(step, abstract_state)
    items = {directory.STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items[directory.DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))[directory.STATE]

  def restore_newest(self, abstract_state: Any, *, data_iter=None) -> tuple[Any, int] | tuple[None, None]:
    """(state, step) of the newest readable checkpoint, or (None, None) when there is none (a fresh run).

    Unreadable steps are skipped with a warning and moved aside (process 0), so a later save of the same step
    succeeds; a checkpoint of another architecture raises `UserError`."""
    if not directory.steps(self.directory):
      return None, None
    try:
      step, state = directory.newest_readable(
          self.directory, lambda s: self.restore(s, abstract_state, data_iter=data_iter),
          on_unreadable=self._move_aside)
    finally:
      self.manager.reload()
    return state, step

  def _move_aside(self, step: int, error: BaseException) -> None:
    del error
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst = os.path.join(self.directory, f"unreadable-{step}-{int(time.time())}")
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices(f"vlm_jax_unreadable_checkpoint_{step}")

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[directory.CONFIG]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
