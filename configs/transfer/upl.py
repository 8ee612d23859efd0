"""UPL (Huang et al. 2022): zero-shot pseudo-labels on the unlabelled training pool, the top-K most confident
images per class (K = --config.shots), then N CoOp contexts trained on them and ensembled. No label is used;
no labelled validation either, so the last step is kept (`select = 'last'`).

  python -m vlm_jax.transfer --config=configs/transfer/upl.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

Paper: N = 16 random-init prompt sets, M = 16, SGD 2e-3, 50 epochs; tiny: N = 4 sets from "a photo of a" plus
N(0, 0.02²) noise each, AdamW.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  c = config_lib.transfer_config(arg, {"name": "upl", "n_prompts": 4, "top_k": 0, "n_ctx": 0,
                                       "init": "a photo of a", "class_specific": False, "position": "end",
                                       "init_std": 0.02})
  c.select = "last"
  c.optimizer.name = "adamw"
  c.optimizer.lr = 0.002
  c.optimizer.weight_decay = 0.0
  return c
