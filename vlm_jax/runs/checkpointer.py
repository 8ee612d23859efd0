"""Orbax checkpoints of a training run: the state, the data-iterator state and the config, asynchronous, keep-N.

`Checkpointer` writes `checkpoints/<step>/{state, data, config}` (see `runs.directory`). `state` is the sharded
`TrainState`, restored straight into its shardings; `data` the grain iterator state, one file per process, so a
multi-host run resumes every process's stream; `config` the run config as JSON.

Resume (`restore_newest`) takes the newest checkpoint that reads: one whose files are truncated, missing or
unreadable is skipped with a one-line warning naming it and moved aside to `checkpoints/unreadable-<step>` (kept
for inspection; the run will write that step again), and the run resumes from the one before, exactly. A
checkpoint whose arrays do not fit the run's state (another architecture or optimizer) is a `UserError`, never
skipped. When no checkpoint reads at all the run stops with a `UserError` (all of them moved aside: a rerun
starts afresh). A checkpoint holding NaN or Inf is refused with a `UserError` naming it and the array
(`guards.check_finite`: training never writes one, so it was damaged). Orbax writes a step into a temporary
folder and renames it when complete, so a half-written asynchronous save is never a step.

A full disk stops the run with a `UserError` naming the step's folder and the space needed: `save` first
checks the free space (`guards.check_space`, about the size of the newest checkpoint) and writes nothing when it
is short; a save that runs out of space anyway (orbax reports it from its background thread at the next `save`,
`wait` or `close`) has its temporary folder removed, so the newest finished checkpoint stays the step to resume
from. Leftover temporary folders of a killed run are removed when the next run opens the checkpoints.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import os
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from vlm_jax.errors import UserError
from vlm_jax.runs import directory, guards


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
    guards.quiet_no_space()
    self._pending: tuple[int, int] | None = None  # (step, bytes needed) of the save in flight
    try:
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save))
    except Exception as e:
      if guards.is_no_space(e):
        raise guards.no_space_error(self.directory, None) from None
      raise

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, data_iter=None, config: dict | None = None,
           force: bool = False) -> bool:
    """Saves asynchronously after the previous save finished; `UserError` when the disk is (or gets) full."""
    self.wait()
    needed = guards.bytes_needed(self.directory, state, directory.steps(self.directory))
    guards.check_space(os.path.join(self.directory, str(step)), needed)
    items = {directory.STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[directory.DATA] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items[directory.CONFIG] = ocp.args.JsonSave(config)
    self._pending = (step, needed)
    with self._no_space_as_user_error():
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if not saved:
      self._pending = None
    return saved

  @contextlib.contextmanager
  def _no_space_as_user_error(self):
    """A full disk during the pending save -> its temporary folder removed, then `UserError` naming the step."""
    try:
      yield
    except Exception as e:
      if self._pending is None or not guards.is_no_space(e):
        raise
      step, needed = self._pending
      self._pending = None
      self._remove_temporary(step)
      raise guards.no_space_error(os.path.join(self.directory, str(step)), needed, ran_out=True) from None

  def _remove_temporary(self, step: int) -> None:
    """Removes the half-written temporary folder(s) of `step` (process 0), so that no trace of it remains."""
    if jax.process_index() != 0:
      return
    for path in glob.glob(os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")):
      shutil.rmtree(path, ignore_errors=True)

  def _check_fits(self, step: int, abstract_state: Any) -> Any:
    """`UserError` when the arrays stored at `step` are not the arrays of `abstract_state` (architecture);
    returns the stored tree's metadata."""
    path = os.path.join(self.directory, str(step), directory.STATE)
    stored = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree  # unreadable -> skipped by the caller
    have, want = _shape_counts(stored), _shape_counts(abstract_state)
    if have != want:
      extra, missing = list((have - want).elements())[:3], list((want - have).elements())[:3]
      raise UserError(f"checkpoint {self.directory}/{step} does not match this model/config (another "
                      f"architecture, optimizer or loss_spike_factor on/off?): it has arrays {extra} where this "
                      f"run needs {missing}")
    return stored

  def restore(self, step: int, abstract_state: Any, *, data_iter=None) -> Any:
    """Restores `state` at `step` into the shardings carried by `abstract_state` (ShapeDtypeStructs with
    .sharding), and the data iterator when given; `UserError` when it holds NaN or Inf."""
    stored = self._check_fits(step, abstract_state)
    target, absent = _without_absent_empty_fields(abstract_state, stored)
    items = {directory.STATE: ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items[directory.DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    state = self.manager.restore(step, args=ocp.args.Composite(**items))[directory.STATE]
    if absent:
      state = abstract_state.replace(**state, **absent)
    guards.check_finite(state, f"{self.directory}/{step}")
    return state

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
    """Waits for the save in flight; `UserError` (its temporary folder removed) when it ran out of space."""
    with self._no_space_as_user_error():
      self.manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    self.wait()
    self.manager.close()


def _without_absent_empty_fields(abstract_state: Any, stored: Any) -> tuple[Any, dict]:
  """(target, absent): a checkpoint written before a `TrainState` field was added (e.g. `loss_guard`, {} when
  the guard is off) lacks it; such empty fields are left out of the restore target (a dict of the other fields)
  and put back afterwards, so older checkpoints still resume. Otherwise (abstract_state, {})."""
  if not dataclasses.is_dataclass(abstract_state) or not isinstance(stored, dict):
    return abstract_state, {}
  names = [f.name for f in dataclasses.fields(abstract_state)]
  absent = {n: getattr(abstract_state, n) for n in names
            if n not in stored and not jax.tree.leaves(getattr(abstract_state, n))}
  if not absent:
    return abstract_state, {}
  return {n: getattr(abstract_state, n) for n in names if n not in absent}, absent


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
