"""The student's settings from a distillation config: which classifier the model side's open-vocabulary detector
(`vlm_jax.models.detection.open_vocab.OpenVocabDetector`, a `TwoStageDetector` with the ViLD or closed-set
classifier and `detect`) gets, as the `model.open_vocab` dict the run records in its config.json.

  classifier='vild'        ViLD-text cosine logits against the teacher's text embeddings and a learned background;
                           with ViLD-image on (`method.image_weight` > 0) an image head and the ViLD ensemble.
  classifier='closed_set'  the baseline: a learned linear layer over the base classes + background.

Because the whole student is described by `config.model` (framework 'detector' + `open_vocab`),
`vlm_jax.models.build_model(config.model)` rebuilds it, and `python -m vlm_jax.evaluate --workdir=DIR` evaluates a
distillation run without this package.
"""

from __future__ import annotations

import flax.linen as nn

from vlm_jax.models.detection import open_vocab


def open_vocab_config(method_config, num_classes: int, *, closed_set: bool = False) -> dict:
  """`model.open_vocab` of the student of a distillation config's `method` (or of the closed-set baseline) over
  a vocabulary of `num_classes` names."""
  m = dict(method_config)
  d = open_vocab.DEFAULTS
  return {"classifier": "closed_set" if closed_set else "vild", "num_classes": int(num_classes),
          "image_head": (not closed_set) and float(m.get("image_weight", 0.0)) > 0,
          "temperature": float(m.get("temperature", d["temperature"])),
          "ensemble_weight": float(m.get("ensemble_weight", d["ensemble_weight"])),
          "top_k": int(m.get("top_k", d["top_k"])), "max_detections": int(m.get("max_detections", d["max_detections"])),
          "nms_iou": float(m.get("nms_iou", d["nms_iou"]))}


def build(detector: nn.Module, method_config, num_classes: int, embed_dim: int, *,
          closed_set: bool = False) -> open_vocab.OpenVocabDetector:
  """The student of a distillation config's `method` (or the closed-set baseline) around `detector`."""
  return open_vocab.build(detector, open_vocab_config(method_config, num_classes, closed_set=closed_set), embed_dim)
