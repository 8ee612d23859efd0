"""MaPLe (Khattak et al. 2023): deep language prompts in the first J text layers, vision prompts coupled to them
by a linear map per layer.

  python -m vlm_jax.transfer --config=configs/transfer/maple.py:tiny --workdir=DIR --config.init.checkpoint=VIT_RUN

Needs a ViT image tower: the `tiny` default base (`make demo`, a ResNet) does not fit. Use a ViT pre-training run,
e.g. the test suite's pretrained ViT fixture (`.venv/bin/python -m tests.pretrained vit` builds it and prints its
directory). Paper: b = 2 tokens ("a photo"), J = 9 of 12 layers, SGD 3.5e-3, batch 4, 5 epochs; tiny: b = 4 from
"a photo of a" (the synthetic templates' words), J = every layer of the two-layer towers (`method.depth` = −1),
AdamW 2e-3.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  c = config_lib.transfer_config(arg, {"name": "maple", "n_ctx": 0, "init": "a photo of a", "depth": -1,
                                       "vision": True, "init_std": 0.02})
  c.optimizer.name = "adamw"  # tiny recipe (measured on the pretrained ViT fixture; tests/test_transfer_prompts_b.py)
  c.optimizer.lr = 0.002
  c.optimizer.weight_decay = 0.0
  c.optimizer.wd_mask = r"(^|/)(ctx|text_prompts|kernel)$"
  return c
