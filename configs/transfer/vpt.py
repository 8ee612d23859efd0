"""VPT (Jia et al. 2022): prompt tokens in the frozen ViT (`method.mode` = 'deep' | 'shallow'), frozen CLIP text
head.

  python -m vlm_jax.transfer --config=configs/transfer/vpt.py:tiny --workdir=DIR --config.init.checkpoint=VIT_RUN
  python -m vlm_jax.transfer --config=configs/transfer/vpt.py:tiny,mode=shallow …

Needs a ViT image tower: the `tiny` default base (`make demo`, a ResNet) does not fit. Use a ViT pre-training run,
e.g. the test suite's pretrained ViT fixture (`.venv/bin/python -m tests.pretrained vit` builds it and prints its
directory: configs/pretrain/clip.py:tiny with the ViT image tower of tests/pretrained.py `VIT_IMAGE`).
Arguments: variant (tiny | full), mode (deep | shallow). Paper: P = 10 (shallow) to 50 tokens, SGD with a
grid-searched lr; tiny: P = 10, AdamW 1e-2 with the transfer schedule (prompt tokens live at the scale of the ViT's
activations).
"""

from vlm_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, variant="tiny", mode="deep")
  c = config_lib.transfer_config(a.variant, {"name": "vpt", "mode": a.mode, "tokens": 10, "layers": -1})
  c.optimizer.name = "adamw"  # tiny recipe (measured on the pretrained ViT fixture; tests/test_transfer_prompts_b.py)
  c.optimizer.lr = 0.01
  c.optimizer.weight_decay = 0.0
  c.optimizer.wd_mask = r"(^|/)prompts$"
  return c
