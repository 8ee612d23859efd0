"""UniCL pre-training (Yang et al. 2022): image-text-label contrastive; pairs sharing a label are positives.

  --config=configs/pretrain/unicl.py:tiny       synthetic default: the label is the image's content (its classes)
  --config=configs/pretrain/unicl.py:img=B/16,txt=B,res=224
"""

from vlm_jax.train import config_base as cb


def get_config(arg: str = "tiny"):
  a = cb.parse_arg(arg, variant="full", img="B/16", txt="B", res=224, embed=512)
  c = cb.base_config()
  c.objectives = {"unicl": 1.0}
  if a.variant == "tiny":
    c.update(cb.tiny_run())
    c.model = cb.tiny_model()
  else:
    c.update(cb.full_run(a.res))
    c.model = cb.vit_text_model(a.img, a.txt, a.res, a.embed)
  return c
