"""Linear probe (Radford et al. 2021; CoOp's few-shot baseline): the evaluation suite's L-BFGS probe on the frozen
image embeddings of the k-shot training split, λ chosen on the k-shot validation split; no training loop.

  python -m vlm_jax.transfer --config=configs/transfer/linear_probe.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]
"""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {
      "name": "linear_probe", "class_specific": True,
      "l2_grid": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0), "steps": 300}, epochs=0)
