"""FILIP token-patch alignment on held-out synthetic scenes: word→patch heat-maps, localisation and zero-shot.

FILIP (Yao et al. 2021, arXiv 2111.07783, §4.5 "visualization of fine-grained alignment") shows, for each word of a
caption, the image patch its token embedding matches best. Here, on held-out multi-object scenes of the synthetic
default ('eval_retrieval' split: seen classes, unseen images) with known boxes:

  word_patch_hit   the share of object words (each token of an object's phrase "[size] colour shape" in the
                   caption) whose argmax patch (highest <x_k, y_r>) has its centre inside that object's box
  chance_hit       the same for a patch drawn uniformly: the mean share of patch centres inside the word's box
  zeroshot_top1    single-object 'eval_seen' images classified over all 64 classes by the FILIP similarity
                   ½ (s^I + s^T) with the prompt "a <colour> <shape>" (chance 1/64, reported as zeroshot_chance)

and, under plot_dir, `filip_maps_<i>.png`: the image with each object word's patch-similarity heat-map over it
(the box drawn, the argmax patch marked).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from vlm_jax.errors import UserError


def word_positions(caption_ids: np.ndarray, phrase_ids: list[np.ndarray]) -> list[list[int]]:
  """Token positions of each phrase in a caption row, matched in order (a phrase is searched after the previous
  one's match); an unmatched phrase gets no positions."""
  out, start = [], 0
  row = list(int(t) for t in caption_ids)
  for ph in phrase_ids:
    ph = [int(t) for t in ph]
    found = []
    for s in range(start, len(row) - len(ph) + 1):
      if ph and row[s:s + len(ph)] == ph:
        found, start = list(range(s, s + len(ph))), s + len(ph)
        break
    out.append(found)
  return out


def _phrase_tokens(tokenizer, phrase: str) -> np.ndarray:
  """The ids of `phrase` without SOT/EOT/padding (CLIP layout rows)."""
  row = tokenizer([phrase])[0]
  ids = row[1:]
  return ids[(ids != 0) & (ids != tokenizer.eot_id)]


def patch_centres(grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
  """[h·w, 2] (x, y) pixel centres of the patches of a row-major token grid."""
  (h, w), (height, width) = grid_hw, image_hw
  ys, xs = np.meshgrid((np.arange(h) + 0.5) * height / h, (np.arange(w) + 0.5) * width / w, indexing="ij")
  return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)


def _inside(points: np.ndarray, box) -> np.ndarray:
  return (points[:, 0] >= box[0]) & (points[:, 0] < box[2]) & (points[:, 1] >= box[1]) & (points[:, 1] < box[3])


def _plot(path: str, image: np.ndarray, words: list[str], maps: list[np.ndarray], boxes: list, best: list[int],
          grid_hw) -> None:
  from vlm_jax.evaluate.plots import _pyplot, _save  # noqa: PLC0415
  plt = _pyplot()
  n = len(words) + 1
  fig, axes = plt.subplots(1, n, figsize=(2.0 * n, 2.3))
  axes = np.atleast_1d(axes)
  size = image.shape[0]
  axes[0].imshow(image)
  axes[0].set_title("image", fontsize=8)
  for ax, word, m, box, b in zip(axes[1:], words, maps, boxes, best):
    ax.imshow(image)
    ax.imshow(m.reshape(grid_hw), cmap="jet", alpha=0.5, extent=(0, size, size, 0), interpolation="nearest")
    ax.add_patch(plt.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, ec="white", lw=1.5))
    cy, cx = divmod(b, grid_hw[1])
    ax.plot([(cx + 0.5) * size / grid_hw[1]], [(cy + 0.5) * size / grid_hw[0]], "w+", ms=10)
    ax.set_title(word, fontsize=8)
  for ax in axes:
    ax.axis("off")
  _save(fig, path)


def synthetic_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'filip_maps_synthetic' (metrics in the module docstring). Options: num_images (scenes for
  the localisation), plots (heat-map PNGs written), zeroshot (also the FILIP zero-shot accuracy), batch_size."""
  import jax  # noqa: PLC0415

  from vlm_jax.data import pipeline, synthetic_shards  # noqa: PLC0415
  from vlm_jax.evaluate import options  # noqa: PLC0415
  from vlm_jax.embedding.batched import Embedder  # noqa: PLC0415
  from vlm_jax.models.tokens import text_token_mask  # noqa: PLC0415
  from vlm_jax.objectives.filip import token_scores  # noqa: PLC0415
  o = options(cfg, {"num_images": 128, "plots": 4, "zeroshot": True, "batch_size": 128}, "filip_maps_synthetic")
  if not hasattr(model, "encode_image_tokens"):
    raise UserError("filip_maps_synthetic needs a two-tower model (encode_image_tokens / encode_text_tokens)")
  size = int(data_config["image_size"])
  src = pipeline.make_source(data_config, "eval_retrieval", image_size=size)
  n = min(int(o["num_images"]), len(src))
  scenes = [src.scene(i) for i in range(n)]
  rendered = [src.render(s) for s in scenes]
  raw = np.stack([r["image"] for r in rendered])
  mean, std = tuple(data_config.get("mean", pipeline.CLIP_MEAN)), tuple(data_config.get("std", pipeline.CLIP_STD))
  images = pipeline.normalize(raw, mean, std)
  captions = tokenizer([s.caption for s in scenes])
  objects = []  # (image, word positions, box, label word)
  for i, (scene, r) in enumerate(zip(scenes, rendered)):
    phrases = synthetic_shards.object_phrases(scene.caption)
    for k, pos in enumerate(word_positions(captions[i], [_phrase_tokens(tokenizer, p) for p in phrases])):
      for p in pos:
        objects.append((i, p, r["boxes"][k]))
  enc_img = Embedder(model, "encode_image_tokens", o["batch_size"])
  enc_txt = Embedder(model, "encode_text_tokens", o["batch_size"])
  zs = None
  if o["zeroshot"]:
    info = pipeline.dataset_info(data_config)
    zs = (pipeline.make_eval_arrays(data_config, "eval_seen", image_size=size),
          tokenizer([f"a {name}" for name in info["class_names"]]))
  plot = plot_dir is not None and jax.process_index() == 0 and int(o["plots"]) > 0

  def run(variables) -> dict:
    x = enc_img(variables, images)  # [M, N, E]
    y = enc_txt(variables, captions)  # [M, L, E]
    grid_hw = (int(round(np.sqrt(x.shape[1]))),) * 2
    if grid_hw[0] * grid_hw[1] != x.shape[1]:
      raise UserError(f"filip_maps_synthetic needs a square token grid, got {x.shape[1]} tokens")
    centres = patch_centres(grid_hw, (size, size))
    hits, chance = [], []
    for i, p, box in objects:
      sims = x[i] @ y[i, p]
      hits.append(bool(_inside(centres[None, int(np.argmax(sims))], box)[0]))
      chance.append(float(_inside(centres, box).mean()))
    out = {"filip_maps/word_patch_hit": float(np.mean(hits)) if hits else 0.0,
           "filip_maps/chance_hit": float(np.mean(chance)) if chance else 0.0,
           "filip_maps/object_words": float(len(hits))}
    if zs is not None:
      arrays, prompt_ids = zs
      xi = enc_img(variables, arrays["image"])
      yt = enc_txt(variables, prompt_ids)
      layout = {k: getattr(tokenizer, k, None) for k in ("sot_id", "eot_id", "pad_id")}
      mask = np.asarray(text_token_mask(prompt_ids, **layout), np.float32)
      s_img, s_txt = token_scores(xi, yt, mask)
      pred = np.argmax(np.asarray(s_img) + np.asarray(s_txt), axis=1)
      out["filip_maps/zeroshot_top1"] = float(np.mean(pred == arrays["class"]))
      out["filip_maps/zeroshot_chance"] = 1.0 / len(prompt_ids)
    if plot:
      os.makedirs(plot_dir, exist_ok=True)
      for i in range(min(int(o["plots"]), n)):
        mine = [(p, box) for j, p, box in objects if j == i]
        if not mine:
          continue
        maps = [x[i] @ y[i, p] for p, _ in mine]
        words = [tokenizer.decode(captions[i, p:p + 1]) for p, _ in mine]
        _plot(os.path.join(plot_dir, f"filip_maps_{i}.png"), raw[i], words, maps, [b for _, b in mine],
              [int(np.argmax(m)) for m in maps], grid_hw)
    return out
  return run
