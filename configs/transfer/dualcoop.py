"""DualCoOp (Sun et al. 2022): positive and negative learned prompts per class for multi-label recognition, ASL.

DualCoOp trains on multi-label data (batches with 'labels', multi-hot [B, C]) and is evaluated with mAP; the
single-label transfer entry point does not feed it (tests/test_transfer_prompts_b.py trains it on the
multi-object synthetic scenes, `vlm_jax.data.synthetic_scenes`, with its own short loop). Paper: M = 16 for both
contexts, ASL (γ+ = 1, γ− = 2, m = 0.05), SGD 2e-3; tiny: M = 4 from "a photo of a", AdamW 2e-3.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  c = config_lib.transfer_config(arg, {"name": "dualcoop", "n_ctx": 0, "init": "a photo of a",
                                       "class_specific": False, "position": "end", "init_std": 0.02,
                                       "gamma_pos": 1.0, "gamma_neg": 2.0, "clip": 0.05, "local": "auto"})
  c.optimizer.name = "adamw"  # tiny recipe (measured on the pretrained ViT fixture; tests/test_transfer_prompts_b.py)
  c.optimizer.lr = 0.002
  c.optimizer.weight_decay = 0.0
  c.optimizer.wd_mask = r"(^|/)(ctx_pos|ctx_neg)$"
  return c
