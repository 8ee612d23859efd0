"""Zero-shot classification with prompt-template ensembles (Radford et al. 2021, CLIP §3.1.4).

Each class name is written into every template ("a photo of a {}."), the texts are encoded, the normalised
embeddings are averaged over templates and renormalised; an image is assigned the class whose ensemble
embedding has the highest cosine similarity with its (normalised) image embedding. Reported: top-1, top-5 and
mean per-class recall. `evaluate_synthetic` runs this on the procedural dataset's held-out eval splits:
images of seen and of never-trained (unseen) (shape, colour) pairs, each classified over ALL classes.

Encoder callables take numpy or jax arrays and return L2-normalised embeddings (e.g. jitted closures over
`model.apply(..., method='encode_image')`); they are called on chunks of at most `batch_size` rows.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

EncodeFn = Callable[[np.ndarray], np.ndarray]

# Prompts for the synthetic dataset: the caption templates of `vlm_jax.data.synthetic` with canonical names.
SYNTHETIC_TEMPLATES = ("a {}", "a photo of a {}", "a picture of a {}", "an image of a {}", "there is a {}",
                       "a rendering of a {}")


def _article_fix(text: str) -> str:
  """'a orange …' -> 'an orange …' (templates are written with 'a')."""
  words = text.split(" ")
  for i in range(len(words) - 1):
    if words[i] == "a" and words[i + 1][:1] in tuple("aeiou"):
      words[i] = "an"
  return " ".join(words)


def _chunked(fn: EncodeFn, x: np.ndarray, batch_size: int) -> np.ndarray:
  out = [np.asarray(fn(x[i:i + batch_size]), np.float32) for i in range(0, len(x), batch_size)]
  return np.concatenate(out, axis=0)


def _l2n(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(encode_text_fn: EncodeFn, tokenizer, class_names: Sequence[str],
                     templates: Sequence[str], batch_size: int = 256) -> np.ndarray:
  """Template-ensemble text classifier [C, D]: mean over templates of normalised embeddings, renormalised."""
  texts = [_article_fix(t.format(name)) for name in class_names for t in templates]
  z = _l2n(_chunked(encode_text_fn, tokenizer(texts), batch_size))
  z = z.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return _l2n(z)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None,
                           ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """top-k accuracies ('top1', 'top5', …) and 'mean_per_class_recall' (over classes present in `labels`)."""
  labels = np.asarray(labels)
  order = np.argsort(-logits, axis=1)
  out = {}
  for k in ks:
    k_eff = min(k, logits.shape[1])
    out[f"top{k}"] = float(np.mean(np.any(order[:, :k_eff] == labels[:, None], axis=1)))
  pred = order[:, 0]
  recalls = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
  out["mean_per_class_recall"] = float(np.mean(recalls))
  return out


def zeroshot_classify(encode_image_fn: EncodeFn, class_emb: np.ndarray, images: np.ndarray,
                      batch_size: int = 256) -> np.ndarray:
  """Cosine-similarity logits [N, C] of images against a class-embedding classifier."""
  zimg = _l2n(_chunked(encode_image_fn, images, batch_size))
  return zimg @ class_emb.T


def zeroshot_classification(encode_image_fn: EncodeFn, encode_text_fn: EncodeFn, tokenizer, images: np.ndarray,
                            labels: np.ndarray, class_names: Sequence[str], templates: Sequence[str],
                            batch_size: int = 256) -> dict[str, float]:
  """Zero-shot top-1/top-5/mean-per-class-recall of labelled images over `class_names`."""
  emb = class_embeddings(encode_text_fn, tokenizer, class_names, templates, batch_size)
  logits = zeroshot_classify(encode_image_fn, emb, images, batch_size)
  return classification_metrics(logits, labels, len(class_names))


def evaluate_synthetic(encode_image_fn: EncodeFn, encode_text_fn: EncodeFn, tokenizer, *,
                       data_config: Mapping | None = None, image_size: int = 32,
                       templates: Sequence[str] = SYNTHETIC_TEMPLATES, batch_size: int = 256,
                       prefix: str = "zeroshot/") -> dict[str, float]:
  """Zero-shot classification on the synthetic dataset's 'eval_seen' and 'eval_unseen' splits.

  Both splits are classified over ALL classes (chance = 1/num_classes). Returns, under `prefix`:
  seen_top1, unseen_top1 (the headline numbers), top1/top5/mean_per_class_recall over both splits together,
  seen_/unseen_ shape_acc and colour_acc (is the predicted class's shape / colour right?), and chance.
  """
  from vlm_jax.data import pipeline  # noqa: PLC0415 (evaluation of other datasets needs no synthetic data)

  info = pipeline.dataset_info(data_config)
  names, n_colours = info["class_names"], None
  emb = class_embeddings(encode_text_fn, tokenizer, names, templates, batch_size)
  src = pipeline.make_source(data_config, "eval_seen", image_size=image_size)
  n_colours = src.n_colours
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
  out.update(classification_metrics(np.concatenate(all_logits), np.concatenate(all_labels), len(names)))
  out["chance"] = 1.0 / len(names)
  return {prefix + k: v for k, v in out.items()}
