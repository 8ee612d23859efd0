"""LiT (Zhai et al. 2022): locked-image tuning. The image tower is copied from a checkpoint and frozen
(no gradient, no optimizer state); the text tower (and both projections) learn to read it.

  --config=configs/pretrain/lit.py:tiny --config.init.checkpoint=workdirs/demo    (a vlm_jax run or converted model)
  --config=configs/pretrain/lit.py:img=B/16,txt=B,res=224 --config.init.checkpoint=DIR
"""

from vlm_jax.train import config_base as cb


def get_config(arg: str = "tiny"):
  a = cb.parse_arg(arg, variant="full", img="B/16", txt="B", res=224, embed=512)
  c = cb.base_config()
  c.objectives = {"clip": 1.0}
  if a.variant == "tiny":
    c.update(cb.tiny_run())
    c.model = cb.tiny_model()
  else:
    c.update(cb.full_run(a.res))
    c.model = cb.vit_text_model(a.img, a.txt, a.res, a.embed)
  c.frozen = r"^img/"            # the locked image tower
  c.init.checkpoint = ""         # required: where the image tower comes from
  c.init.params = r"^img/"
  c.init.required = True
  return c
