"""A pre-training run from its config: assembly (tokenizer, model, objectives), data, evaluators, the loop.

Kept apart from `pretrain.py` (flags) and `train/loop.py` (the loop) so tests and notebooks can start a run
from a ConfigDict: `vlm_jax.runner.pretrain(config, workdir)`. Initialisation from checkpoints (`config.init`:
LiT, a frozen teacher, several sources) is the loop's, through `vlm_jax.runs.initializer`.
"""

from __future__ import annotations

import os

from vlm_jax import assembly
from vlm_jax.data import pipeline
from vlm_jax.train import loop


def pretrain(config, workdir: str, *, quiet: bool = False) -> dict:
  """Runs `vlm_jax.train.loop.train` for a pre-training config; returns the final metrics."""
  from vlm_jax.evaluate import make_evaluators
  parts = assembly.assemble(config)

  def make_data(process_index: int, process_count: int):
    return pipeline.make_train_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.seed, tokenizer=parts.tokenizer,
        process_index=process_index, process_count=process_count, quiet=quiet)

  evaluators = make_evaluators(config.get("evals"), model=parts.model, tokenizer=parts.tokenizer,
                               data_config=config.data, plot_dir=os.path.join(workdir, "plots"))
  return loop.train(config, workdir, make_data=make_data, model=parts.model, loss_fn=parts.loss_fn,
                    evaluators=evaluators, quiet=quiet)
