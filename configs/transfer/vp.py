"""VP (Bahng et al. 2022): a learned pixel border added to the normalised image, frozen CLIP text head.

  python -m vlm_jax.transfer --config=configs/transfer/vp.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

The border is 30 px at 224, scaled with the image size (`method.pad` = 0), i.e. 4 px at the synthetic 32 px; works
with either image tower. The paper initialises the border N(0, 1) and trains with SGD at lr 40; the tiny recipe
starts from a zero border (step 0 is the zero-shot model: a random 4 px frame covers 44 % of a 32 px image) and
uses AdamW at 0.05 (method.init_std=1 and optimizer.name=sgd, lr=40 give the paper's).
"""

from vlm_jax import config_lib


def get_config(arg=None):
  c = config_lib.transfer_config(arg, {"name": "vp", "pad": 0, "init_std": 0.0, "image_size": 0})
  c.optimizer.name = "adamw"  # tiny recipe (measured on the pretrained ViT fixture; tests/test_transfer_prompts_b.py)
  c.optimizer.lr = 0.05
  c.optimizer.weight_decay = 0.0
  c.optimizer.wd_mask = r"(^|/)pad_"
  return c
