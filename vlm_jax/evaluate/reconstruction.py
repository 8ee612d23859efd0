"""Masked-image reconstruction on held-out synthetic images: loss against mean-patch baselines, and PNGs.

For each held-out image (the 'eval_retrieval' scenes of the synthetic default: drawn like training scenes from
their own random stream) the model masks patches with a fixed rng (`seed`) and predicts them; reported, over the
masked patches of all images (the MAE loss, He et al. 2022, §3):

    reconstruction/loss                  = Σ m · mean_d (ŷ − y)² / Σ m
    reconstruction/baseline_mean_patch   = the same for ŷ = ȳ, the mean target patch over all patches of all
                                           evaluation images (the best constant prediction; it sees the test
                                           targets, so it is a generous baseline)
    reconstruction/baseline_visible_mean = the same for ŷ = the mean target of the image's visible patches
    reconstruction/mask_ratio            = Σ m / (B · N)

A model learns when `loss` is below both baselines. With pixel targets and plots on, `plot_dir/reconstruction.png`
shows one image per row: original | masked (masked patches grey) | reconstruction (visible patches pasted from the
original, as MAE's figures; norm_pix predictions are mapped back to pixels with each true patch's mean and standard
deviation, so a patch's colour level comes from the original and its structure from the model).

The model must return outputs['mim'] = {'pred', 'target', 'mask'} from `model.apply(v, {'image': x},
rngs={'mask': k})` (framework 'mae').
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.parallel import mesh as mesh_lib

DEFAULTS = {"num_images": 256, "batch_size": 128, "image_size": 0, "seed": 0, "plots": True, "plot_images": 8}


def _stats(pred, target, mask, image_tokens_mean):
  """Per-image sums: [squared error · m, baseline-mean-patch error · m (of the given mean), visible-mean error · m,
  Σ m] — everything but the dataset-mean baseline, which needs the dataset mean first."""
  m = mask.astype(jnp.float32)
  err = jnp.mean(jnp.square(pred - target), axis=-1)
  vis = 1. - m
  vis_mean = jnp.sum(target * vis[..., None], axis=1) / jnp.maximum(jnp.sum(vis, axis=1), 1.)[..., None]
  err_vis = jnp.mean(jnp.square(vis_mean[:, None] - target), axis=-1)
  err_const = jnp.mean(jnp.square(image_tokens_mean[None, None] - target), axis=-1)
  return jnp.stack([jnp.sum(err * m, 1), jnp.sum(err_const * m, 1), jnp.sum(err_vis * m, 1), jnp.sum(m, 1),
                    jnp.full(m.shape[:1], m.shape[1], jnp.float32)], axis=1)


def reconstruction_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
  """The module docstring's metrics from pred/target [B, N, D] and mask [B, N] (numpy, host side)."""
  pred, target, mask = (np.asarray(a, np.float32) for a in (pred, target, mask))
  s = np.asarray(_stats(pred, target, mask, target.reshape(-1, target.shape[-1]).mean(0))).sum(0)
  denom = max(s[3], 1.)
  return {"reconstruction/loss": float(s[0] / denom), "reconstruction/baseline_mean_patch": float(s[1] / denom),
          "reconstruction/baseline_visible_mean": float(s[2] / denom),
          "reconstruction/mask_ratio": float(s[3] / max(s[4], 1.))}


def _pixels(images: np.ndarray, mean, std) -> np.ndarray:
  return np.clip((images * np.asarray(std) + np.asarray(mean)) * 255. + 0.5, 0, 255).astype(np.uint8)


def reconstruction_png(images: np.ndarray, pred: np.ndarray, mask: np.ndarray, *, patch: int, norm_pix: bool,
                       mean, std, path: str) -> None:
  """Rows of original | masked | reconstruction for normalised images [K, H, W, 3] and pixel predictions."""
  from vlm_jax.evaluate import plots  # noqa: PLC0415
  from vlm_jax.models.patches import NORM_PIX_EPS, patchify, unpatchify  # noqa: PLC0415
  k, h, w, c = images.shape
  grid = (h // patch, w // patch)
  true = np.asarray(patchify(jnp.asarray(images), patch))
  if norm_pix:
    mu, sd = true.mean(-1, keepdims=True), np.sqrt(true.var(-1, keepdims=True, ddof=1) + NORM_PIX_EPS)
    pred = pred * sd + mu
  m = mask[..., None].astype(bool)
  masked = np.where(m, np.nan, true)
  recon = np.where(m, pred, true)
  to_img = lambda p: np.asarray(unpatchify(jnp.asarray(np.nan_to_num(p)), grid, patch, c))  # noqa: E731
  grey = np.asarray(unpatchify(jnp.asarray(np.isnan(masked).astype(np.float32)), grid, patch, c)) > 0
  rows = [_pixels(images, mean, std), np.where(grey, np.uint8(128), _pixels(to_img(masked), mean, std)),
          _pixels(to_img(recon), mean, std)]
  plt = plots._pyplot()
  fig, axes = plt.subplots(k, 3, figsize=(4.5, 1.5 * k), dpi=100, squeeze=False)
  for r in range(k):
    for j, title in enumerate(("original", "masked", "reconstruction")):
      axes[r, j].imshow(rows[j][r], interpolation="nearest")
      axes[r, j].axis("off")
      if r == 0:
        axes[r, j].set_title(title, fontsize=8)
  fig.tight_layout()
  plots._save(fig, path)


def synthetic_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'reconstruction_synthetic' (module docstring). Options: num_images (256), batch_size (128),
  image_size (0: the data's), seed (0: the masking rng), plots (True), plot_images (8)."""
  del tokenizer
  from vlm_jax.data import synthetic_eval  # noqa: PLC0415
  from vlm_jax.data.transforms import CLIP_MEAN, CLIP_STD  # noqa: PLC0415
  from vlm_jax.evaluate import options  # noqa: PLC0415
  from vlm_jax.embedding.batched import current_mesh  # noqa: PLC0415
  o = options(cfg, DEFAULTS, "reconstruction_synthetic")
  dc = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
  size = int(o["image_size"] or dc["image_size"])
  mean, std = tuple(dc.get("mean", CLIP_MEAN)), tuple(dc.get("std", CLIP_STD))
  plot_path = None
  if plot_dir and o["plots"] and jax.process_index() == 0:
    plot_path = os.path.join(plot_dir, "reconstruction.png")

  @jax.jit
  def forward(variables, images, rng):
    mim = model.apply(variables, {"image": images}, train=False, rngs={"mask": rng})["mim"]
    return mim["pred"], mim["target"], mim["mask"]

  def run(variables) -> dict:
    images = synthetic_eval.retrieval_set(dc, image_size=size, num_images=int(o["num_images"]),
                                          captions_per_image=1)["image"]
    mesh = current_mesh()
    dp = mesh_lib.data_parallel_size(mesh)
    bs = -(-min(int(o["batch_size"]), len(images)) // dp) * dp
    preds, targets, masks = [], [], []
    with jax.set_mesh(mesh):
      for i, start in enumerate(range(0, len(images), bs)):
        chunk = images[start:start + bs]
        n = len(chunk)
        if n < bs:
          chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
        placed = jax.device_put(chunk, mesh_lib.batch_sharding(mesh, chunk.ndim))
        rng = jax.random.fold_in(jax.random.key(int(o["seed"])), i)
        out = [np.asarray(a)[:n] for a in forward(variables, placed, rng)]
        preds.append(out[0]), targets.append(out[1]), masks.append(out[2])
    pred, target, mask = np.concatenate(preds), np.concatenate(targets), np.concatenate(masks)
    metrics = reconstruction_metrics(pred, target, mask)
    if plot_path and getattr(model, "teacher", None) is None and hasattr(model, "encoder"):
      k = min(int(o["plot_images"]), len(images))
      reconstruction_png(images[:k], pred[:k], mask[:k], patch=model.encoder.patch_size,
                         norm_pix=bool(getattr(model, "norm_pix_loss", False)), mean=mean, std=std,
                         path=plot_path)
    return metrics
  return run
