"""Tip-Adapter (Zhang et al. 2022), training-free: a key-value cache of the k-shot training images (keys averaged
over 10 augmented passes), α and β searched on the k-shot validation split only (the reference's grids).

  python -m vlm_jax.transfer --config=configs/transfer/tip_adapter.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]
"""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {
      "name": "tip_adapter", "class_specific": True, "augment_passes": 10, "augment_seed": 0,
      "alpha_range": (0.1, 3.0, 20), "beta_range": (0.1, 7.0, 200)}, epochs=0)
