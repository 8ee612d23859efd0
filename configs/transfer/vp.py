"""VP (Bahng et al. 2022): a learned pixel border added to the normalised image, frozen CLIP text head.

  python -m vlm_jax.transfer --config=configs/transfer/vp.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

The border is 30 px at 224, scaled with the image size (`method.pad` = 0), i.e. 4 px at the synthetic 32 px; works
with either image tower. The paper trains with SGD at lr 40 (the prompt lives in pixel space, gradients are
tiny); the tiny recipe keeps that scale.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  c = config_lib.transfer_config(arg, {"name": "vp", "pad": 0, "init_std": 1.0, "image_size": 0})
  c.optimizer.lr = 40.0
  c.optimizer.weight_decay = 0.0
  c.optimizer.wd_mask = r"(^|/)pad_"
  return c
