"""CoOp (Zhou et al. 2022, IJCV): `python -m vlm_jax.transfer --config=configs/transfer/coop.py:tiny --workdir=DIR`.

Paper recipe: SGD 2e-3, cosine, one constant warmup epoch at 1e-5, batch 32; M = 16 context vectors with random
init (N(0, 0.02²)), or M = 4 initialised from "a photo of a" (set method.init and method.n_ctx=0).
"""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {"name": "coop", "n_ctx": 16, "init": "", "class_specific": False,
                                          "position": "end", "init_std": 0.02})
