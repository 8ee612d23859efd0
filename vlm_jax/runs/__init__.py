"""Run directories: the one place pre-training, evaluation, interop, inference, transfer and distillation share.

  run = runs.load(DIR)                      # Run(config, variables, step, root, directory); newest readable step
  runs.load_variables(DIR)                  # every variable collection ({'params', 'batch_stats', …}), numpy
  runs.read_config(DIR)                     # the saved run config
  runs.resolve(DIR)                         # (checkpoints root, step or None)
  runs.fingerprint(DIR)                     # sha256 of the step's files: which exact weights a run used
  runs.save_model(OUT, config, variables)   # a model as a run directory (converted models, fine-tuned models)
  runs.Checkpointer(DIR/checkpoints)        # the training loop's orbax checkpoints, resume from newest readable
  runs.initializer(config.init)             # fn(variables) -> variables copying from one or several checkpoints
  runs.image_transform(config)              # (image_size, mean, std) of the eval transform
  runs.reference                            # frozen weights kept by reference (config.checkpoint_frozen=False)

`DIR` is a run directory, its `checkpoints/` folder or one `checkpoints/<step>` folder (`directory.py` documents
the layout). Building the model a config describes is `vlm_jax.assembly`'s job; exporting to open_clip / Hugging
Face formats is `vlm_jax.interop`'s, which reads through here.
"""

from __future__ import annotations

from vlm_jax.runs import reference
from vlm_jax.runs.checkpointer import Checkpointer, abstract_like
from vlm_jax.runs.directory import (Run, check_output_dir, fingerprint, load, load_variables, merge_trees,
                                    read_config, resolve, run_directory, save_model, steps)
from vlm_jax.runs.init import copy_variables, initializer, source_path, sources


def image_transform(config) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
  """(image_size, mean, std) of a run config's eval transform (resize shorter side + centre crop, then
  (x/255 − mean)/std; `vlm_jax.data.transforms`)."""
  import numpy as np  # noqa: PLC0415

  from vlm_jax.data import transforms  # noqa: PLC0415
  data = config.get("data") or {}
  size = data.get("image_size", 224)
  return (int(np.ravel(size)[0]), tuple(float(v) for v in data.get("mean", transforms.CLIP_MEAN)),
          tuple(float(v) for v in data.get("std", transforms.CLIP_STD)))


__all__ = ["Checkpointer", "Run", "abstract_like", "check_output_dir", "copy_variables", "fingerprint",
           "image_transform", "initializer", "load", "load_variables", "merge_trees", "read_config", "reference", "resolve",
           "run_directory", "save_model", "source_path", "sources", "steps"]
