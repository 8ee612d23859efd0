"""Run outputs: `metrics.jsonl`, TensorBoard events, the progress bar and the loss-curve plot.

Only process 0 writes. Every JSON line carries `step`. On resume, lines past the restored step (written by the
interrupted run after its last checkpoint) are dropped, so `metrics.jsonl` reads as one uninterrupted run. A full
disk while writing a line stops the run with a `UserError` naming the file (`no_space_as_user_error`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Mapping

import jax
import numpy as np


def _scalar(v):
  v = np.asarray(v)
  if v.dtype == bool:
    return bool(v)
  if np.issubdtype(v.dtype, np.integer):
    return int(v)
  f = float(v)
  return f if math.isfinite(f) else str(f)


class MetricsWriter:
  """Appends `{'step': s, **metrics}` lines to DIR/metrics.jsonl and scalars to TensorBoard (DIR/tb)."""

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    if resume_step is not None and os.path.exists(self.path):
      kept = [ln for ln in read_jsonl(self.path, skip_broken=True) if ln["step"] <= resume_step]
      with no_space_as_user_error(self.path), open(self.path, "w") as f:
        f.writelines(json.dumps(ln) + "\n" for ln in kept)
    elif resume_step is None and os.path.exists(self.path):
      os.remove(self.path)
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Mapping[str, object]) -> dict:
    row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    if self.enabled:
      with no_space_as_user_error(self.path), open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, global_step=int(step))
    return row

  def close(self) -> None:
    if self._tb is not None:
      with no_space_as_user_error(os.path.join(os.path.dirname(self.path), "tb")):
        self._tb.close()


@contextlib.contextmanager
def no_space_as_user_error(path: str):
  """An `OSError` ENOSPC (disk full) inside the block becomes the one-line `UserError` naming `path`."""
  try:
    yield
  except OSError as e:
    from vlm_jax.runs import guards  # noqa: PLC0415
    if guards.is_no_space(e):
      raise guards.no_space_error(path, None, ran_out=True) from None
    raise


def read_jsonl(path: str, *, skip_broken: bool = False) -> list[dict]:
  """The rows of a JSON-lines file; `skip_broken` drops lines that do not parse (a write cut short by a full
  disk or a kill)."""
  rows = []
  with open(path) as f:
    for ln in f:
      if ln.strip():
        try:
          rows.append(json.loads(ln))
        except json.JSONDecodeError:
          if not skip_broken:
            raise
  return rows


def plot_loss(metrics_path: str, out_png: str) -> None:
  """Loss curve (and learning rate) from metrics.jsonl to a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in read_jsonl(metrics_path) if isinstance(r.get("loss"), float)]
  if not rows:
    return
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", label="loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  if "learning_rate" in rows[0]:
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["learning_rate"] for r in rows], color="tab:orange", alpha=0.6,
             label="learning rate")
    ax2.set_ylabel("learning rate")
  ax.set_title("training loss")
  fig.tight_layout()
  os.makedirs(os.path.dirname(out_png), exist_ok=True)
  fig.savefig(out_png)
  plt.close(fig)


class ProgressBar:
  """tqdm bar over steps with loss, img/s and ETA (process 0 only)."""

  def __init__(self, total: int, initial: int):
    self.bar = None
    if jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0,
                      smoothing=0.1)

  def update_to(self, step: int, **postfix) -> None:
    if self.bar is not None:
      if postfix:
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                             refresh=False)
      self.bar.update(step - self.bar.n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
