"""SigLIP pre-training (Zhai et al. 2023): pairwise sigmoid loss with learned temperature and bias.

  --config=configs/pretrain/siglip.py:tiny                         the embedded synthetic default (CPU)
  --config=configs/pretrain/siglip.py:img=B/16,txt=B,res=224       SigLIP B/16 (MAP head, t=10, b=-10 at init)
"""

from vlm_jax.train import config_base as cb


def get_config(arg: str = "tiny"):
  a = cb.parse_arg(arg, variant="full", img="B/16", txt="B", res=224, embed=768)
  c = cb.base_config()
  c.objectives = {"siglip": 1.0}
  if a.variant == "tiny":
    c.update(cb.tiny_run())
    c.model = cb.tiny_model()
  else:
    c.update(cb.full_run(a.res))
    c.model = cb.vit_text_model(a.img, a.txt, a.res, a.embed)
    c.model.image.pool_type = "map"       # SigLIP's image tower pools with a MAP head
    c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.b2 = 1e-3, 1e-4, 0.95
  c.model.logit_scale_init = cb.SIGLIP_LOGIT_SCALE_INIT
  c.model.logit_bias_init = cb.SIGLIP_LOGIT_BIAS_INIT
  return c
