"""Retrieval re-ranked by image-text matching (ITM) scores, and ITM accuracy, on the synthetic retrieval split.

ALBEF (Li et al. 2021, arXiv:2107.07651, §4) and BLIP (Li et al. 2022) retrieve in two stages: the contrastive
similarity z^I·z^T picks each query's top-k candidates, then the fusion encoder's ITM score re-orders those k
(everything outside the top k stays behind them, in contrastive order). Reported under the evaluator's prefix:

  image_to_text_R@k, text_to_image_R@k                 contrastive only (`vlm_jax.evaluate.retrieval`)
  reranked_image_to_text_R@k, reranked_text_to_image_R@k   top-`top_k` re-ordered by the ITM log-odds
  itm_accuracy        matched pairs (image, one of its captions) vs as many mismatched pairs (a caption of
                      another image, text different from all of the image's captions): fraction classified
                      right by ITM log-odds > 0 — balanced, so chance is 0.5
  itm_hard_accuracy   the same with, per image, the contrastively most similar non-matching caption
  chance_image_to_text_R@1, chance_text_to_image_R@1   recall of a random ranking

Recall@k as in `retrieval.hits_at_k` (a query scores when at least one correct item is in its top k). The model
must expose `encode_image`, `encode_text` and `itm_score(images, ids) -> [B]` (`vlm_jax.models.two_leg`).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from vlm_jax.evaluate.retrieval import flatten_captions, hits_at_k, retrieval_metrics
from vlm_jax.parallel import mesh as mesh_lib

KS = (1, 5)
_AHEAD = 1e4  # re-ranked candidates are lifted above every contrastive cosine (|cos| <= 1)


@functools.lru_cache(maxsize=8)
def _scorer(model, mesh) -> Callable:
  def apply(variables, images, ids):
    return model.apply(variables, images, ids, method="itm_score")
  return jax.jit(apply, out_shardings=mesh_lib.replicated(mesh))


def itm_scores(model, variables, images: np.ndarray, ids: np.ndarray, pair_image: np.ndarray,
               pair_text: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """ITM log-odds [P] of the pairs (images[pair_image[p]], ids[pair_text[p]]), batched over the current mesh."""
  from vlm_jax.embedding.batched import current_mesh  # noqa: PLC0415
  mesh = current_mesh()
  dp = mesh_lib.data_parallel_size(mesh)
  p = len(pair_image)
  bs = -(-min(int(batch_size), max(p, 1)) // dp) * dp
  fn = _scorer(model, mesh)
  out = []
  for s in range(0, p, bs):
    ii, tt = pair_image[s:s + bs], pair_text[s:s + bs]
    n = len(ii)
    if n < bs:
      ii, tt = np.concatenate([ii, np.repeat(ii[-1:], bs - n)]), np.concatenate([tt, np.repeat(tt[-1:], bs - n)])
    im = jax.device_put(images[ii], mesh_lib.batch_sharding(mesh, images.ndim))
    tx = jax.device_put(ids[tt], mesh_lib.batch_sharding(mesh, 2))
    with jax.set_mesh(mesh):
      out.append(np.asarray(fn(variables, im, tx))[:n])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def rerank(sim: np.ndarray, top_k: int, score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
  """`sim` [Q, M] with each row's top_k items re-scored _AHEAD + score_fn(query idx [P], item idx [P])."""
  k = min(int(top_k), sim.shape[1])
  cand = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  q = np.repeat(np.arange(sim.shape[0]), k)
  out = np.array(sim, np.float32, copy=True)
  out[q, cand.ravel()] = _AHEAD + np.asarray(score_fn(q, cand.ravel()), np.float32)
  return out


def _mismatched(captions, texts: list[str], owner: np.ndarray, sim: np.ndarray, rng) -> tuple[np.ndarray, ...]:
  """Per image: a random and the most similar caption whose text is none of the image's own captions."""
  text_arr = np.asarray(texts, dtype=object)
  rand, hard = [], []
  for i, caps in enumerate(captions):
    allowed = ~np.isin(text_arr, list(caps)) & (owner != i)
    choices = np.flatnonzero(allowed)
    if not len(choices):  # every caption is one of this image's: no negative exists
      choices = np.flatnonzero(owner != i)
    rand.append(rng.choice(choices))
    hard.append(choices[np.argmax(sim[i, choices])])
  return np.asarray(rand), np.asarray(hard)


def evaluate(model, variables, tokenizer, images: np.ndarray, captions, *, top_k: int = 8, ks=KS,
             batch_size: int = 256, prefix: str = "itm_rerank/", seed: int = 0) -> dict[str, float]:
  """Contrastive and ITM-re-ranked recall both ways, and ITM accuracy (see the module docstring)."""
  from vlm_jax.embedding.batched import Embedder  # noqa: PLC0415
  texts, owner = flatten_captions(captions)
  ids = tokenizer(texts)
  zi = Embedder(model, "encode_image", batch_size)(variables, images)
  zt = Embedder(model, "encode_text", batch_size)(variables, ids)
  out = retrieval_metrics(zi, zt, owner, ks)
  sim = np.asarray(zi, np.float32) @ np.asarray(zt, np.float32).T
  n, t = sim.shape
  score = functools.partial(itm_scores, model, variables, images, ids, batch_size=batch_size)
  i2t = rerank(sim, top_k, lambda q, c: score(q, c))
  t2i = rerank(sim.T, top_k, lambda q, c: score(c, q))
  h_i2t = hits_at_k(i2t, owner[None, :] == np.arange(n)[:, None], ks)
  h_t2i = hits_at_k(t2i, np.arange(n)[None, :] == owner[:, None], ks)
  for k in ks:
    out[f"reranked_image_to_text_R@{k}"] = float(np.mean(h_i2t[k]))
    out[f"reranked_text_to_image_R@{k}"] = float(np.mean(h_t2i[k]))
  rng = np.random.default_rng(seed)
  first = np.unique(owner, return_index=True)[1]
  rand, hard = _mismatched(captions, texts, owner, sim, rng)
  imgs = np.arange(n)
  pos = score(imgs, first)
  out["itm_accuracy"] = float(np.mean(np.concatenate([pos > 0, score(imgs, rand) <= 0])))
  out["itm_hard_accuracy"] = float(np.mean(np.concatenate([pos > 0, score(imgs, hard) <= 0])))
  out["chance_image_to_text_R@1"] = float(np.mean([len(c) for c in captions]) / t)
  out["chance_text_to_image_R@1"] = 1.0 / n
  out["top_k"] = int(min(top_k, t))
  return {prefix + k: v for k, v in out.items()}


def synthetic_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'itm_rerank_synthetic'. Options: num_images (128), captions_per_image (5), top_k (8),
  batch_size (256), image_size (0: the data's), seed (0: the mismatched-pair draw). Writes no files."""
  del plot_dir
  from vlm_jax.data import synthetic_eval  # noqa: PLC0415
  from vlm_jax.evaluate import options  # noqa: PLC0415
  o = options(cfg, {"num_images": 128, "captions_per_image": 5, "top_k": 8, "batch_size": 256, "image_size": 0,
                    "seed": 0}, "itm_rerank_synthetic")
  image_size = int(o["image_size"] or data_config["image_size"])

  def run(variables) -> dict:
    data = synthetic_eval.retrieval_set(data_config, image_size=image_size, num_images=o["num_images"],
                                        captions_per_image=o["captions_per_image"])
    return evaluate(model, variables, tokenizer, data["image"], data["captions"], top_k=o["top_k"],
                    batch_size=o["batch_size"], seed=o["seed"])
  return run
