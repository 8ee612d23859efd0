"""Reading and writing run directories: resolve a path, read its config, load its variables, save a model.

A run directory is what pre-training, transfer and distillation write and what `python -m vlm_jax.convert` writes
for a converted open_clip / OpenAI / Hugging Face model:

  DIR/config.json                    the run config (human-readable copy)
  DIR/checkpoints/<step>/state       orbax `TrainState`: step, params, frozen, extra (= other variable
                                     collections, e.g. a ResNet's {'batch_stats'}), opt_state, rng, skipped_steps,
                                     loss_guard (the loss-spike guard's window; empty when it is off)
  DIR/checkpoints/<step>/config      the run config as JSON
  DIR/checkpoints/<step>/data        the data-iterator state (one file per process; training runs only)

A path names a run by any of `DIR`, `DIR/checkpoints` or `DIR/checkpoints/<step>`; without a step the newest
*readable* one is used: a step whose files are truncated, missing or unreadable is skipped with a one-line warning
naming it (`newest_readable`); a step holding NaN or Inf is refused (`UserError` naming it and the array). Everything here reads on the host as numpy, whatever mesh wrote the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, NamedTuple

import numpy as np

from vlm_jax.errors import UserError

log = logging.getLogger("vlm_jax")

STATE, CONFIG, DATA = "state", "config", "data"


class Run(NamedTuple):
  """A loaded run or converted model: its config (ConfigDict), `model.apply` variables (numpy), the step read,
  the checkpoints root and the run directory (the folder holding `checkpoints/`)."""
  config: Any
  variables: dict
  step: int
  root: str
  directory: str


def steps(root: str) -> list[int]:
  """Finished checkpoint steps under a `checkpoints/` root, ascending (orbax's temporary folders are not steps)."""
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, STATE)))


def resolve(path: str) -> tuple[str, int | None]:
  """(checkpoints root, step or None) for `DIR`, `DIR/checkpoints` or `DIR/checkpoints/<step>`.

  The step is None unless the path names one (then the newest readable step is meant); raises `UserError` when
  the path holds no vlm_jax checkpoint."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise UserError(f"checkpoint directory {path} does not exist")
  if os.path.isdir(os.path.join(path, STATE)) and os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  for root in (path, os.path.join(path, "checkpoints")):
    if steps(root):
      return root, None
  raise UserError(f"no vlm_jax checkpoint found in {path}")


def run_directory(root: str) -> str:
  """The run directory of a checkpoints root (its parent when it is called `checkpoints`)."""
  return os.path.dirname(root) if os.path.basename(root) == "checkpoints" else root


def one_line(e: BaseException) -> str:
  return " ".join(str(e).split())[:300] or type(e).__name__


def newest_readable(root: str, read: Callable[[int], Any], *, step: int | None = None,
                    on_unreadable: Callable[[int, BaseException], None] | None = None) -> tuple[int, Any]:
  """(step, read(step)) for the newest step of `root` that `read` can read, or for `step` when given.

  A step whose `read` raises anything but `UserError` (truncated, missing or unreadable files) is skipped with a
  one-line warning naming it (and reported to `on_unreadable`); `UserError` (a checkpoint of another
  architecture) propagates. Raises `UserError` when no step is readable."""
  candidates = [step] if step is not None else list(reversed(steps(root)))
  errors = []
  for s in candidates:
    try:
      return s, read(s)
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 (any failure to read a checkpoint's files means it is unusable)
      errors.append(f"step {s}: {type(e).__name__}: {one_line(e)}")
      log.warning("checkpoint %s/%d is unreadable and is skipped (%s)", root, s, one_line(e))
      if on_unreadable is not None:
        on_unreadable(s, e)
  raise UserError(f"no readable checkpoint in {root} ({'; '.join(errors)[:400] or 'none found'})")


def _read_json_item(root: str, step: int) -> dict:
  import orbax.checkpoint as ocp  # noqa: PLC0415
  path = os.path.join(root, str(step), CONFIG)
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


def _restore_state_host(root: str, step: int, items: tuple[str, ...]) -> dict:
  """The `items` subtrees of the `TrainState` at `root/step`, as numpy, without a target tree (so it works
  whatever mesh the checkpoint was written on)."""
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from absl import logging as absl_logging  # noqa: PLC0415
  path = os.path.join(root, str(step), STATE)
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


def merge_trees(*trees: dict) -> dict:
  """Nested dicts merged leaf by leaf (later trees win)."""
  from flax import traverse_util  # noqa: PLC0415
  flat = {}
  for t in trees:
    flat.update(traverse_util.flatten_dict(t or {}, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def _variables_at(root: str, step: int) -> dict:
  from vlm_jax.runs import reference  # noqa: PLC0415 (reference reads sources through this module)
  state = _restore_state_host(root, step, ("params", "frozen", "extra"))
  if "params" not in state:
    raise ValueError("the checkpoint holds no parameters")
  from vlm_jax.runs import guards  # noqa: PLC0415
  guards.check_finite(state, f"{root}/{step}")  # NaN/Inf: refused, never skipped for an older step
  by_reference = reference.frozen_params(run_directory(root))  # frozen weights kept by reference, if any
  return {"params": merge_trees(by_reference, state.get("params"), state.get("frozen")),
          **(state.get("extra") or {})}


def load_variables(path: str) -> dict:
  """Every variable collection of the checkpoint at `path` (see `resolve`), as numpy: {'params': trainable and
  frozen merged, plus the other collections, e.g. a ResNet's 'batch_stats'}."""
  root, step = resolve(path)
  return newest_readable(root, lambda s: _variables_at(root, s), step=step)[1]


def load(path: str) -> Run:
  """The config, variables and step of the run or converted model at `path` (see `resolve`); the newest step
  whose config and variables both read."""
  import ml_collections  # noqa: PLC0415
  root, step = resolve(path)

  def read(s):
    try:
      saved = _read_json_item(root, s)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"no readable saved config ({one_line(e)})") from None
    return ml_collections.ConfigDict(saved), _variables_at(root, s)

  step, (config, variables) = newest_readable(root, read, step=step)
  return Run(config, variables, step, root, run_directory(root))


def read_config(path: str):
  """The saved run config (ConfigDict) of the checkpoint at `path` (see `resolve`), without loading variables."""
  import ml_collections  # noqa: PLC0415
  root, step = resolve(path)
  return ml_collections.ConfigDict(newest_readable(root, lambda s: _read_json_item(root, s), step=step)[1])


def fingerprint(path: str) -> str:
  """sha256 over the relative names and bytes of every file of the checkpoint step at `path` (see `resolve`):
  identifies the exact weights a transfer or distillation run was built on (a changed model is refused)."""
  root, step = resolve(path)
  step = step if step is not None else steps(root)[-1]
  base = os.path.join(root, str(step))
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(base):
    dirnames.sort()
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      h.update(os.path.relpath(full, base).encode() + b"\0")
      with open(full, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
  return h.hexdigest()


def check_output_dir(out_dir: str) -> str:
  """`out_dir` as an absolute, new or empty, writable directory (created); `UserError` otherwise."""
  out_dir = os.path.abspath(out_dir)
  if os.path.isfile(out_dir):
    raise UserError(f"output {out_dir} is a file; give a directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise UserError(f"output directory {out_dir} is not empty; choose a new directory")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create {out_dir}: {e.strerror or e}") from None
  return out_dir


def save_model(out_dir: str, config, variables: dict, *, step: int = 0) -> str:
  """Writes a model (a full run config and its `model.apply` variables) as a run directory at step `step`, the
  layout pre-training writes, so every reader (evaluate, inference, init, convert --to) takes it; `out_dir`
  must be new or empty. Returns it."""
  from vlm_jax.runs.checkpointer import Checkpointer  # noqa: PLC0415
  out_dir = check_output_dir(out_dir)
  variables = dict(variables)
  state = {"step": np.int32(step), "params": variables.pop("params")}
  if variables:  # other collections (a ResNet's batch_stats), stored where training stores them
    state["extra"] = variables
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config_json)
  ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=1, async_save=False)
  try:
    ckpt.save(step, state, config=json.loads(config_json), force=True)
  finally:
    ckpt.close()
  return out_dir
