"""FILIP pre-training (Yao et al. 2021): token-wise late-interaction InfoNCE on a two-tower model.

  --config=configs/pretrain/filip.py:tiny                      the embedded synthetic default (CPU)
  --config=configs/pretrain/filip.py:micro                     a seconds-long smoke run (tests)
  --config=configs/pretrain/filip.py:img=B/16,txt=B,res=224    ViT-B/16 FILIP on real shards (--config.data.shards)

FILIP needs a token grid, so every variant uses a ViT image tower: the tiny default's ResNet has a 1×1 final
feature map at 32 px. 'tiny' is a 2-layer width-64 ViT with 8-px patches (a 4×4 grid) at batch 128 (the token
similarities cost B²·N·L: 128² × 16 × 24 per step). The loss defaults to the
memory-linear ring (`objective_hparams.filip.impl='dense'` builds the B×B×N×L similarities at once).
Arguments: variant (tiny|micro|full), img, txt, res, embed.
"""

from vlm_jax import config_lib as cb


def get_config(arg: str = "tiny"):
  c, a = cb.two_tower(arg)
  c.model.token_embeddings = True
  c.objectives = {"filip": 1.0}
  c.objective_hparams = {"filip": {"impl": "ring"}}  # or "dense"
  if a.variant == "tiny":
    c.model.image = {"kind": "vit", "variant": "tiny/8", "image_size": 32, "pool_type": "gap"}
    c.batch_size = 128
    c.evals = {"filip_maps": {"kind": "filip_maps_synthetic", "num_images": 128, "plots": 4}}
  elif a.variant == "micro":
    c.evals = {}
  return c
