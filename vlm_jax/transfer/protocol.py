"""The few-shot and base-to-novel protocol: accuracy / mAP, validation-only model selection, aggregation over seeds.

- Few-shot (CoOp, Zhou et al. 2022): k ∈ {1, 2, 4, 8, 16} shots per class × seeds {1, 2, 3}; top-1 on the full
  test split; mean ± std over seeds (std with ddof=0 over the seeds run).
- Base-to-novel (CoCoOp, Zhou et al. 2022): train on the base half of the classes (`datasets.base_novel`), test
  on the base classes' test images among the base classes and on the novel classes' test images among the novel
  classes; report both and their harmonic mean H = 2·b·n / (b + n).
- Multi-label (DualCoOp, Sun et al. 2022): mAP, the mean over classes of the average precision of each class's
  scores over the images (`vlm_jax.evaluate.zeroshot.average_precision_per_class`, the one definition).
- Model selection: the epoch to keep is the evaluation step with the best validation score, top-1 or mAP
  (`METRICS`; k-shot validation carved from the training split; ties keep the earlier step). `Selector` is the
  loop's evaluator that does it (files under `DIR/selection/`; a resumed run selects exactly as an uninterrupted
  one). The test split is never touched here.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Sequence

import numpy as np
from flax import traverse_util


def harmonic_mean(a: float, b: float) -> float:
  return 0.0 if a + b <= 0 else 2.0 * a * b / (a + b)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
  return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def top1(logits_fn: Callable, variables, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
  """Top-1 accuracy (ties between the label and another class count as wrong) of `logits_fn(variables, x)`
  over `images` in fixed-size, mesh-sharded batches."""
  from vlm_jax.embedding.batched import apply_batched, current_mesh  # noqa: PLC0415
  if len(labels) == 0:
    return float("nan")
  logits = apply_batched(logits_fn, variables, images, batch_size, current_mesh())
  mine = logits[np.arange(len(labels)), labels]
  others = np.where(np.arange(logits.shape[1])[None] == labels[:, None], -np.inf, logits)
  return float(np.mean(mine > others.max(axis=1)))


def mean_ap(logits_fn: Callable, variables, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
  """mAP of the per-class scores `logits_fn(variables, x)` against multi-hot `labels` [N, C] (module docstring)."""
  from vlm_jax.embedding.batched import apply_batched, current_mesh  # noqa: PLC0415
  from vlm_jax.evaluate.zeroshot import average_precision_per_class  # noqa: PLC0415
  if len(labels) == 0:
    return float("nan")
  scores = apply_batched(logits_fn, variables, images, batch_size, current_mesh())
  return float(np.mean(average_precision_per_class(scores, labels)))


METRICS = {"top1": top1, "mAP": mean_ap}  # the test metric of single-label and of multi-label datasets


def trainable_of(variables: dict, frozen: str) -> dict:
  """The '/'-joined params whose path does not match `frozen`, as numpy."""
  rx = re.compile(frozen) if frozen else None
  flat = traverse_util.flatten_dict(dict(variables["params"]), sep="/")
  return {k: np.asarray(v) for k, v in flat.items() if rx is None or not rx.search(k)}


class Selector:
  """The validation evaluator of a transfer run (`fn(variables) -> {'val/<metric>': …}`, metric 'top1' or 'mAP')
  that keeps the best step.

  `steps` lists the steps at which the loop will call it from `resume_step` on, so each call knows its step.
  `DIR/selection/history.json` holds {step: val score} of every evaluation; a step whose score beats every
  earlier one stores its trainable parameters in `step_<n>.npz`. A resumed run forgets the evaluations after
  its checkpoint (they are redone with the same parameters), so it selects exactly as an uninterrupted run.
  """

  def __init__(self, workdir: str, logits_fn: Callable, images: np.ndarray, labels: np.ndarray, *,
               frozen: str, steps: Sequence[int], resume_step: int = 0, batch_size: int = 256,
               metric: str = "top1"):
    self.dir = os.path.join(workdir, "selection")
    self.metric, self.score = metric, METRICS[metric]
    self.logits_fn, self.images, self.labels = logits_fn, images, labels
    self.frozen, self.steps, self.batch_size = frozen, list(steps), batch_size
    self.history = {s: a for s, a in self._read().items() if s <= resume_step}
    for name in os.listdir(self.dir) if os.path.isdir(self.dir) else ():
      m = re.fullmatch(r"step_(\d+)\.npz", name)
      if m and int(m.group(1)) > resume_step:
        os.remove(os.path.join(self.dir, name))

  def _read(self) -> dict[int, float]:
    path = os.path.join(self.dir, "history.json")
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return {int(k): float(v) for k, v in json.load(f).items()}

  def best(self) -> tuple[int, float] | None:
    """(step, val score) of the selected step: the best score, the earliest step on ties."""
    if not self.history:
      return None
    step = min(self.history, key=lambda s: (-self.history[s], s))
    return step, self.history[step]

  def __call__(self, variables) -> dict:
    step = self.steps.pop(0) if self.steps else max(self.history, default=0) + 1
    acc = self.score(self.logits_fn, variables, self.images, self.labels, self.batch_size)
    earlier = [a for s, a in self.history.items() if s < step]
    self.history[step] = acc
    os.makedirs(self.dir, exist_ok=True)
    if not earlier or acc > max(earlier):
      tmp = os.path.join(self.dir, f"step_{step}.tmp.npz")
      np.savez(tmp, **trainable_of(variables, self.frozen))
      os.replace(tmp, os.path.join(self.dir, f"step_{step}.npz"))
    with open(os.path.join(self.dir, "history.json.tmp"), "w") as f:
      json.dump({str(k): v for k, v in sorted(self.history.items())}, f)
    os.replace(os.path.join(self.dir, "history.json.tmp"), os.path.join(self.dir, "history.json"))
    return {f"val/{self.metric}": acc}

  def load_best(self) -> tuple[int, dict] | None:
    """(selected step, its trainable params, nested) or None when nothing was evaluated."""
    best = self.best()
    if best is None:
      return None
    with np.load(os.path.join(self.dir, f"step_{best[0]}.npz")) as z:
      return best[0], traverse_util.unflatten_dict({k: z[k] for k in z.files}, sep="/")
