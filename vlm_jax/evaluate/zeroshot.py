"""Zero-shot classification with prompt ensembles (Radford et al. 2021, CLIP §3.1.4).

Each class name is written into every template ("a photo of a {}."), the texts are encoded, the normalised
embeddings are averaged over templates and renormalised (the CLIP ensemble recipe); an image is assigned the
class whose ensemble embedding has the highest cosine similarity with its normalised image embedding. A class
may instead (or in addition) be described by CuPL sentences (Pratt et al. 2023), averaged the same way.

Metrics follow LAION-AI/CLIP_benchmark (`metrics/zeroshot_classification.py`):
  top1, top5        a hit when the label is among the k highest logits (reported only when k ≤ #classes)
  mean_per_class_recall   recall of each class present in the labels, averaged (sklearn balanced accuracy)
  mean_average_precision  multi-label: per class, the mean precision at the ranks of its positives
                    (Σ precision@hit / max(#positives, 1)), averaged over ALL classes

`evaluate_synthetic` runs this on the procedural dataset's held-out splits: images of seen and of
never-trained (unseen) (shape, colour) pairs, each classified over ALL classes. Encoder callables take numpy
arrays and return embeddings (normalised here again); they are called on chunks of at most `batch_size` rows.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.embedding import prompts
from vlm_jax.embedding.classifier import class_embeddings, embed_chunked, l2_normalize_rows

EncodeFn = Callable[[np.ndarray], np.ndarray]

SYNTHETIC_TEMPLATES = prompts.load_templates("synthetic")


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None,
                           ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """'top<k>' accuracies (k ≤ number of classes) and 'mean_per_class_recall' (classes present in `labels`)."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  order = np.argsort(-logits, axis=1, kind="stable")
  out = {}
  for k in ks:
    if k <= logits.shape[1]:
      out[f"top{k}"] = float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
  pred = order[:, 0]
  recalls = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
  out["mean_per_class_recall"] = float(np.mean(recalls))
  return out


def average_precision_per_class(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """AP of each class [C]: mean precision at the ranks of its positives when images are sorted by score
  (CLIP_benchmark / torchnet; 0 for a class without positives)."""
  scores, targets = np.asarray(scores, np.float64), np.asarray(targets) > 0
  order = np.argsort(-scores, axis=0, kind="stable")
  hits = np.take_along_axis(targets, order, axis=0)
  precision = np.cumsum(hits, axis=0) / np.arange(1, len(scores) + 1)[:, None]
  return (precision * hits).sum(axis=0) / np.maximum(hits.sum(axis=0), 1)


def multilabel_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
  """{'mean_average_precision'}: AP averaged over all classes (multi-hot `targets` [N, C])."""
  return {"mean_average_precision": float(np.mean(average_precision_per_class(scores, targets)))}


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts [true class, predicted class]."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (np.asarray(labels), np.asarray(pred)), 1)
  return cm


def zeroshot_classify(encode_image_fn: EncodeFn, class_emb: np.ndarray, images: np.ndarray,
                      batch_size: int = 256) -> np.ndarray:
  """Cosine-similarity logits [N, C] of images against a class-embedding classifier."""
  zimg = l2_normalize_rows(embed_chunked(encode_image_fn, images, batch_size))
  return zimg @ class_emb.T


def zeroshot_classification(encode_image_fn: EncodeFn, encode_text_fn: EncodeFn, tokenizer, images: np.ndarray,
                            labels: np.ndarray, class_names: Sequence[str], templates: Sequence[str] = (),
                            batch_size: int = 256, *, descriptions: Sequence[Sequence[str]] | None = None,
                            fix_articles: bool = False) -> dict[str, float]:
  """Zero-shot metrics of images over `class_names`: labels [N] (top-k, mean per-class recall) or multi-hot
  labels [N, C] (mean average precision)."""
  emb = class_embeddings(encode_text_fn, tokenizer, class_names, templates, batch_size,
                         descriptions=descriptions, fix_articles=fix_articles)
  logits = zeroshot_classify(encode_image_fn, emb, images, batch_size)
  if np.ndim(labels) == 2:
    return multilabel_metrics(logits, labels)
  return classification_metrics(logits, labels, len(class_names))


def evaluate_synthetic(encode_image_fn: EncodeFn, encode_text_fn: EncodeFn, tokenizer, *,
                       data_config: Mapping | None = None, image_size: int = 32,
                       templates: Sequence[str] = SYNTHETIC_TEMPLATES, batch_size: int = 256,
                       prefix: str = "zeroshot/", descriptions: Sequence[Sequence[str]] | None = None,
                       fix_articles: bool = True, multilabel_images: int = 0,
                       plot_path: str | None = None) -> dict[str, float]:
  """Zero-shot classification on the synthetic dataset's 'eval_seen' and 'eval_unseen' splits.

  Both splits are classified over ALL classes (chance = 1/num_classes). Returns, under `prefix`:
  seen_top1, unseen_top1 (the headline numbers), top1/top5/mean_per_class_recall over both splits together,
  seen_/unseen_ shape_acc and colour_acc (is the predicted class's shape / colour right?), and chance.
  `multilabel_images` > 0 adds mean_average_precision over the seen classes on that many multi-object
  images of the retrieval split (each image's positives: the classes it shows). `plot_path` writes the
  confusion matrix (true × predicted, both splits) there as a PNG.
  """
  from vlm_jax.data import pipeline  # noqa: PLC0415 (evaluation of other datasets needs no synthetic data)

  info = pipeline.dataset_info(data_config)
  names = info["class_names"]
  emb = class_embeddings(encode_text_fn, tokenizer, names, templates, batch_size, descriptions=descriptions,
                         fix_articles=fix_articles)
  n_colours = pipeline.make_source(data_config, "eval_seen", image_size=image_size).n_colours
  out: dict[str, float] = {}
  all_logits, all_labels = [], []
  for split, tag in (("eval_seen", "seen"), ("eval_unseen", "unseen")):
    arrays = pipeline.make_eval_arrays(data_config, split, image_size=image_size)
    logits = zeroshot_classify(encode_image_fn, emb, arrays["image"], batch_size)
    labels = arrays["class"]
    pred = logits.argmax(axis=1)
    out[f"{tag}_top1"] = float(np.mean(pred == labels))
    out[f"{tag}_shape_acc"] = float(np.mean(pred // n_colours == labels // n_colours))
    out[f"{tag}_colour_acc"] = float(np.mean(pred % n_colours == labels % n_colours))
    all_logits.append(logits)
    all_labels.append(labels)
  logits, labels = np.concatenate(all_logits), np.concatenate(all_labels)
  out.update(classification_metrics(logits, labels, len(names)))
  out["chance"] = 1.0 / len(names)
  if multilabel_images:
    from vlm_jax.data import synthetic_eval  # noqa: PLC0415
    ret = synthetic_eval.retrieval_set(data_config, image_size=image_size, num_images=multilabel_images,
                                       captions_per_image=1)
    seen = np.asarray(info["seen_classes"])
    scores = zeroshot_classify(encode_image_fn, emb[seen], ret["image"], batch_size)
    out.update(multilabel_metrics(scores, ret["multi_hot"][:, seen]))
  if plot_path:
    from vlm_jax.evaluate import plots  # noqa: PLC0415
    plots.confusion_matrix_png(confusion_matrix(logits.argmax(1), labels, len(names)), names, plot_path,
                               title=f"zero-shot confusion (top-1 {100 * out['top1']:.1f}%)")
  return {prefix + k: v for k, v in out.items()}


def synthetic_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'zeroshot_synthetic'. Options: batch_size, image_size (0: the data's), templates (a
  bundled set name, a .txt path or a list), descriptions (CuPL JSON path, '' for none), fix_articles,
  multilabel_images (0: no mAP), plots."""
  import jax  # noqa: PLC0415

  from vlm_jax.evaluate import options  # noqa: PLC0415
  from vlm_jax.embedding.batched import Embedder  # noqa: PLC0415
  from vlm_jax.data import pipeline  # noqa: PLC0415
  o = options(cfg, {"batch_size": 256, "image_size": 0, "templates": "synthetic", "descriptions": "",
                    "fix_articles": True, "multilabel_images": 0, "plots": True}, "zeroshot_synthetic")
  templates = prompts.load_templates(o["templates"]) if o["templates"] else ()
  if not templates and not o["descriptions"]:
    raise UserError("zeroshot_synthetic needs templates, descriptions (a CuPL JSON file) or both")
  descriptions = None
  if o["descriptions"]:
    descriptions = prompts.load_descriptions(o["descriptions"], pipeline.dataset_info(data_config)["class_names"])
  image_size = int(o["image_size"] or data_config["image_size"])
  enc_img = Embedder(model, "encode_image", o["batch_size"])
  enc_txt = Embedder(model, "encode_text", o["batch_size"])
  plot_path = None
  if plot_dir and o["plots"] and jax.process_index() == 0:
    plot_path = os.path.join(plot_dir, "zeroshot_confusion.png")

  def run(variables) -> dict:
    return evaluate_synthetic(lambda x: enc_img(variables, x), lambda t: enc_txt(variables, t), tokenizer,
                              data_config=data_config, image_size=image_size, templates=templates,
                              batch_size=o["batch_size"], descriptions=descriptions,
                              fix_articles=o["fix_articles"], multilabel_images=int(o["multilabel_images"]),
                              plot_path=plot_path)
  return run
