"""Orbax checkpoints: train state, data-iterator state and config, saved asynchronously, keep-N.

Layout: `workdir/checkpoints/<step>/{state, data, config}`. `state` is the sharded `TrainState` (restored straight
into its shardings), `data` the grain iterator state (one file per process, so a multi-host run resumes every
process's stream), `config` the run's config as JSON.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np
import jax
import orbax.checkpoint as ocp

from vlm_jax.errors import UserError


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items every vlm_jax run saves."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, data_iter=None, config: dict | None = None,
           force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, *, data_iter=None) -> Any:
    """Restores `state` into the shardings carried by `abstract_state` (ShapeDtypeStructs with .sharding)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"checkpoint {self.directory}/{step} does not match this model/config "
                      f"(another architecture?): {str(e).splitlines()[0][:300]}") from None
    return restored["state"]

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _state_path(directory: str) -> str:
  """`directory` may be a workdir, its checkpoints/ folder or one step's folder; returns `<step>/state`."""
  directory = os.path.abspath(directory)
  for candidate in (directory, os.path.join(directory, "checkpoints")):
    if os.path.isdir(os.path.join(candidate, "state")):
      return os.path.join(candidate, "state")
    steps = [int(d) for d in os.listdir(candidate) if d.isdigit()] if os.path.isdir(candidate) else []
    if steps:
      return os.path.join(candidate, str(max(steps)), "state")
  raise UserError(f"no vlm_jax checkpoint found in {directory}")


def _restore_host(directory: str, items: tuple[str, ...]) -> dict:
  """The `items` subtrees of the newest TrainState under `directory`, as numpy, without a target tree (so it
  works whatever mesh the checkpoint was written on)."""
  from absl import logging as absl_logging
  path = _state_path(directory)
  ckptr = ocp.PyTreeCheckpointer()
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns that a bare item has no manager metadata
  try:
    tree = ckptr.metadata(path).item_metadata.tree
    tree = {k: tree[k] for k in items if k in tree}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                                            partial_restore=True))
  finally:
    absl_logging.set_verbosity(verbosity)


def _merged_params(state: dict) -> dict:
  from flax import traverse_util
  flat = traverse_util.flatten_dict(state.get("params") or {}, sep="/")
  flat.update(traverse_util.flatten_dict(state.get("frozen") or {}, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def load_params(directory: str) -> dict:
  """All parameters (trainable and frozen, merged) of the newest checkpoint under `directory`, as numpy."""
  return _merged_params(_restore_host(directory, ("params", "frozen")))


def load_variables(directory: str) -> dict:
  """The `model.apply` variables of the newest checkpoint under `directory`, as numpy: {'params': trainable and
  frozen merged, plus the other collections, e.g. a ResNet's 'batch_stats'}."""
  state = _restore_host(directory, ("params", "frozen", "extra"))
  return {"params": _merged_params(state), **(state.get("extra") or {})}


def source_path(path: str, rename: dict | None) -> str:
  """The checkpoint path of this model's parameter `path`: each `rename` item (regex -> replacement, applied in
  order with `re.sub`) rewrites it, e.g. {'^teacher/': 'img/'} reads a frozen teacher from a CLIP image tower."""
  import re
  for pattern, repl in (rename or {}).items():
    path = re.sub(pattern, repl, path)
  return path


def copy_params(target: dict, source: dict, pattern: str, *, source_name: str = "checkpoint",
                rename: dict | None = None) -> dict:
  """Replaces the leaves of `target` whose '/'-path matches `pattern` by the leaves of `source` at the same path,
  or at `source_path(path, rename)` when `rename` maps this model's paths to the checkpoint's."""
  import re
  from flax import traverse_util
  rx = re.compile(pattern)
  tgt = traverse_util.flatten_dict(target, sep="/")
  src = traverse_util.flatten_dict(source, sep="/")
  hits = [k for k in tgt if rx.search(k)]
  if not hits:
    raise UserError(f"init.params={pattern!r} matches no parameter of this model")
  for k in hits:
    s = source_path(k, rename)
    if s not in src:
      raise UserError(f"{source_name} has no parameter {s!r} (another architecture?)")
    if tuple(src[s].shape) != tuple(tgt[k].shape):
      raise UserError(f"{source_name} parameter {s!r} has shape {tuple(src[s].shape)}, "
                      f"this model needs {tuple(tgt[k].shape)} for {k!r} (another architecture?)")
    tgt[k] = np.asarray(src[s]).astype(tgt[k].dtype)
  return traverse_util.unflatten_dict(tgt, sep="/")
