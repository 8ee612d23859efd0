"""Zero-shot CLIP (Radford et al. 2021): the prompt-ensemble classifier, no training (baseline row)."""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {"name": "zeroshot"}, epochs=0)
