"""TPT (Shu et al. 2022): per test image, 63 random resized crops + the image, the 10 % lowest-entropy views,
one AdamW step (lr 5e-3) on the entropy of their mean prediction w.r.t. the text context ("a photo of a"),
predict, reset. Training-free (nothing is kept between images).

  python -m vlm_jax.transfer --config=configs/transfer/tpt.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

Each image carries 64 views through the image tower and C prompts through the text tower (forward, backward,
forward), so the evaluation batch is small.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  c = config_lib.transfer_config(arg, {"name": "tpt", "n_ctx": 0, "init": "a photo of a", "class_specific": False,
                                       "position": "end", "views": 64, "keep": 0.1, "lr": 5e-3,
                                       "weight_decay": 0.01, "steps": 1, "min_scale": 0.08, "seed": 0},
                                 epochs=0)
  c.eval_batch_size = 32
  return c
