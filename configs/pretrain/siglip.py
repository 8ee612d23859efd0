"""SigLIP pre-training (Zhai et al. 2023): pairwise sigmoid loss with learned temperature and bias.

  --config=configs/pretrain/siglip.py:tiny                         the embedded synthetic default (CPU)
  --config=configs/pretrain/siglip.py:img=B/16,txt=B,res=224       SigLIP B/16 (MAP head, t=10, b=-10 at init)
"""

from vlm_jax.train import config_base as cb


def get_config(arg: str = "tiny"):
  c, a = cb.two_tower(arg, embed=768)
  c.objectives = {"siglip": 1.0}
  c.objective_hparams = {"siglip": {"impl": "dense"}}  # "ring": memory-linear in the batch (Inf-CL)
  c.model.logit_scale_init = cb.SIGLIP_LOGIT_SCALE_INIT
  c.model.logit_bias_init = cb.SIGLIP_LOGIT_BIAS_INIT
  if a.variant != "tiny":
    c.model.image.pool_type = "map"       # SigLIP's image tower pools with a MAP head
    c.model.image.patch_bias = True
    c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.b2 = 1e-3, 1e-4, 0.95
  return c
