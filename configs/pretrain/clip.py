"""CLIP pre-training (Radford et al. 2021): symmetric image-text InfoNCE on a two-tower model.

  --config=configs/pretrain/clip.py:tiny                      the embedded synthetic default (CPU, make demo)
  --config=configs/pretrain/clip.py:img=B/16,txt=B,res=224    ViT-B/16 CLIP on real shards (--config.data.shards)

Arguments: variant (tiny|full), img (ViT variant), txt (text variant), res (image side), embed (joint dim).
"""

from vlm_jax.train import config_base as cb


def get_config(arg: str = "tiny"):
  a = cb.parse_arg(arg, variant="full", img="B/16", txt="B", res=224, embed=512)
  c = cb.base_config()
  c.objectives = {"clip": 1.0}
  if a.variant == "tiny":
    c.update(cb.tiny_run())
    c.model = cb.tiny_model()
    return c
  c.update(cb.full_run(a.res))
  c.model = cb.vit_text_model(a.img, a.txt, a.res, a.embed)
  return c
