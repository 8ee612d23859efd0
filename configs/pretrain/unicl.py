"""UniCL pre-training (Yang et al. 2022): image-text-label contrastive; pairs sharing a label are positives.

  --config=configs/pretrain/unicl.py:tiny       synthetic default: the label is the image's content (its classes)
  --config=configs/pretrain/unicl.py:img=B/16,txt=B,res=224
"""

from vlm_jax import config_lib as cb


def get_config(arg: str = "tiny"):
  c, _ = cb.two_tower(arg)
  c.objectives = {"unicl": 1.0}
  c.objective_hparams = {"unicl": {"impl": "dense"}}  # "ring": memory-linear in the batch (Inf-CL)
  return c
