"""Evaluation plots (PNG, matplotlib Agg): zero-shot confusion matrix, top retrieval results per query,
linear-probe validation accuracy against the L2 strength. Callers write them under `DIR/plots/`."""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np


def _pyplot():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def _save(fig, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  _pyplot().close(fig)


def confusion_matrix_png(cm: np.ndarray, class_names: Sequence[str], path: str, title: str = "") -> None:
  """Row-normalised confusion matrix (true class × predicted class); names on the axes up to 64 classes."""
  plt = _pyplot()
  c = len(class_names)
  rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
  side = min(14.0, 3.0 + 0.16 * c)
  fig, ax = plt.subplots(figsize=(side, side), dpi=100)
  im = ax.imshow(rows, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
  if c <= 64:
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    font = max(4, min(9, int(400 / max(c, 1))))
    ax.set_xticklabels(class_names, rotation=90, fontsize=font)
    ax.set_yticklabels(class_names, fontsize=font)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title or "zero-shot confusion matrix")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
  fig.tight_layout()
  _save(fig, path)


def retrieval_grid_png(queries: Sequence[str], images: np.ndarray, top: np.ndarray, correct: np.ndarray,
                       path: str, title: str = "") -> None:
  """Text→image results: one row per query (its text on the left), its top-k images in rank order, framed
  green when correct and red otherwise. `images` uint8 [N, H, W, 3], `top` [Q, k] indices, `correct` [Q, k]."""
  plt = _pyplot()
  q, k = top.shape
  fig, axes = plt.subplots(q, k + 1, figsize=(1.6 * (k + 1.5), 1.6 * q), dpi=100, squeeze=False,
                           gridspec_kw={"width_ratios": [1.5] + [1] * k})
  for r in range(q):
    axes[r, 0].axis("off")
    axes[r, 0].text(0.0, 0.5, "\n".join(textwrap.wrap(queries[r], 22)), va="center", ha="left", fontsize=8)
    for j in range(k):
      ax = axes[r, j + 1]
      ax.imshow(images[top[r, j]], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_edgecolor("tab:green" if correct[r, j] else "tab:red")
        spine.set_linewidth(3)
      if r == 0:
        ax.set_title(f"#{j + 1}", fontsize=8)
  fig.suptitle(title or "text → image: top results (green = the caption's image)", fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def probe_l2_png(l2s: Sequence[float], val_acc: Sequence[float], chosen: float, path: str,
                 train_acc: Sequence[float] | None = None, title: str = "") -> None:
  """Linear-probe accuracy on the validation split (and optionally on its train split) vs L2 strength (log x),
  the chosen strength marked."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
  ax.semilogx(l2s, 100 * np.asarray(val_acc), "o-", color="tab:blue", label="validation")
  if train_acc is not None:
    ax.semilogx(l2s, 100 * np.asarray(train_acc), "s--", color="tab:gray", alpha=0.7, label="train")
  ax.axvline(chosen, color="tab:red", linestyle=":", label=f"chosen λ = {chosen:.2g}")
  ax.set_xlabel("L2 strength λ")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or "linear probe: accuracy vs L2 strength")
  fig.tight_layout()
  _save(fig, path)
