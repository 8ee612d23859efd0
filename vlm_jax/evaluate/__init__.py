"""Evaluators, chosen and scheduled by config.

`config.evals = {'<name>': {'kind': 'zeroshot_synthetic', …}}`; `make_evaluators` turns it into
`{name: fn(variables) -> {metric: value}}` for the training loop (run every `eval_every_steps` and at the end)
and for the standalone entry point. Embeddings are computed batched and sharded over the mesh (`embed.py`).
"""

from __future__ import annotations

from typing import Callable

from vlm_jax.errors import UserError
from vlm_jax.evaluate.embed import Embedder


def _zeroshot_synthetic(cfg, *, model, tokenizer, data_config) -> Callable:
  from vlm_jax.evaluate import zeroshot
  batch_size = int(cfg.get("batch_size", 256))
  image_size = int(cfg.get("image_size", 0) or data_config.image_size)
  enc_img = Embedder(model, "encode_image", batch_size)
  enc_txt = Embedder(model, "encode_text", batch_size)

  def run(variables) -> dict:
    return zeroshot.evaluate_synthetic(lambda x: enc_img(variables, x), lambda t: enc_txt(variables, t),
                                       tokenizer, data_config=data_config, image_size=image_size,
                                       batch_size=batch_size)
  return run


KINDS = {"zeroshot_synthetic": _zeroshot_synthetic}


def make_evaluators(evals_config, *, model, tokenizer, data_config) -> dict[str, Callable]:
  out = {}
  for name, cfg in (evals_config or {}).items():
    kind = cfg.get("kind", name)
    if kind not in KINDS:
      raise UserError(f"unknown evaluator kind {kind!r} for evals.{name}; available: {sorted(KINDS)}")
    out[name] = KINDS[kind](cfg, model=model, tokenizer=tokenizer, data_config=data_config)
  return out
