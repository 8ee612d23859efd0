"""SLIP pre-training (Mu et al. 2022): CLIP plus SimCLR on two augmented views with an MLP head.

  --config=configs/pretrain/slip.py:tiny
  --config=configs/pretrain/slip.py:img=B/16,txt=B,res=224      (SLIP: head 4096 → 256, τ_SimCLR = 0.1)
"""

from vlm_jax import config_lib as cb


def get_config(arg: str = "tiny"):
  c, a = cb.two_tower(arg)
  c.objectives = {"clip": 1.0, "simclr": 1.0}
  c.objective_hparams = {"clip": {"impl": "dense"}, "simclr": {"temperature": 0.1}}
  c.model.simclr_head = {"hidden": 256, "out": 64} if a.variant == "tiny" else {"hidden": 4096, "out": 256}
  c.data.views = True            # the data stream adds the two augmented views SimCLR compares
  c.data.view_scale = (0.08, 1.0)
  return c
