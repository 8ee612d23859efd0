"""PLOT (Chen et al. 2023): N = 4 prompts per class matched to the image's local features by Sinkhorn OT.

  python -m vlm_jax.transfer --config=configs/transfer/plot.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

Local features (`method.local = 'auto'`): the projected patch tokens of a mean-pooled ViT, MaskCLIP dense features
otherwise (the `make demo` ResNet works). Paper: N = 4, M = 16, λ = 0.1, 100 Sinkhorn iterations, CoOp's SGD
recipe; tiny: M = 4 from "a photo of a" plus N(0, 0.02²) noise per prompt, AdamW 2e-3.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  c = config_lib.transfer_config(arg, {"name": "plot", "n_prompts": 4, "n_ctx": 0, "init": "a photo of a",
                                       "class_specific": False, "position": "end", "init_std": 0.02, "eps": 0.1,
                                       "iterations": 100, "local": "auto"})
  c.optimizer.name = "adamw"  # tiny recipe (measured on the pretrained ViT fixture; tests/test_transfer_prompts_b.py)
  c.optimizer.lr = 0.002
  c.optimizer.weight_decay = 0.0
  return c
