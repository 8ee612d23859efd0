"""LiT (Zhai et al. 2022): locked-image tuning. The image tower is copied from a checkpoint and frozen
(no gradient, no optimizer state); the text tower (and both projections) learn to read it.

  --config=configs/pretrain/lit.py:tiny --config.init.checkpoint=workdirs/demo    (a vlm_jax run or converted model)
  --config=configs/pretrain/lit.py:img=B/16,txt=B,res=224 --config.init.checkpoint=DIR
"""

from vlm_jax import config_lib as cb


def get_config(arg: str = "tiny"):
  c, _ = cb.two_tower(arg)
  c.objectives = {"clip": 1.0}
  c.objective_hparams = {"clip": {"impl": "dense"}}  # "ring": memory-linear in the batch (Inf-CL)
  c.frozen = r"^img/"            # the locked image tower
  c.init.checkpoint = ""         # required: where the image tower comes from
  c.init.params = r"^img/"
  c.init.required = True
  return c
