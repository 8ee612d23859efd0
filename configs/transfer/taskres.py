"""TaskRes (Yu et al. 2023): the zero-shot text classifier plus a learned, zero-initialised residual scaled by α.

  python -m vlm_jax.transfer --config=configs/transfer/taskres.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

Optimiser: AdamW lr 1e-2, no weight decay, cosine after one constant warmup epoch; batch 32 and 10 epochs (tiny;
the reference: Adam lr 2e-3 (2e-4 on ImageNet), batch 256, 100-200 epochs). Chosen on validation top-1 with the ViT
test fixture at 16 shots (shifted_hues; zero-shot 14.5 %): the CoOp recipe (SGD 2e-3) 15.6 %, AdamW 2e-3 22.3 %,
AdamW 1e-2 25.8 %.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {"name": "taskres", "alpha": 0.5, "class_specific": True}, optimizer={
      "name": "adamw", "lr": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
      "wd_mask": r"(^|/)kernel$", "clip_norm": 0.0, "schedule": "cosine", "warmup": "constant",
      "warmup_lr": 1e-5, "warmup_steps": 0, "end_factor": 0.0, "grad_accum_steps": 1})
