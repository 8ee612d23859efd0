"""Assembles a pre-training run from its config: tokenizer, model, objectives, data, evaluators, LiT init.

Kept apart from `pretrain.py` (flags) and `train/loop.py` (the loop) so tests and notebooks can start a run
from a ConfigDict: `vlm_jax.runner.pretrain(config, workdir)`.
"""

from __future__ import annotations

import os

from vlm_jax import objectives
from vlm_jax.data import pipeline, tokenizers
from vlm_jax.errors import UserError
from vlm_jax.models import build_model
from vlm_jax.parallel.mesh import BATCH_AXES
from vlm_jax.train import checkpoint, loop


def build_tokenizer(config):
  return tokenizers.get_tokenizer(**config.tokenizer.to_dict())


def build(config):
  """(tokenizer, model, loss_fn) for a config; text vocabulary and length follow the tokenizer."""
  model_cfg = config.model.to_dict()
  if "text" not in model_cfg:  # an image-only framework (MAE): the tokenizer still feeds the evaluators
    return build_tokenizer(config), build_model(model_cfg), build_loss_fn(config)
  text = dict(model_cfg["text"])
  # a model config complete without the tokenizer is checked first: its mistakes are reported before, e.g., a
  # missing tokenizer vocabulary file
  model = build_model(model_cfg) if {"vocab_size", "max_len"} <= set(text) else None
  tokenizer = build_tokenizer(config)
  text.setdefault("vocab_size", tokenizer.vocab_size)
  text.setdefault("max_len", tokenizer.max_len)
  if text["vocab_size"] < tokenizer.vocab_size or text["max_len"] < tokenizer.max_len:
    raise UserError(f"text tower (vocab {text['vocab_size']}, length {text['max_len']}) is smaller than the "
                    f"tokenizer's (vocab {tokenizer.vocab_size}, length {tokenizer.max_len})")
  model_cfg["text"] = text
  model = model or build_model(model_cfg)
  return tokenizer, model, build_loss_fn(config)


def build_loss_fn(config):
  """The weighted sum of `config.objectives` (`vlm_jax.objectives.make_loss_fn`) over the batch axes."""
  return objectives.make_loss_fn(config.objectives.to_dict(), config.objective_hparams.to_dict(),
                                 mesh_axes=BATCH_AXES)


def lit_init(config):
  """`params_override` copying `config.init.params` (regex) from `config.init.checkpoint` (LiT), or None.

  `config.init.rename` (optional {regex: replacement}) maps this model's parameter paths to the checkpoint's,
  e.g. {'^teacher/': 'img/'} (MAE feature targets from a CLIP image tower; see `checkpoint.source_path`)."""
  src = config.init.get("checkpoint")
  if not src:
    if config.init.get("required"):
      raise UserError("this config initialises from a checkpoint: pass --config.init.checkpoint=DIR "
                      "(a vlm_jax workdir or converted model)")
    return None
  pattern = config.init.get("params") or ".*"

  def override(params):
    rename = config.init.get("rename") or None
    rename = rename.to_dict() if hasattr(rename, "to_dict") else rename
    return checkpoint.copy_params(params, checkpoint.load_params(src), pattern, source_name=src, rename=rename)

  return override


def pretrain(config, workdir: str, *, quiet: bool = False) -> dict:
  """Runs `vlm_jax.train.loop.train` for a pre-training config; returns the final metrics."""
  from vlm_jax.evaluate import make_evaluators
  tokenizer, model, loss_fn = build(config)

  def make_data(process_index: int, process_count: int):
    return pipeline.make_train_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.seed, tokenizer=tokenizer,
        process_index=process_index, process_count=process_count,
        views=float(config.objectives.get("simclr", 0.0)) > 0, quiet=quiet)

  evaluators = make_evaluators(config.get("evals"), model=model, tokenizer=tokenizer, data_config=config.data,
                               plot_dir=os.path.join(workdir, "plots"))
  return loop.train(config, workdir, make_data=make_data, model=model, loss_fn=loss_fn, evaluators=evaluators,
                    params_override=lit_init(config), quiet=quiet)
