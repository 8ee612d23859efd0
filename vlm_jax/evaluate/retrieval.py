"""Zero-shot image–text retrieval with several captions per image (COCO / Flickr30k style).

Similarity is the cosine of normalised embeddings. Recall@k follows the CLIP papers and LAION-AI/CLIP_benchmark
(`metrics/zeroshot_retrieval.py`: a query scores 1 when AT LEAST ONE correct item is among its k most similar
items, averaged over queries):

  image_to_text_R@k   query = each image, items = all captions, correct = that image's captions
  text_to_image_R@k   query = each caption, items = all images, correct = its image

Ties are resolved against the query (a negative scoring equal to the best correct item ranks before it), so a
collapsed model that gives every item the same score gets recall ≈ 0, not 1. Data: the synthetic
'eval_retrieval' split (`vlm_jax.data.synthetic_eval.retrieval_set`) or a JSONL file with one
`{"image": path, "captions": [...]}` object per line, paths relative to the file.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np

from vlm_jax.embedding.classifier import embed_chunked, l2_normalize_rows
from vlm_jax.errors import UserError

KS = (1, 5, 10)




def hits_at_k(scores: np.ndarray, positive: np.ndarray, ks: Sequence[int] = KS) -> dict[int, np.ndarray]:
  """Per query (row), whether ≥ 1 positive item is in the top k: {k: bool [Q]}; `positive` bool [Q, M].

  Equivalent to: the number of negatives scoring at least the best positive's score is below k.
  """
  scores = np.asarray(scores, np.float32)
  best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
  ahead = np.sum((scores >= best) & ~positive, axis=1)
  has_positive = positive.any(axis=1)
  return {k: (ahead < k) & has_positive for k in ks}


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                      ks: Sequence[int] = KS, chunk: int = 1024) -> dict[str, float]:
  """{'image_to_text_R@k', 'text_to_image_R@k'} from embeddings [N, D], [T, D] and each text's image [T]."""
  zi, zt = l2_normalize_rows(image_emb), l2_normalize_rows(text_emb)
  text_image = np.asarray(text_image)
  n = len(zi)
  i2t = {k: [] for k in ks}
  for s in range(0, n, chunk):  # query blocks keep memory at chunk × T
    rows = np.arange(s, min(s + chunk, n))
    h = hits_at_k(zi[rows] @ zt.T, text_image[None, :] == rows[:, None], ks)
    for k in ks:
      i2t[k].append(h[k])
  t2i = {k: [] for k in ks}
  for s in range(0, len(zt), chunk):
    rows = np.arange(s, min(s + chunk, len(zt)))
    h = hits_at_k(zt[rows] @ zi.T, np.arange(n)[None, :] == text_image[rows, None], ks)
    for k in ks:
      t2i[k].append(h[k])
  out = {f"image_to_text_R@{k}": float(np.mean(np.concatenate(i2t[k]))) for k in ks}
  out.update({f"text_to_image_R@{k}": float(np.mean(np.concatenate(t2i[k]))) for k in ks})
  return out


def flatten_captions(captions: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
  """All captions in one list and, for each, the index of its image."""
  texts = [c for caps in captions for c in caps]
  owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
  return texts, owner


def evaluate(encode_image_fn: Callable, encode_text_fn: Callable, tokenizer, images: np.ndarray,
             captions: Sequence[Sequence[str]], *, ks: Sequence[int] = KS, batch_size: int = 256,
             prefix: str = "retrieval/", plot_path: str | None = None, images_uint8: np.ndarray | None = None,
             plot_queries: int = 6) -> dict[str, float]:
  """Recall@k both ways for images [N, ...] with captions [N][K_i]; optional top-5 text→image grid PNG."""
  texts, owner = flatten_captions(captions)
  zi = l2_normalize_rows(embed_chunked(encode_image_fn, images, batch_size))
  ids = tokenizer(texts)
  zt = l2_normalize_rows(embed_chunked(encode_text_fn, ids, batch_size))
  out = retrieval_metrics(zi, zt, owner, ks)
  out["num_images"], out["num_captions"] = len(images), len(texts)
  if plot_path and images_uint8 is not None and plot_queries > 0:
    from vlm_jax.evaluate import plots  # noqa: PLC0415
    q = np.unique(owner, return_index=True)[1][:plot_queries]  # the first caption of the first images
    top = np.argsort(-(zt[q] @ zi.T), axis=1, kind="stable")[:, :min(5, len(zi))]
    plots.retrieval_grid_png([texts[i] for i in q], images_uint8, top, top == owner[q, None], plot_path,
                             title=f"text → image top-5 (R@1 {100 * out['text_to_image_R@1']:.1f}%)")
  return {prefix + k: v for k, v in out.items()}


def load_jsonl(path: str, *, image_size: int, mean: Sequence[float], std: Sequence[float]) -> dict:
  """A retrieval set from JSONL lines {"image": path relative to the file, "captions": [str, …]}: images
  decoded with Pillow, shorter side resized to `image_size` (bicubic) and centre-cropped (CLIP's eval
  transform, `vlm_jax.data.transforms`), normalised. Returns {'image', 'image_uint8', 'captions'}."""
  from vlm_jax.data import transforms  # noqa: PLC0415
  root = os.path.dirname(os.path.abspath(path))
  try:
    with open(path, encoding="utf-8") as f:
      lines = [(n, ln) for n, ln in enumerate(f, 1) if ln.strip()]
  except OSError as e:
    raise UserError(f"cannot read retrieval set {path}: {e.strerror or e}") from None
  if not lines:
    raise UserError(f"retrieval set {path} is empty")
  images, captions = [], []
  for n, line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    caps = row.get("captions") if isinstance(row, dict) else None
    if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(caps, list) or not caps \
        or not all(isinstance(c, str) and c.strip() for c in caps):
      raise UserError(f'{path}:{n}: expected {{"image": "relative/path", "captions": ["…", …]}}')
    image_path = os.path.join(root, row["image"])
    try:
      with open(image_path, "rb") as f:
        img = transforms.decode_image(f.read(), draft_size=image_size)
    except OSError as e:
      raise UserError(f"{path}:{n}: cannot read image {image_path}: {getattr(e, 'strerror', None) or e}") from None
    except (ValueError, SyntaxError) as e:
      raise UserError(f"{path}:{n}: cannot decode image {image_path}: {e}") from None
    images.append(transforms.resize_center_crop(img, image_size))
    captions.append([c.strip() for c in caps])
  images = np.stack(images)
  return {"image": transforms.normalize(images, mean, std), "image_uint8": images, "captions": captions}


def _builder(cfg, defaults: dict, kind: str, data_config, model, plot_dir):
  import jax  # noqa: PLC0415

  from vlm_jax.evaluate import options  # noqa: PLC0415
  from vlm_jax.embedding.batched import Embedder  # noqa: PLC0415
  o = options(cfg, {"batch_size": 256, "image_size": 0, "ks": KS, "plots": True, "plot_queries": 6, **defaults},
              kind)
  o["image_size"] = int(o["image_size"] or data_config["image_size"])
  enc_img = Embedder(model, "encode_image", o["batch_size"])
  enc_txt = Embedder(model, "encode_text", o["batch_size"])
  plot_path = None
  if plot_dir and o["plots"] and jax.process_index() == 0:
    plot_path = os.path.join(plot_dir, f"{kind}_top.png")
  return o, enc_img, enc_txt, plot_path


def synthetic_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'retrieval_synthetic'. Options: num_images (256), captions_per_image (5), ks, batch_size,
  image_size (0: the data's), plots, plot_queries."""
  from vlm_jax.data import synthetic_eval  # noqa: PLC0415
  o, enc_img, enc_txt, plot_path = _builder(cfg, {"num_images": 256, "captions_per_image": 5},
                                            "retrieval_synthetic", data_config, model, plot_dir)

  def run(variables) -> dict:
    data = synthetic_eval.retrieval_set(data_config, image_size=o["image_size"], num_images=o["num_images"],
                                        captions_per_image=o["captions_per_image"])
    return evaluate(lambda x: enc_img(variables, x), lambda t: enc_txt(variables, t), tokenizer, data["image"],
                    data["captions"], ks=tuple(o["ks"]), batch_size=o["batch_size"], plot_path=plot_path,
                    images_uint8=data["image_uint8"], plot_queries=o["plot_queries"])
  return run


def jsonl_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'retrieval_jsonl'. Options: path (required), ks, batch_size, image_size (0: the data's),
  plots, plot_queries. The images are loaded once, on the first evaluation."""
  o, enc_img, enc_txt, plot_path = _builder(cfg, {"path": ""}, "retrieval_jsonl", data_config, model, plot_dir)
  if not o["path"]:
    raise UserError("a 'retrieval_jsonl' evaluator needs path=FILE.jsonl")
  if not os.path.isfile(o["path"]):
    raise UserError(f"retrieval set {o['path']} does not exist")
  from vlm_jax.data.transforms import CLIP_MEAN, CLIP_STD  # noqa: PLC0415
  mean, std = tuple(data_config.get("mean") or CLIP_MEAN), tuple(data_config.get("std") or CLIP_STD)
  cache: dict = {}

  def run(variables) -> dict:
    if not cache:
      cache.update(load_jsonl(o["path"], image_size=o["image_size"], mean=mean, std=std))
    return evaluate(lambda x: enc_img(variables, x), lambda t: enc_txt(variables, t), tokenizer, cache["image"],
                    cache["captions"], ks=tuple(o["ks"]), batch_size=o["batch_size"], plot_path=plot_path,
                    images_uint8=cache["image_uint8"], plot_queries=o["plot_queries"])
  return run
