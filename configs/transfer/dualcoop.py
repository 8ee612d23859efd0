"""DualCoOp (Sun et al. 2022): positive and negative learned prompts per class for multi-label recognition, ASL.

  python -m vlm_jax.transfer --config=configs/transfer/dualcoop.py:tiny --workdir=DIR --config.init.checkpoint=MODEL

DualCoOp trains on multi-label data and is scored with mAP, so its default dataset (both variants) is the
multi-label `scenes` (the multi-object synthetic scenes, `vlm_jax.transfer.datasets.SceneDataset`: 48 classes,
k-shot = k training images per class that contain it, union); batches carry 'labels', multi-hot [B, C]. A
single-label dataset is refused. No real multi-label dataset (COCO, VOC2007, NUS-WIDE) has a reader yet.
Paper: M = 16 for both contexts, ASL (γ+ = 1, γ− = 2, m = 0.05), SGD 2e-3; tiny: M = 4 from "a photo of a",
AdamW 2e-3 (measured on the pretrained ViT fixture, tests/test_transfer_prompts_b.py).
"""

from vlm_jax import config_lib


def get_config(arg=None):
  c = config_lib.transfer_config(arg, {"name": "dualcoop", "n_ctx": 0, "init": "a photo of a",
                                       "class_specific": False, "position": "end", "init_std": 0.02,
                                       "gamma_pos": 1.0, "gamma_neg": 2.0, "clip": 0.05, "local": "auto"})
  c.dataset = "scenes"
  c.optimizer.name = "adamw"  # tiny recipe (measured on the pretrained ViT fixture; tests/test_transfer_prompts_b.py)
  c.optimizer.lr = 0.002
  c.optimizer.weight_decay = 0.0
  c.optimizer.wd_mask = r"(^|/)(ctx_pos|ctx_neg)$"
  return c
