"""CALIP (Guo et al. 2023): parameter-free attention between the dense image features and the class text
features, training-free; β₂, β₃ searched on the k-shot validation split only (β₁ = 1; (0, 0) is zero-shot).

  python -m vlm_jax.transfer --config=configs/transfer/calip.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

Dense features (`method.local = 'auto'`): the projected patch tokens of a mean-pooled ViT, MaskCLIP dense features
otherwise. Grids: the ranges of the paper's reported values (β₂ up to ~6, β₃ up to ~0.2) plus larger β₃ steps.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {
      "name": "calip", "alpha_t": 2.0, "alpha_s": 2.0, "local": "auto",
      "beta2_grid": (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
      "beta3_grid": (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)}, epochs=0)
