"""Evaluators on real datasets: zero-shot classification, linear probe, few-shot and shard retrieval sets.

Data specs follow `vlm_jax.data.sources.open_source`: 'tfds:NAME:SPLIT' (a tfds dataset prepared locally in
`data_dir`; nothing is downloaded) or 'folder:ROOT' (`ROOT/class_name/image`). Images get CLIP's eval transform
(shorter side → `image_size`, bicubic, central crop), are kept as uint8 on the host after the first evaluation
and are normalised with the data config's mean/std one batch at a time, just before encoding. `limit` keeps
that many images, spaced evenly over the dataset (every class of a folder, sorted by class, stays present).

Kinds (each reuses the metric code of its module, so definitions match CLIP_benchmark):

  zeroshot          class names × templates / CuPL descriptions (Radford et al. 2021, §3.1.4; Pratt et al.
                    2023) → `zeroshot.classification_metrics`: top1, top5, mean_per_class_recall
  linear_probe      CLIP's protocol (Radford et al. 2021, app. A.3; `linear_probe.linear_probe`): λ chosen on a
                    validation split carved from `train_dataset`, refit, `test_dataset` scored once
  fewshot           k-shot linear probes over several seeds (`linear_probe.few_shot`)
  retrieval_shards  image–text recall@k (`retrieval.evaluate`) on tar shards; an image's captions are its
                    `.txt` caption followed by the `captions` list of its `.json` when present (COCO / Flickr30k
                    style), repeated texts of one image kept once
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from vlm_jax.errors import UserError


def _mean_std(data_config) -> tuple[tuple, tuple]:
  from vlm_jax.data.transforms import CLIP_MEAN, CLIP_STD  # noqa: PLC0415
  get = data_config.get if hasattr(data_config, "get") else (lambda k, d=None: d)
  return tuple(get("mean", None) or CLIP_MEAN), tuple(get("std", None) or CLIP_STD)


def _normalizer(data_config) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 [B, S, S, 3] → float32 normalised with the data config's mean/std (CLIP's by default)."""
  from vlm_jax.data.transforms import normalize  # noqa: PLC0415
  mean, std = _mean_std(data_config)
  return lambda x: normalize(x, mean, std)


def _image_size(o: dict, data_config) -> int:
  return int(o["image_size"] or data_config["image_size"])


class _Subset:
  """The rows `indices` of a source, as a source (for `sources.load_arrays`)."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices, self.image_size = source, indices, source.image_size

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.source[int(self.indices[int(i)])]


def open_dataset(spec: str, *, what: str, data_dir: str | None, image_size: int):
  """The source of a dataset spec, checked now (a missing folder or unprepared tfds dataset is a `UserError`)."""
  from vlm_jax.data import sources  # noqa: PLC0415
  if not spec or not isinstance(spec, str):
    raise UserError(f"{what} needs a dataset: 'tfds:NAME:SPLIT' or 'folder:ROOT'")
  return sources.open_source(spec, data_dir=data_dir or None, image_size=image_size)


def load_images(source, limit: int = 0) -> dict[str, Any]:
  """{'image' uint8, 'label', 'caption'} of `limit` rows spaced evenly over `source` (all when 0)."""
  from vlm_jax.data import sources  # noqa: PLC0415
  n = len(source)
  if limit and int(limit) < n:
    source = _Subset(source, np.unique(np.linspace(0, n - 1, int(limit)).round().astype(np.int64)))
  arrays = sources.load_arrays(source)
  if not len(arrays["label"]):
    raise UserError("no decodable image in the evaluation dataset")
  return arrays


def read_class_names(spec, default: Sequence[str] | None, where: str) -> list[str]:
  """Class names for prompts: an explicit list, a text file (one name a line), else the dataset's own with
  '_' → ' '."""
  if isinstance(spec, str) and spec:
    try:
      with open(spec, encoding="utf-8") as f:
        names = [ln.strip() for ln in f if ln.strip()]
    except OSError as e:
      raise UserError(f"{where}: cannot read class_names file {spec}: {e.strerror or e}") from None
  elif spec:
    names = [str(s) for s in spec]
  elif default:
    names = [n.replace("_", " ") for n in default]
  else:
    raise UserError(f"{where}: the dataset has no class names; give class_names=[…] or a text file")
  if default is not None and len(names) != len(default):
    raise UserError(f"{where}: {len(names)} class names given, the dataset has {len(default)} classes")
  return names


# ---- zero-shot classification ----------------------------------------------------------------------------------

def zeroshot_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'zeroshot'. Options: dataset (required), data_dir, templates ('clip_imagenet', 'generic',
  a .txt path or a list; '' for descriptions only), descriptions (CuPL JSON path), class_names (list or text
  file), batch_size, image_size (0: the data's), limit (0: all), plots."""
  import jax  # noqa: PLC0415

  from vlm_jax.embedding import classifier, prompts  # noqa: PLC0415
  from vlm_jax.evaluate import options, zeroshot  # noqa: PLC0415
  from vlm_jax.embedding.batched import Embedder  # noqa: PLC0415
  o = options(cfg, {"dataset": "", "data_dir": "", "templates": "clip_imagenet", "descriptions": "",
                    "class_names": "", "batch_size": 256, "image_size": 0, "limit": 0, "plots": True}, "zeroshot")
  source = open_dataset(o["dataset"], what="zeroshot", data_dir=o["data_dir"],
                        image_size=_image_size(o, data_config))
  names = read_class_names(o["class_names"], source.class_names, "zeroshot")
  templates = prompts.load_templates(o["templates"]) if o["templates"] else ()
  if not templates and not o["descriptions"]:
    raise UserError("zeroshot needs templates, descriptions (a CuPL JSON file) or both")
  descriptions = prompts.load_descriptions(o["descriptions"], names) if o["descriptions"] else None
  enc_img = Embedder(model, "encode_image", o["batch_size"])
  enc_txt = Embedder(model, "encode_text", o["batch_size"])
  norm = _normalizer(data_config)
  plot_path = None
  if plot_dir and o["plots"] and jax.process_index() == 0:
    plot_path = os.path.join(plot_dir, "zeroshot_confusion.png")
  cache: dict = {}

  def run(variables) -> dict:
    if not cache:
      cache.update(load_images(source, o["limit"]))
    emb = classifier.class_embeddings(lambda t: enc_txt(variables, t), tokenizer, names, templates,
                                    o["batch_size"], descriptions=descriptions)
    logits = zeroshot.zeroshot_classify(lambda x: enc_img(variables, norm(x)), emb, cache["image"],
                                        o["batch_size"])
    out = zeroshot.classification_metrics(logits, cache["label"], len(names))
    if plot_path:
      from vlm_jax.evaluate import plots  # noqa: PLC0415
      cm = zeroshot.confusion_matrix(logits.argmax(1), cache["label"], len(names))
      plots.confusion_matrix_png(cm, names, plot_path, title=f"zero-shot confusion (top-1 {100 * out['top1']:.1f}%)")
    return {f"zeroshot/{k}": v for k, v in out.items()}
  return run


# ---- linear probe and few-shot ---------------------------------------------------------------------------------

def _probe_features(cfg, extra: dict, kind: str, model, data_config) -> tuple[dict, Callable]:
  """Options and `features(variables) -> {train_x, train_y, test_x, test_y, num_classes}` of a probe kind."""
  from vlm_jax.evaluate import linear_probe as lp  # noqa: PLC0415
  from vlm_jax.evaluate import options  # noqa: PLC0415
  from vlm_jax.embedding.batched import Embedder  # noqa: PLC0415
  o = options(cfg, {"train_dataset": "", "test_dataset": "", "data_dir": "", "batch_size": 256, "image_size": 0,
                    "train_limit": 0, "test_limit": 0, "l2_grid": lp.L2_GRID, "steps": lp.STEPS, "tol": lp.TOL,
                    "standardize": True, **extra}, kind)
  size = _image_size(o, data_config)
  train = open_dataset(o["train_dataset"], what=f"{kind} train_dataset", data_dir=o["data_dir"], image_size=size)
  test = open_dataset(o["test_dataset"], what=f"{kind} test_dataset", data_dir=o["data_dir"], image_size=size)
  if train.class_names and test.class_names and len(train.class_names) != len(test.class_names):
    raise UserError(f"{kind}: train_dataset has {len(train.class_names)} classes, test_dataset "
                    f"{len(test.class_names)}")
  enc = Embedder(model, "encode_image", o["batch_size"])
  norm = _normalizer(data_config)
  cache: dict = {}

  def embed(variables, images: np.ndarray) -> np.ndarray:
    bs = int(o["batch_size"])
    return np.concatenate([enc(variables, norm(images[s:s + bs])) for s in range(0, len(images), bs)])

  def features(variables) -> dict:
    if not cache:
      cache["train"] = load_images(train, o["train_limit"])
      cache["test"] = load_images(test, o["test_limit"])
    tr, te = cache["train"], cache["test"]
    num_classes = len(train.class_names or ()) or int(max(tr["label"].max(), te["label"].max())) + 1
    return {"train_x": embed(variables, tr["image"]), "train_y": tr["label"],
            "test_x": embed(variables, te["image"]), "test_y": te["label"], "num_classes": num_classes}
  return o, features


def linear_probe_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'linear_probe'. Options: train_dataset, test_dataset (required), data_dir, train_limit,
  test_limit (0: all), l2_grid, val_fraction (0.2), seed, steps, tol, standardize, batch_size, image_size,
  plots."""
  from vlm_jax.evaluate import linear_probe as lp  # noqa: PLC0415
  del tokenizer
  o, features = _probe_features(cfg, lp.PROBE_OPTIONS, "linear_probe", model, data_config)
  return lp.probe_runner(o, features, plot_dir)


def fewshot_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'fewshot'. Options: train_dataset, test_dataset (required), shots ((1, 4)), seeds (3),
  data_dir, train_limit, test_limit, l2_grid, steps, tol, standardize, batch_size, image_size."""
  from vlm_jax.evaluate import linear_probe as lp  # noqa: PLC0415
  del tokenizer, plot_dir
  o, features = _probe_features(cfg, {"shots": (1, 4), "seeds": 3}, "fewshot", model, data_config)

  def run(variables) -> dict:
    f = features(variables)
    out = lp.few_shot(f["train_x"], f["train_y"], f["test_x"], f["test_y"], f["num_classes"],
                      shots=tuple(int(k) for k in o["shots"]), seeds=int(o["seeds"]), l2_grid=o["l2_grid"],
                      steps=o["steps"], tol=o["tol"], standardize=o["standardize"])
    return {f"fewshot/{k}": v for k, v in out.items()}
  return run


# ---- retrieval on shards ---------------------------------------------------------------------------------------

def sample_captions(caption: str, meta) -> list[str]:
  """The `.txt` caption, then the strings of `meta['captions']` (if any), stripped, each text once."""
  extra = meta.get("captions") if isinstance(meta, dict) else None
  texts = [caption] + ([c for c in extra if isinstance(c, str)] if isinstance(extra, list) else [])
  out: list[str] = []
  for t in (t.strip() for t in texts):
    if t and t not in out:
      out.append(t)
  return out


def load_shards(spec, *, image_size: int, limit: int = 0) -> dict[str, Any]:
  """{'image' uint8 [N, S, S, 3], 'captions' [N][K_i], 'skipped' {reason: n}} from the shards of `spec`
  (`shards.expand_shards` syntax), in shard order; samples the reader or the decoder rejects are counted."""
  from vlm_jax.data import shards, transforms  # noqa: PLC0415
  items = (item for paths, _ in shards.expand_shards(spec) for path in paths for item, _ in shards.read_shard(path))
  images, captions, skipped = [], [], {}
  for item in items:
    if limit and len(images) >= int(limit):
      break
    if isinstance(item, shards.Skip):
      skipped[item.reason] = skipped.get(item.reason, 0) + 1
      continue
    try:
      img = transforms.resize_center_crop(transforms.decode_image(item.image, draft_size=image_size), image_size)
    except Exception:  # noqa: BLE001 (a bad image in user data is skipped, never a crash)
      skipped["corrupt_image"] = skipped.get("corrupt_image", 0) + 1
      continue
    images.append(np.asarray(img, np.uint8))
    captions.append(sample_captions(item.caption, item.meta))
  if not images:
    raise UserError(f"retrieval shards {spec!r} hold no valid sample (skipped: {skipped or 'none'})")
  return {"image": np.stack(images), "captions": captions, "skipped": skipped}


def retrieval_shards_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'retrieval_shards'. Options: shards (required; PATTERN,… as for training data), limit
  (0: all samples), ks, batch_size, image_size (0: the data's), plots, plot_queries. Loaded on first use."""
  from vlm_jax.data import shards  # noqa: PLC0415
  from vlm_jax.evaluate import retrieval  # noqa: PLC0415
  o, enc_img, enc_txt, plot_path = retrieval._builder(cfg, {"shards": "", "limit": 0}, "retrieval_shards",
                                                      data_config, model, plot_dir)
  if not o["shards"]:
    raise UserError("a 'retrieval_shards' evaluator needs shards=PATTERN (e.g. /data/coco-{00000..00004}.tar)")
  shards.expand_shards(o["shards"])  # a missing shard is a UserError now, not at the first evaluation
  norm = _normalizer(data_config)
  cache: dict = {}

  def run(variables) -> dict:
    if not cache:
      cache.update(load_shards(o["shards"], image_size=o["image_size"], limit=o["limit"]))
    return retrieval.evaluate(lambda x: enc_img(variables, norm(x)), lambda t: enc_txt(variables, t), tokenizer,
                              cache["image"], cache["captions"], ks=tuple(o["ks"]), batch_size=o["batch_size"],
                              plot_path=plot_path, images_uint8=cache["image"], plot_queries=o["plot_queries"])
  return run
