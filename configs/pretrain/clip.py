"""CLIP pre-training (Radford et al. 2021): symmetric image-text InfoNCE on a two-tower model.

  --config=configs/pretrain/clip.py:tiny                      the embedded synthetic default (CPU, make demo)
  --config=configs/pretrain/clip.py:img=B/16,txt=B,res=224    ViT-B/16 CLIP on real shards (--config.data.shards)

Arguments: variant (tiny|full), img (ViT variant), txt (text variant), res (image side), embed (joint dim).
"""

from vlm_jax import config_lib as cb


def get_config(arg: str = "tiny"):
  c, _ = cb.two_tower(arg)
  c.objectives = {"clip": 1.0}
  c.objective_hparams = {"clip": {"impl": "dense"}}  # "ring": memory-linear in the batch (Inf-CL)
  return c
