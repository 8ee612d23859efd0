"""Captioning evaluation on the synthetic default: generated captions scored by BLEU-4 and CIDEr-D.

Kind 'captioning_synthetic'. The held-out 'eval_retrieval' scenes (`vlm_jax.data.synthetic_eval.retrieval_set`:
1–3 objects, never training images) each come with `captions_per_image` different reference captions drawn by
the training caption sampler. The model (CoCa/CapPa: `decode_memory` / `decode_logits`) captions every image with
`vlm_jax.decoding` (greedy, or beam search when beam_size > 1), sharded over the mesh's batch axes. Captions are
lower-cased letter words (`caption_metrics.normalize_caption`) before scoring with coco-caption's BLEU-4 and
CIDEr-D (`caption_metrics`). Beside them, a caption-independent baseline predicts the most frequent caption of
the first `baseline_train_scenes` training scenes for every image: captioning/baseline_bleu4, baseline_cider.
Process 0 writes `captioning_samples.jsonl` ({"image_id", "prediction", "references"} per line, the first
`samples` images; rewritten at each evaluation) under the run's plots directory.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Callable, Sequence

import jax
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.evaluate import caption_metrics


def score_captions(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
  """{'bleu4', 'cider'} of one prediction per image against its references (normalised first)."""
  hyps = {i: caption_metrics.normalize_caption(p) for i, p in enumerate(predictions)}
  refs = {i: [caption_metrics.normalize_caption(r) for r in rs] for i, rs in enumerate(references)}
  return {"bleu4": caption_metrics.bleu4(hyps, refs), "cider": caption_metrics.cider_d(hyps, refs)}


def most_frequent_caption(captions: Sequence[str]) -> str:
  """The most frequent normalised caption (ties: the first seen)."""
  counts = collections.Counter(caption_metrics.normalize_caption(c) for c in captions)
  return max(counts, key=lambda c: (counts[c], -list(counts).index(c)))


def _generator(model, tokenizer, o: dict, mesh) -> Callable:
  """fn(variables, images np [N, ...]) -> ids np [N, max_len], batched and sharded over the mesh."""
  from vlm_jax import decoding  # noqa: PLC0415
  from vlm_jax.parallel import mesh as mesh_lib  # noqa: PLC0415
  from vlm_jax.embedding.batched import apply_batched  # noqa: PLC0415
  if getattr(tokenizer, "sot_id", None) is None:
    raise UserError("captioning needs a tokenizer with a start-of-text token (rows [SOT] … [EOT])")
  max_len = int(o["max_len"] or tokenizer.context_length)
  pad_id = getattr(tokenizer, "pad_id", None)
  gen = decoding.make_generator(model, max_len=max_len, sot_id=int(tokenizer.sot_id), eot_id=int(tokenizer.eot_id),
                                pad_id=0 if pad_id is None else int(pad_id),
                                beam_size=int(o["beam_size"]), alpha=float(o["alpha"]),
                                out_shardings=mesh_lib.replicated(mesh))

  def run(variables, images: np.ndarray) -> np.ndarray:
    return apply_batched(gen, variables, images, int(o["batch_size"]), mesh)

  return run


def synthetic_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'captioning_synthetic'. Options: num_images (256), captions_per_image (5), beam_size (1:
  greedy), alpha (1.0: beam-score length normalisation), max_len (0: the tokenizer's), batch_size (256),
  image_size (0: the data's), baseline_train_scenes (4096), samples (16 written; 0: none)."""
  from vlm_jax.data import pipeline, synthetic_eval  # noqa: PLC0415
  from vlm_jax.evaluate import options  # noqa: PLC0415
  from vlm_jax.embedding.batched import current_mesh  # noqa: PLC0415
  o = options(cfg, {"num_images": 256, "captions_per_image": 5, "beam_size": 1, "alpha": 1.0, "max_len": 0,
                    "batch_size": 256, "image_size": 0, "baseline_train_scenes": 4096, "samples": 16},
              "captioning_synthetic")
  image_size = int(o["image_size"] or data_config["image_size"])
  for name in ("decode_memory", "decode_logits"):
    if not hasattr(model, name):
      raise UserError(f"the captioning evaluator needs a captioning model (CoCa, CapPa); "
                      f"{type(model).__name__} has no {name}")
  sample_path = None
  if plot_dir and int(o["samples"]) > 0 and jax.process_index() == 0:
    sample_path = os.path.join(plot_dir, "captioning_samples.jsonl")
  cache: dict = {}

  def run(variables) -> dict:
    data = synthetic_eval.retrieval_set(data_config, image_size=image_size, num_images=o["num_images"],
                                        captions_per_image=o["captions_per_image"])
    if "generate" not in cache:
      cache["generate"] = _generator(model, tokenizer, o, current_mesh())
      src = pipeline.make_source(data_config, "train", image_size=image_size)
      n = min(int(o["baseline_train_scenes"]), len(src))
      cache["baseline"] = most_frequent_caption([src.scene(i).caption for i in range(n)])
    ids = cache["generate"](variables, data["image"])
    predictions = [tokenizer.decode(row) for row in ids]
    refs = data["captions"]
    scores = score_captions(predictions, refs)
    baseline = score_captions([cache["baseline"]] * len(refs), refs)
    if sample_path:
      os.makedirs(os.path.dirname(sample_path), exist_ok=True)
      with open(sample_path, "w", encoding="utf-8") as f:
        for i in range(min(int(o["samples"]), len(refs))):
          f.write(json.dumps({"image_id": i, "prediction": predictions[i], "references": refs[i]}) + "\n")
    return {"captioning/bleu4": scores["bleu4"], "captioning/cider": scores["cider"],
            "captioning/baseline_bleu4": baseline["bleu4"], "captioning/baseline_cider": baseline["cider"],
            "captioning/num_images": len(refs)}

  return run
