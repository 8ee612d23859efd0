"""Checks that keep a run directory usable: free space before a checkpoint, no NaN/Inf in what a checkpoint holds.

Disk space. A checkpoint about to be written needs about the space the newest finished checkpoint of the same
run takes on disk (its files' allocated blocks); before the first one, at least `1.25 × bytes of the state's
arrays + 256 KiB` (a lower bound: orbax's OCDBT files take several times the arrays' bytes on some file
systems). `check_space` raises `UserError` when the file system has less free space than that, before anything
is written; a save that still runs out of space (`ENOSPC`, which orbax/tensorstore report from their background
writes as `ValueError: RESOURCE_EXHAUSTED … [os_error_code='28']`) is recognised by `is_no_space` and reported
the same way by `no_space_error`. Orbax also logs that failure from each of its threads with a traceback, and
its write tasks and tensorstore writes still in flight report it again (`Task exception was never retrieved`,
`Event loop is closed`) when they finish after it: `quiet_no_space` drops exactly those reports, so the run
ends with the one `error:` line.

Non-finite values. Training never applies a non-finite update (`train/step.py`), so a checkpoint holding NaN or
Inf was damaged after the fact; readers refuse it (`nonfinite_path` names the first such array).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from typing import Any

import numpy as np

from vlm_jax.errors import UserError

FIRST_SAVE_FACTOR, FIRST_SAVE_MARGIN = 1.25, 256 * 1024
_ENOSPC_MARKERS = ("No space left on device", "os_error_code='28'", "os_error_code=28")


def is_no_space(e: BaseException | None) -> bool:
  """True when `e` (or an exception it was raised from) is a full file system: `OSError` with errno ENOSPC, or
  tensorstore's RESOURCE_EXHAUSTED write error carrying the OS error code 28."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(m in str(e) for m in _ENOSPC_MARKERS):
      return True
    e = e.__cause__ or e.__context__
  return False


class _NoSpaceLogFilter(logging.Filter):
  """Drops log records about a full disk (orbax's background-thread errors, with their tracebacks)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (is_no_space(exc) or any(m in record.getMessage() for m in _ENOSPC_MARKERS))


_FILTER = _NoSpaceLogFilter()


def quiet_no_space() -> None:
  """Installs (once) the filter dropping full-disk reports on the `absl` logger (orbax's threads) and the
  `asyncio` logger (its write tasks: 'Task exception was never retrieved'), and the hooks of
  `ignore_closed_loop_reports`."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)
  ignore_closed_loop_reports()


def _closed_loop_report(e: BaseException | None, tb) -> bool:
  """True for `RuntimeError: Event loop is closed` raised by asyncio itself when called from native code (a
  tensorstore write finishing after orbax's save failed and closed its loop): only asyncio frames."""
  if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
    return False
  frames = []
  while tb is not None:
    frames.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return bool(frames) and all(f"{os.sep}asyncio{os.sep}" in f for f in frames)


def ignore_closed_loop_reports() -> None:
  """Installs (once) hooks dropping the reports of tensorstore writes still in flight when a save failed (disk
  full): they finish after orbax closed its event loop and report `RuntimeError: Event loop is closed` from
  native code. Only that exact report, raised within asyncio alone, is dropped."""
  hook, unraisable = sys.excepthook, sys.unraisablehook
  if getattr(hook, "_vlm_jax_quiet", False):
    return

  def excepthook(kind, value, tb):
    if not _closed_loop_report(value, tb):
      hook(kind, value, tb)

  def unraisablehook(info):
    if not _closed_loop_report(info.exc_value, info.exc_traceback):
      unraisable(info)

  excepthook._vlm_jax_quiet = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _mb(n: float) -> str:
  return f"{n / 2**20:.1f} MB"


def free_bytes(path: str) -> int | None:
  """Free bytes (for an unprivileged user) on the file system holding `path` (or its nearest existing parent);
  None where that cannot be told (not a local path)."""
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return int(shutil.disk_usage(path).free)
  except OSError:
    return None


def footprint(path: str) -> int:
  """Bytes the files under `path` occupy on disk (allocated blocks, as `du` counts them)."""
  total = 0
  for d, _, files in os.walk(path):
    for f in files:
      try:
        st = os.lstat(os.path.join(d, f))
      except OSError:
        continue
      total += getattr(st, "st_blocks", 0) * 512 or st.st_size
  return total


def tree_nbytes(tree: Any) -> int:
  """Bytes of the (global) arrays of a pytree."""
  import jax  # noqa: PLC0415
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "shape") and hasattr(x, "dtype"))


def bytes_needed(root: str, state: Any, steps: list[int]) -> int:
  """Estimated bytes a new checkpoint under `root` takes: the newest finished step's footprint, else a lower
  bound from the state's array bytes (see the module docstring)."""
  if steps:
    return footprint(os.path.join(root, str(steps[-1])))
  return int(FIRST_SAVE_FACTOR * tree_nbytes(state)) + FIRST_SAVE_MARGIN


def no_space_error(path: str, needed: int | None, free: int | None = None, *, ran_out: bool = False) -> UserError:
  """The one-line `UserError` for a write that does not fit (`ran_out`: it was tried and failed, so it needs
  more than the estimate `needed`)."""
  free = (free_bytes(path) or 0) if free is None else free
  if ran_out:
    need = f"needs more than the {_mb(free)} free (estimated ~{_mb(needed)})" if needed else f"{_mb(free)} free"
  else:
    need = f"needs ~{_mb(needed)}, {_mb(free)} free"
  return UserError(f"no space left on device for {path}: {need}; free some space (or move the workdir to a "
                   "larger disk) and rerun the same command to resume from the last checkpoint")


def check_space(path: str, needed: int) -> None:
  """`UserError` naming `path` (to be written) unless its file system has `needed` bytes free, on every process
  (the decision is taken together so that no process waits for another in a collective)."""
  import jax  # noqa: PLC0415
  free = free_bytes(path)
  short = np.array([free is not None and free < needed, free or 0, needed], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    every = np.asarray(multihost_utils.process_allgather(short)).reshape(-1, 3)
    worst = every[int(np.argmax(every[:, 0]))]
    short = worst
  if short[0]:
    raise no_space_error(path, int(short[2]), int(short[1]))


def nonfinite_path(tree: Any) -> str | None:
  """'/'-joined path of the first floating-point array of `tree` holding NaN or Inf, or None. Arrays may be
  numpy or (sharded) jax.Arrays: the reduction runs where they live and only one flag per array is fetched."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not flat:
    return None
  arrays = [x for _, x in flat]
  if all(isinstance(x, np.ndarray) or np.isscalar(x) for x in arrays):
    flags = [bool(np.isfinite(x).all()) for x in arrays]
  else:
    flags = jax.device_get(jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])(arrays))
  for (path, _), ok in zip(flat, flags):
    if not bool(ok):
      return "/".join(_key_name(k) for k in path)
  return None


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def check_finite(tree: Any, where: str) -> None:
  """`UserError` naming `where` (a checkpoint) and the array when `tree` holds NaN or Inf."""
  bad = nonfinite_path(tree)
  if bad is not None:
    raise UserError(f"checkpoint {where} holds non-finite values (NaN or Inf) in {bad}; it is refused (training "
                    "never writes them: the files were changed or damaged); delete it to use an earlier "
                    "checkpoint")
